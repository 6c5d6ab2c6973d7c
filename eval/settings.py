"""The eval stage's settings (`conf/eval/*.yaml`): how its rows decode (`decode`, the decoder's own
`DecodeSettings`, nested rather than copied) and what it compares (baselines, hybrids, merged trees, extra drafters).

They live apart from the stage (`eval/speculative.py`) so that what reads an eval report back (`eval/report.py`,
the export stage) gets the same class the eval ran with, defaults included, without importing the stage."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar

from eval.decoder import DecodeSettings, as_decode
from infra.settings import Rule, SettingsError, at_least, check_fields
from models.lookup import LookupSpec, baseline_specs


@dataclass(frozen=True)
class EvalSettings:
    SECTION: ClassVar[str] = "eval"
    decode: DecodeSettings = field(default_factory=DecodeSettings)  # γ or tree, sampling (target and drafter alike),
                                  # max_new_tokens, batch_size (> 1: speedups are per batch), seed
    turns: int = 2  # user turns replayed per conversation (MT-Bench has 2)
    warmup_prompts: int = 1
    require_lossless: bool = True
    tie_tolerance: float = 0.5  # half precision: a divergence within this top-2 logit gap is a near-tie
    include_untrained: bool = True
    baselines: tuple[str, ...] = ("prompt_lookup", "ngram", "prompt_lookup+ngram", "token_recycling")
    plots: bool = True
    drafters: dict = field(default_factory=dict)  # extra drafters to compare: {name: checkpoint directory}
    hybrid: tuple[str, ...] = ()  # training-free kinds put in front of every trained drafter: rows "NAME+KIND"
    hybrid_min_ngram: int = 1     # the shortest match the lookup in front (or in a merged tree) must find
    merged: tuple[str, ...] = ()  # training-free kinds whose guess joins every trained drafter's own tree or chain
                                  # in one verified token tree: rows "NAME&KIND" (models.lookup.MergedDraft)
    merged_depth: int = 4         # the lookup branch's most tokens
    merged_tree: tuple[int, ...] = ()  # the trained drafter's own part of a merged tree (empty: decode.tree, else γ)
    merged_skip_at: int | str = 0  # > 0: the trained drafter sits out a step whose lookup guess is this long;
                                  # "auto": where its measured gain is worth less than its measured cost
    merged_min_probability: float | str = 0.0  # the drafter's nodes below this path probability are not verified;
                                  # "auto": what one more verified token costs here, in plain steps (node_cost)
    LIMITS: ClassVar[dict] = {"turns": at_least(1), "warmup_prompts": at_least(0), "tie_tolerance": at_least(0),
                              "hybrid_min_ngram": at_least(1), "merged_depth": at_least(1),
                              "merged_skip_at": Rule("must be ≥ 0, or 'auto'",
                                                     lambda value: value == "auto" or not isinstance(value, str)
                                                     and value >= 0)}

    def __post_init__(self) -> None:
        object.__setattr__(self, "decode", as_decode(self.decode))
        object.__setattr__(self, "baselines", tuple(self.baselines))
        object.__setattr__(self, "hybrid", tuple(self.hybrid))
        object.__setattr__(self, "merged", tuple(self.merged))
        object.__setattr__(self, "merged_tree", tuple(self.merged_tree))
        if any(k < 1 for k in self.merged_tree):
            raise SettingsError(f"eval.merged_tree={list(self.merged_tree)}: every depth needs at least one child",
                                "eval.merged_tree")
        baseline_specs(self.baselines)  # validates the names
        self.hybrid_specs  # validates
        self.merged_specs  # validates
        bar = self.merged_min_probability
        if isinstance(bar, str) and bar != "auto" or not isinstance(bar, str) and not 0 <= bar < 1:
            raise SettingsError(f"eval.merged_min_probability={bar!r}: a probability in [0, 1), or 'auto'",
                                "eval.merged_min_probability")
        check_fields(self)

    def _lookup_specs(self, key: str) -> dict[str, LookupSpec]:
        """The lookups that `eval.<key>` names, each needing a match of `hybrid_min_ngram` tokens or more."""
        try:
            specs = baseline_specs(getattr(self, key))
        except ValueError as error:
            raise ValueError(str(error).replace("eval.baselines", f"eval.{key}")) from None
        return {name: replace(spec, min_ngram=min(self.hybrid_min_ngram, spec.max_ngram))
                for name, spec in specs.items()}

    @property
    def hybrid_specs(self) -> dict[str, LookupSpec]:
        return self._lookup_specs("hybrid")

    @property
    def merged_specs(self) -> dict[str, LookupSpec]:
        return self._lookup_specs("merged")
