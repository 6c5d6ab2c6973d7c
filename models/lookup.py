"""Training-free drafters: prompt lookup, a corpus n-gram table and Token Recycling, the bar every trained drafter
must clear.

    python train/run.py +experiment=quickstart stages=[eval]            # eval.baselines: on by default
    python train/run.py +experiment=quickstart stages=[eval] eval.baselines=[prompt_lookup]

A lookup drafter guesses the next token from the longest suffix of the context (up to `max_ngram` tokens) that it
has seen before, trying n = max_ngram .. 1 and, at each n, its sources in order:
- `prompt`: the tokens that followed earlier occurrences of that suffix in this row's own prompt and answer so far
  (prompt lookup decoding; vLLM's `ngram` speculative method, HF's `prompt_lookup_num_tokens`);
- `corpus`: the tokens that followed it in the answers of this run's data_gen records, so the table sees exactly
  the data the trained drafters saw;
- `recycled` (n = 1 only): Token Recycling (Luo et al., 2024), an adjacency table holding, for each token, the
  target's own top-`recycle_k` next tokens the last time the target scored a position holding it; every
  verification forward refreshes the rows of the tokens it scored (`observe`), and the table lives as long as the
  drafter, so it keeps learning across prompts.
Candidates are scored by how often they followed (the most recent occurrence breaks ties) and given to the decoder
as logits: log(score) on the candidates, -inf elsewhere. So greedy drafting takes the most frequent continuation,
a tree takes the top-k, and sampled decoding samples from the normalised scores (still lossless: the acceptance
rule holds for any q). Where nothing matches, the drafter abstains (`abstains = True`: all logits -inf) and the
decoder verifies nothing for that row: no target work is spent on a guess it does not have.

Its cost per drafted token is a few dictionary lookups (c ≈ 0; `parameters_per_token` is 0).
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import torch

from infra.settings import at_least, check_fields
from models.draft import DraftDefaults

CONFIG_FILE = "lookup_drafter.json"
SOURCES = ("prompt", "corpus", "recycled")


@dataclass(frozen=True)
class LookupSpec:
    name: str = "prompt-lookup"
    sources: tuple[str, ...] = ("prompt",)  # in priority order at equal n: prompt, corpus, or both
    max_ngram: int = 3                       # longest suffix matched (tokens)
    min_ngram: int = 1                       # shortest suffix that counts as a match (vLLM's prompt_lookup_min)
    min_count: int = 1                       # corpus: continuations seen fewer times are dropped
    recycle_k: int = 8                       # recycled: candidates kept per token
    LIMITS: ClassVar[dict] = {"max_ngram": at_least(1), "min_ngram": at_least(1), "min_count": at_least(1),
                              "recycle_k": at_least(1)}

    def __post_init__(self) -> None:
        object.__setattr__(self, "sources", tuple(self.sources))
        unknown = [s for s in self.sources if s not in SOURCES]
        if not self.sources or unknown:
            raise ValueError(f"lookup sources={list(self.sources)}: each must be one of {SOURCES}")
        check_fields(self)
        if self.min_ngram > self.max_ngram:
            raise ValueError(f"lookup min_ngram={self.min_ngram} is above max_ngram={self.max_ngram}")


# The training-free rows of every eval table (`eval.baselines`), by name.
BASELINES = {
    "prompt_lookup": LookupSpec(name="prompt_lookup", sources=("prompt",)),
    "ngram": LookupSpec(name="ngram", sources=("corpus",)),
    "prompt_lookup+ngram": LookupSpec(name="prompt_lookup+ngram", sources=("prompt", "corpus")),
    "token_recycling": LookupSpec(name="token_recycling", sources=("recycled",)),
}


def baseline_specs(names) -> dict[str, LookupSpec]:
    unknown = [name for name in names if name not in BASELINES]
    if unknown:
        raise ValueError(f"eval.baselines: {unknown} unknown; choose from {sorted(BASELINES)} (or [] for none)")
    return {name: BASELINES[name] for name in names}


class NgramTable:
    """suffix (tuple of 1..max_ngram tokens) -> {next token: [count, last position seen]}."""

    def __init__(self, max_ngram: int) -> None:
        self.max_ngram = max_ngram
        self.next: dict[tuple[int, ...], dict[int, list[int]]] = defaultdict(dict)

    def add(self, tokens: list[int], start: int, end: int, counted=None) -> None:
        """Count the continuations tokens[i] for i in [start, end) after each suffix ending at i - 1;
        `counted(i)` says whether position i's token counts (default: all)."""
        for i in range(max(start, 1), end):
            if counted is not None and not counted(i):
                continue
            for n in range(1, min(self.max_ngram, i) + 1):
                entry = self.next[tuple(tokens[i - n: i])].setdefault(tokens[i], [0, 0])
                entry[0] += 1
                entry[1] = i

    def prune(self, min_count: int) -> None:
        for suffix in list(self.next):
            kept = {t: e for t, e in self.next[suffix].items() if e[0] >= min_count}
            if kept:
                self.next[suffix] = kept
            else:
                del self.next[suffix]

    def candidates(self, context: list[int], n: int) -> dict[int, list[int]] | None:
        return self.next.get(tuple(context[-n:])) if len(context) >= n else None

    def as_json(self) -> list:
        return [[list(suffix), [[t, c, p] for t, (c, p) in nexts.items()]] for suffix, nexts in self.next.items()]

    @classmethod
    def from_json(cls, max_ngram: int, rows: list) -> NgramTable:
        table = cls(max_ngram)
        for suffix, nexts in rows:
            table.next[tuple(suffix)] = {t: [c, p] for t, c, p in nexts}
        return table


