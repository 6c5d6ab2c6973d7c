"""AdamW (or Muon over the weight matrices with AdamW over the rest) with linear warmup then cosine decay to 10% of the
peak rate; shared by pretrain, distill and online."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from infra.settings import Rule, at_least, between, check_fields, one_of, positive

# 2D parameters left to AdamW under Muon (embeddings and vocabulary heads, following Muon's authors and speculators)
NOT_MUON = ("embed", "lm_head", "head.")


@dataclass(frozen=True)
class OptimSettings:
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 10
    grad_clip: float = 1.0
    min_lr_ratio: float = 0.1
    # name=muon: torch.optim.Muon over the 2D weight matrices (embeddings and vocabulary heads excepted), AdamW
    # (the settings above) over the rest, as speculators' default; muon_lr null = lr; its update RMS matched to
    # AdamW's (match_rms_adamw) so one learning rate suits both
    name: str = "adamw"
    muon_lr: float | None = None
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.1
    muon_adjust_lr_fn: str = "match_rms_adamw"
    LIMITS: ClassVar[dict] = {"lr": positive, "weight_decay": at_least(0), "warmup_steps": at_least(0),
                              "grad_clip": positive, "min_lr_ratio": between(0, 1), "name": one_of("adamw", "muon"),
                              "muon_lr": Rule("must be a finite number > 0 (or null: lr)",
                                              lambda v: math.isfinite(v) and v > 0, none_ok=True),
                              "muon_momentum": between(0, 1), "muon_weight_decay": at_least(0),
                              "muon_adjust_lr_fn": one_of("match_rms_adamw", "original"),
                              "betas": Rule("must be two numbers in [0, 1)",
                                            lambda betas: all(0 <= b < 1 for b in betas))}

    def __post_init__(self) -> None:
        check_fields(self)


class MuonAdamW(torch.optim.Optimizer):
    """Muon over the weight matrices and AdamW over the rest, stepped, scheduled and saved as one optimizer: its
    param_groups are the two parts' own (one schedule scales each group's rate), its state dict holds both."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer) -> None:
        self.muon, self.adamw = muon, adamw
        super().__init__(muon.param_groups + adamw.param_groups, {})

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MuonAdamW.step takes no closure")
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        if set(state_dict) != {"muon", "adamw"}:
            raise ValueError(f"an optimizer state with {sorted(state_dict)}, not Muon + AdamW's: the checkpoint was "
                             f"saved with another optim.name")
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        self.param_groups = self.muon.param_groups + self.adamw.param_groups  # loading made new group dicts


def build_optimizer(model: torch.nn.Module, settings: OptimSettings, total_steps: int):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    matrices = [p for n, p in named if p.dim() == 2 and min(p.shape) > 1 and not any(h in n for h in NOT_MUON)]
    to_muon = {id(p) for p in matrices} if settings.name == "muon" else set()
    decay = [p for n, p in named if p.dim() >= 2 and id(p) not in to_muon]
    no_decay = [p for n, p in named if p.dim() < 2]
    # the fused kernel (CPU and CUDA since torch 2.4) is one pass over the parameters instead of several
    groups = [g for g in ({"params": decay, "weight_decay": settings.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"] or not to_muon]
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, betas=tuple(settings.betas), fused=True)
    if to_muon:
        muon = torch.optim.Muon(matrices, lr=settings.muon_lr or settings.lr, momentum=settings.muon_momentum,
                                weight_decay=settings.muon_weight_decay, adjust_lr_fn=settings.muon_adjust_lr_fn)
        optimizer = MuonAdamW(muon, optimizer)

    def scale(step: int) -> float:
        if step < settings.warmup_steps:
            return (step + 1) / settings.warmup_steps
        progress = min(1.0, (step - settings.warmup_steps) / max(1, total_steps - settings.warmup_steps))
        return settings.min_lr_ratio + (1 - settings.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, scale)
