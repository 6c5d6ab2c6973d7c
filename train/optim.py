"""AdamW with linear warmup then cosine decay to 10% of the peak rate; shared by pretrain and distill."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from infra.settings import Rule, at_least, between, check_fields, positive


@dataclass(frozen=True)
class OptimSettings:
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 10
    grad_clip: float = 1.0
    min_lr_ratio: float = 0.1
    LIMITS: ClassVar[dict] = {"lr": positive, "weight_decay": at_least(0), "warmup_steps": at_least(0),
                              "grad_clip": positive, "min_lr_ratio": between(0, 1),
                              "betas": Rule("must be two numbers in [0, 1)",
                                            lambda betas: all(0 <= b < 1 for b in betas))}

    def __post_init__(self) -> None:
        check_fields(self)


def build_optimizer(model: torch.nn.Module, settings: OptimSettings, total_steps: int):
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    # the fused kernel (CPU and CUDA since torch 2.4) is one pass over the parameters instead of several
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr,
                                  betas=tuple(settings.betas), fused=True)

    def scale(step: int) -> float:
        if step < settings.warmup_steps:
            return (step + 1) / settings.warmup_steps
        progress = min(1.0, (step - settings.warmup_steps) / max(1, total_steps - settings.warmup_steps))
        return settings.min_lr_ratio + (1 - settings.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, scale)