class LookupDrafter:
    """A built lookup drafter: its spec, the corpus table (if `corpus` is a source) and the vocabulary size."""

    def __init__(self, spec: LookupSpec, vocab_size: int, corpus: NgramTable | None = None) -> None:
        if "corpus" in spec.sources and corpus is None:
            raise ValueError(f"lookup drafter {spec.name!r} reads the corpus but was given no table: build it from "
                             f"data_gen records (models.lookup.build_lookup_drafter(..., token_lists=...))")
        self.spec, self.vocab_size, self.corpus = spec, vocab_size, corpus
        self.recycled = torch.full((vocab_size, spec.recycle_k), -1, dtype=torch.long)  # -1: nothing yet

    def forget(self) -> None:
        """Empty the recycled table (it otherwise keeps what the target showed it on earlier prompts)."""
        self.recycled.fill_(-1)

    def eval(self) -> LookupDrafter:
        return self

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        payload = {"spec": asdict(self.spec), "vocab_size": self.vocab_size,
                   "corpus": self.corpus.as_json() if self.corpus is not None else None}
        (folder / CONFIG_FILE).write_text(json.dumps(payload))
        return folder


def build_lookup_drafter(spec: LookupSpec, vocab_size: int, token_lists=None, masks=None) -> LookupDrafter:
    """`token_lists`: sequences whose continuations the corpus table counts; `masks` (same shapes, optional): only
    positions with mask 1 (answer tokens) count as continuations."""
    corpus = None
    if "corpus" in spec.sources:
        if not token_lists:
            raise ValueError(f"lookup drafter {spec.name!r} reads the corpus, which needs this run's data_gen "
                             f"records: run data_gen first, or use sources=[prompt]")
        corpus = NgramTable(spec.max_ngram)
        for index, tokens in enumerate(token_lists):
            mask = masks[index] if masks is not None else None
            corpus.add(list(tokens), 1, len(tokens), None if mask is None else mask.__getitem__)
        corpus.prune(spec.min_count)
    return LookupDrafter(spec, vocab_size, corpus)


def load_lookup_drafter(folder: Path) -> LookupDrafter:
    saved = json.loads((Path(folder) / CONFIG_FILE).read_text())
    spec = LookupSpec(**saved["spec"])
    corpus = NgramTable.from_json(spec.max_ngram, saved["corpus"]) if saved["corpus"] is not None else None
    return LookupDrafter(spec, saved["vocab_size"], corpus)


