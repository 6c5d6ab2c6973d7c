"""Sampling semantics shared by every generator in draftsmith (data_gen backends now, the decoder later).

Temperature 0 means greedy. Otherwise logits are divided by the temperature, then top-k, then top-p (nucleus)
filtering are applied, in that order, as vLLM and transformers do. Each request carries its own seed, so what a
prompt gets does not depend on which other prompts share its batch, on the shard it lands in, or on a restart.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    max_new_tokens: int = 256

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 = off)")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")

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


def choose_tokens(logits: torch.Tensor, settings: SamplingSettings,
                  generators: list[torch.Generator] | None) -> torch.Tensor:
    """Next token per row of [rows, vocab] logits; row i draws from generators[i] when sampling."""
    if settings.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(warp_logits(logits, settings), dim=-1).cpu()
    return torch.stack([torch.multinomial(row, 1, generator=generator)[0]
                        for row, generator in zip(probs, generators)]).to(logits.device)


def make_generator(seed: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator
