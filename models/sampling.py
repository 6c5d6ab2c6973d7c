"""Sampling, one definition for every generator in draftsmith: data_gen's backends, distill's on-policy answers,
the speculative decoder and its plain baseline.

`SamplingSettings` is nested wherever sampling is configured (`data_gen.sampling`, `eval.decode.sampling`,
`distill.on_policy.sampling`; `conf/sampling/*.yaml`). Temperature 0 means greedy. Otherwise logits are divided
by the temperature, then top-k, then top-p (nucleus) filtering are applied, in that order, as vLLM and
transformers do (`warp_logits`). One sampler draws the token (`draw`: an exponential race, exact for
unnormalised weights such as the decoder's residual distributions). Each request carries its own seed, so what
a prompt gets does not depend on which other prompts share its batch, on the shard it lands in, or on a restart.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import torch

from infra.settings import check_fields


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filter

    def __post_init__(self) -> None:
        check_fields(self)
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"sampling.top_k={self.top_k} must be >= 0 (0 = off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def as_dict(self) -> dict:
        return asdict(self)


def request_seed(base_seed: int, key: str) -> int:
    """A 63-bit seed for one request, a pure function of the run seed and the request's id."""
    digest = hashlib.sha256(f"{base_seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def warp_logits(logits: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """[rows, vocab] logits -> fp32 logits after temperature, top-k and top-p; filtered entries are -inf."""
    logits = logits.float() / settings.temperature
    if settings.top_k and settings.top_k < logits.shape[-1]:
        kth = torch.topk(logits, settings.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if settings.top_p < 1:
        ordered, order = torch.sort(logits, dim=-1, descending=True)
        mass_before = torch.softmax(ordered, dim=-1).cumsum(-1) - torch.softmax(ordered, dim=-1)
        drop = mass_before >= settings.top_p  # keep the smallest prefix whose mass reaches top_p (always >= 1)
        logits = logits.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    return logits


def draw(weights: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row of [rows, V] non-negative weights (no need to normalise), row i from generators[i]:
    argmax of w / E with E ~ Exp(1) i.i.d. picks token v with probability w_v / Σ w (an exponential race)."""
    noise = torch.stack([torch.empty(weights.shape[-1], device=g.device).exponential_(generator=g)
                         for g in generators]).to(weights.device)
    return (weights / noise).argmax(-1)


def choose_tokens(logits: torch.Tensor, settings: SamplingSettings,
                  generators: list[torch.Generator] | None) -> torch.Tensor:
    """Next token per row of [rows, vocab] logits: argmax when greedy, else a draw from the warped
    distribution, row i from generators[i]."""
    if settings.greedy:
        return logits.argmax(dim=-1)
    return draw(torch.softmax(warp_logits(logits, settings), dim=-1), generators)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def as_sampling(value: SamplingSettings | dict | None) -> SamplingSettings:
    """A nested `sampling` setting given as the dataclass, a plain mapping of its fields, or None (greedy)."""
    if value is None:
        return SamplingSettings()
    if isinstance(value, SamplingSettings):
        return value
    unknown = set(value) - set(SamplingSettings.__dataclass_fields__)
    if unknown:
        raise ValueError(f"sampling has no keys {sorted(unknown)}; it takes {sorted(SamplingSettings.__dataclass_fields__)}")
    return SamplingSettings(**value)