def _ranked(found: dict[int, list[int]]) -> dict[int, float]:
    """Candidates' scores: how often each followed, the most recent occurrence breaking ties."""
    latest = max(position for _, position in found.values()) or 1
    return {token: count + 0.5 * position / (latest + 1) for token, (count, position) in found.items()}


def prompt_lookup_hits(tokens: list[int], spec: LookupSpec | None = None) -> list[bool]:
    """hits[i]: prompt lookup (`spec`, default the `prompt_lookup` baseline) on tokens[:i] alone guesses tokens[i]
    first, as the decoder's lookup drafter would with that context (its own prompt and answer so far)."""
    spec = spec or BASELINES["prompt_lookup"]
    table = NgramTable(spec.max_ngram)
    hits = [False] * len(tokens)
    for i in range(1, len(tokens)):
        table.add(tokens, i - 1, i)  # every continuation before position i
        for n in range(min(spec.max_ngram, i), spec.min_ngram - 1, -1):
            found = table.next.get(tuple(tokens[i - n: i]))
            if found:
                scores = _ranked(found)
                hits[i] = max(scores, key=scores.get) == tokens[i]
                break
    return hits


class LookupDraft(DraftDefaults):
    """The decoder's view of a lookup drafter. It keeps, per row, an n-gram index of the committed tokens (updated
    as they are committed) and the context of every node drafted this step (the committed tokens plus the path to
    it), and answers each `catch_up` / `extend` with candidate logits for the next token of each node."""

    needs_features = False
    abstains = True  # all -inf logits: no guess, nothing to verify

    def __init__(self, drafter: LookupDrafter, device: torch.device | str = "cpu") -> None:
        self.drafter, self.device = drafter, torch.device(device)
        self.observes = "recycled" in drafter.spec.sources  # shown the target's logits of every verified block

    def reset(self) -> None:
        """Forget what earlier decoding taught it (the recycled table): the eval calls this after its warm-up."""
        self.drafter.forget()

    def observe(self, tokens: torch.Tensor, logits: torch.Tensor) -> None:
        """tokens [rows, w] just scored by the target, logits [rows, w, V] its scores of what follows each."""
        top = logits.topk(self.drafter.spec.recycle_k, dim=-1).indices.reshape(-1, self.drafter.spec.recycle_k)
        self.drafter.recycled[tokens.reshape(-1).cpu()] = top.cpu()

    def start(self, rows: int, capacity: int) -> None:
        self.seen = [NgramTable(self.drafter.spec.max_ngram) for _ in range(rows)]
        self.indexed = [0] * rows   # tokens of each row already in its index
        self.sequences: list[list[int]] = [[] for _ in range(rows)]
        self.frontier: list[list[list[int]]] = [[[]] for _ in range(rows)]  # per row: drafted path of each node

    def _scores(self, row: int, path: list[int]) -> dict[int, float]:
        context = self.sequences[row] + path
        spec = self.drafter.spec
        for n in range(spec.max_ngram, spec.min_ngram - 1, -1):
            for source in spec.sources:
                if source == "recycled":
                    if n > 1:
                        continue  # a 1-gram source: it keys on the last token only
                    ranked = self.drafter.recycled[context[-1]].tolist()
                    found = {t: [len(ranked) - rank, 0] for rank, t in enumerate(ranked) if t >= 0}
                else:
                    table = self.seen[row] if source == "prompt" else self.drafter.corpus
                    found = table.candidates(context, n)
                if found:
                    return _ranked(found)
        return {}

    def _logits(self, paths: list[list[list[int]]]) -> torch.Tensor:
        width = max(map(len, paths))
        logits = torch.full((len(paths), width, self.drafter.vocab_size), float("-inf"))
        for row, row_paths in enumerate(paths):
            for column, path in enumerate(row_paths):
                scores = self._scores(row, path)
                if scores:
                    tokens = torch.tensor(list(scores))
                    logits[row, column, tokens] = torch.tensor([math.log(s) for s in scores.values()])
        return logits.to(self.device)

    def catch_up(self, sequences: list[list[int]], features: torch.Tensor | None) -> torch.Tensor:
        for row, sequence in enumerate(sequences):
            self.seen[row].add(sequence, self.indexed[row], len(sequence))
            self.indexed[row] = len(sequence)
        self.sequences = [list(sequence) for sequence in sequences]
        self.frontier = [[[]] for _ in sequences]
        return self._logits(self.frontier)[:, 0]

    def extend(self, tokens: torch.Tensor, parents: list[int], local: torch.Tensor, relative: torch.Tensor,
               offset: int) -> torch.Tensor:
        drafted = tokens.tolist()
        self.frontier = [[row_frontier[parent] + [token] for parent, token in zip(parents, row_tokens)]
                         for row_frontier, row_tokens in zip(self.frontier, drafted)]
        return self._logits(self.frontier)

    def commit(self, accepted: list[int], fed_drafts: int) -> None:
        pass  # the next catch_up indexes what was committed

    def keep_rows(self, rows: list[int]) -> None:
        self.seen = [self.seen[row] for row in rows]
        self.indexed = [self.indexed[row] for row in rows]
        self.sequences = [self.sequences[row] for row in rows]
        self.frontier = [self.frontier[row] for row in rows]


class _LookupPair(DraftDefaults):
    """A lookup drafter and a trained one decoded together: the decoder sees the trained drafter's needs (features,
    few-row kernels) and both keep their state through every step."""

    def __init__(self, lookup: LookupDraft, trained) -> None:
        self.lookup, self.trained = lookup, trained
        self.needs_features = trained.needs_features
        self.feature_layers = trained.feature_layers
        self.networks = trained.networks  # the decoder's few-row kernels apply as they would alone
        self.device = lookup.device
        self.observes = lookup.observes

    def observe(self, tokens: torch.Tensor, logits: torch.Tensor) -> None:
        self.lookup.observe(tokens, logits)

    def reset(self) -> None:
        self.lookup.reset()
        self.trained.reset()

    def start(self, rows: int, capacity: int) -> None:
        self.lookup.start(rows, capacity)
        self.trained.start(rows, capacity)

    def commit(self, accepted: list[int], fed_drafts: int) -> None:
        self.lookup.commit(accepted, fed_drafts)
        self.trained.commit(accepted, fed_drafts)

    def keep_rows(self, rows: list[int]) -> None:
        self.lookup.keep_rows(rows)
        self.trained.keep_rows(rows)


class LookupFirstDraft(_LookupPair):
    """A lookup drafter in front of a trained one (`eval.hybrid`): at every node where the lookup has a guess, its
    candidates rank above everything the trained drafter proposes (in their own order); where it has none, the
    trained drafter's distribution is used unchanged. Both see every committed and drafted token, so either can
    take over at any node; the trained drafter runs its forwards at every node as it would alone, so the pair costs
    what the trained drafter costs. Greedy drafting takes the lookup's guess when there is one, a tree's top-k mixes
    both, and sampled decoding samples from the combined distribution (lossless: the acceptance rule holds for any
    q). Prompt lookup is strongest where the answer repeats the prompt (code edits, summaries) and a trained
    drafter where it does not, so the pair can beat both."""

    abstains = False

    @staticmethod
    def _combine(guesses: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Lookup logits (log scores >= 0, -inf: no guess) placed above the trained drafter's best logit."""
        guesses = guesses.to(logits.device)
        floor = logits.max(-1, keepdim=True).values + 1.0
        return torch.where(torch.isfinite(guesses), floor + guesses, logits)

    def catch_up(self, sequences: list[list[int]], features: torch.Tensor | None) -> torch.Tensor:
        return self._combine(self.lookup.catch_up(sequences, None), self.trained.catch_up(sequences, features))

    def extend(self, tokens: torch.Tensor, parents: list[int], local: torch.Tensor, relative: torch.Tensor,
               offset: int) -> torch.Tensor:
        return self._combine(self.lookup.extend(tokens, parents, local, relative, offset),
                             self.trained.extend(tokens, parents, local, relative, offset))


def child_of(tokens: list[int], parents: list[int], node: int, token: int) -> int | None:
    """In a token tree (node 0 the root, node i > 0 holding tokens[i-1] below parents[i-1]): the child of `node`
    that holds `token`, or None."""
    return next((i + 1 for i, (t, p) in enumerate(zip(tokens, parents)) if p == node and t == token), None)


def chain_nodes(tokens: list[int], parents: list[int], chain: list[int]) -> list[int]:
    """The nodes of a merged tree (`eval.decoder.merge_proposals`' form) that hold the lookup's `chain`, in order."""
    nodes, node = [], 0
    for token in chain:
        node = child_of(tokens, parents, node, token)
        nodes.append(node)
    return nodes


class DrafterGate:
    """Whether a merged tree's trained drafter is worth running this step (`eval.merged_skip_at=auto`), priced from
    what it brought before: per length L of the lookup's guess, the drafter's gain in steps where it ran (the
    accepted path's depth beyond the part it shares with the lookup's branch, which is what the lookup alone would
    have got) against its cost in tokens (its forwards' seconds over a verification's, timed in runs that follow a
    run, since one after skipped steps also catches up on theirs; times the tokens a step yields at L without it).
    Each length is tried `warmup` times first, and a length it skips is still tried every `explore`-th time, so an
    estimate that was unlucky early recovers. The decision only chooses what is drafted: every output is still the
    target's."""

    def __init__(self, depth: int, warmup: int = 8, explore: int = 8) -> None:
        if warmup < 1 or explore < 1:
            raise ValueError(f"a drafter gate needs warmup >= 1 and explore >= 1 (got {warmup}, {explore})")
        self.warmup, self.explore = warmup, explore
        self.gain = [[0.0, 0] for _ in range(depth + 1)]  # per lookup length: drafter's extra tokens, steps it ran
        self.alone = [[0.0, 0] for _ in range(depth + 1)]  # per lookup length: tokens the lookup's branch gave
        self.skipped = [0] * (depth + 1)
        self.seconds = {"drafter": 0.0, "runs": 0, "target": 0.0, "steps": 0}  # runs: those right after a run
        self.ran_last = False

    def _cost(self) -> float:
        """The drafter's seconds per run over the target's per verification."""
        s = self.seconds
        return (s["drafter"] / s["runs"]) / (s["target"] / s["steps"]) if s["runs"] and s["steps"] else 0.0

    def _worth(self, length: int) -> bool:
        total, runs = self.gain[length]
        if runs < self.warmup:
            return True
        gained, steps = self.alone[length]
        return total / runs > self._cost() * (1 + gained / max(steps, 1))

    def wanted(self, chains: list[list[int]]) -> bool:
        lengths = {len(chain) for chain in chains}
        if any(self._worth(length) for length in lengths):
            return True
        for length in lengths:
            self.skipped[length] += 1
        return any(self.skipped[length] % self.explore == 0 for length in lengths)

    def record(self, chains: list[list[int]], proposals: list[tuple[list[int], list[int]]],
               paths: list[list[int]], ran: bool, drafter_seconds: float, target_seconds: float) -> None:
        """One verified step: per row its lookup chain, merged tree, accepted path (nodes), and the step's times."""
        self.seconds["target"] += target_seconds
        self.seconds["steps"] += 1
        if ran and self.ran_last:  # a run after a skipped step catches up on several steps' tokens: not its price
            self.seconds["drafter"] += drafter_seconds
            self.seconds["runs"] += 1
        self.ran_last = ran
        for chain, (tokens, parents), path in zip(chains, proposals, paths):
            lookup = chain_nodes(tokens, parents, chain)
            shared = next((i for i, (a, b) in enumerate(zip(path, lookup)) if a != b), min(len(path), len(lookup)))
            self.alone[len(chain)][0] += shared
            self.alone[len(chain)][1] += 1
            if ran:
                self.gain[len(chain)][0] += len(path) - shared
                self.gain[len(chain)][1] += 1

    def summary(self) -> dict:
        """Per lookup length: steps the drafter ran, its mean gain there, steps it was priced out (explored or not);
        and its measured cost."""
        return {"cost": round(self._cost(), 4), "lengths": {
            length: {"ran": runs, "gain": round(total / runs, 4) if runs else None,
                     "priced_out": self.skipped[length]}
            for length, (total, runs) in enumerate(self.gain)}}


class MergedDraft(_LookupPair):
    """A lookup and a trained drafter proposing one merged token tree per step (`eval.merged`; the decoder's
    `_merged_step`): the lookup's greedy continuation, up to `depth` tokens, beside the trained drafter's own tree
    (`eval.decode.tree`, or its γ chain), one node for both where they agree (SpecInfer's merged token tree). The trained
    drafter runs its forwards on its own nodes only, never on the lookup's; in a step where the lookup's
    continuation is at least `skip_at` tokens long (0: never) it does not run at all, and its next catch-up reads
    the target's features of everything committed meanwhile. The decoder verifies the merged tree in one forward
    with the general-tree rule (greedy: the deepest matching path; sampled: every node's children in turn), so the
    output is the target's, whichever branch it came from."""

    merged = True
    abstains = False

    def __init__(self, lookup: LookupDraft, trained, depth: int = 4, skip_at: int | str = 0,
                 shape: tuple[int, ...] = (), min_probability: float = 0.0) -> None:
        """`skip_at`: the lookup guess length from which the drafter sits a step out (0: never; "auto": wherever
        its measured gain is worth less than its measured cost, `DrafterGate`); `shape`: the trained drafter's own
        top-k branching per depth (empty: the decode settings' tree, else their γ chain); `min_probability`: its
        nodes whose path probability is lower are not verified, and it drafts no deeper once none is left
        (`eval.decoder.draft_pruned`)."""
        if (depth < 1 or (skip_at != "auto" and (isinstance(skip_at, str) or skip_at < 0))
                or any(k < 1 for k in shape) or not 0 <= min_probability < 1):
            raise ValueError(f"a merged tree needs a lookup depth >= 1 (got {depth}), skip_at >= 0 or 'auto' (got "
                             f"{skip_at!r}), at least one child per depth of the drafter's shape (got {list(shape)}) "
                             f"and min_probability in [0, 1) (got {min_probability})")
        super().__init__(lookup, trained)
        self.depth, self.skip_at, self.shape, self.min_probability = depth, skip_at, tuple(shape), min_probability
        self.gate = DrafterGate(depth) if skip_at == "auto" else None

    def reset(self) -> None:
        super().reset()
        if self.gate is not None:  # prices learnt in a warm-up are dropped with the rest of its state
            self.gate = DrafterGate(self.depth)

    def drafter_branching(self, tree: tuple[int, ...], gamma: int) -> tuple[int, ...]:
        """The trained drafter's own part: its `shape`, else the decode settings' `tree`, else their γ chain."""
        return self.shape or tuple(tree) or (1,) * gamma

    def lookup_chains(self, sequences: list[list[int]]) -> list[list[int]]:
        """Per row, the lookup's greedy continuation: up to `depth` tokens, ending where it has no guess."""
        logits = self.lookup.catch_up(sequences, None)
        chains: list[list[int]] = [[] for _ in sequences]
        alive = [True] * len(sequences)
        for i in range(self.depth):
            best = logits.max(-1)
            for row, (found, token) in enumerate(zip(torch.isfinite(best.values).tolist(), best.indices.tolist())):
                alive[row] = alive[row] and found
                if alive[row]:
                    chains[row].append(token)
            if not any(alive) or i + 1 == self.depth:
                break
            logits = self.lookup.extend(best.indices[:, None], [0], torch.ones(1, i + 1, dtype=torch.bool),
                                        torch.tensor([i]), i)[:, 0]
        return chains

    def drafter_needed(self, chains: list[list[int]]) -> bool:
        """Whether the trained drafter runs this step: unless every row's lookup guess reaches `skip_at` tokens, or
        with `skip_at="auto"` unless the gate prices it out for every row."""
        if self.gate is not None:
            return self.gate.wanted(chains)
        return not self.skip_at or any(len(chain) < self.skip_at for chain in chains)
