"""The optimizers: AdamW, and Muon over the weight matrices with AdamW over the rest (speculators' default), stepped,
scheduled, saved and restored as one optimizer."""
from __future__ import annotations

import copy

import pytest
import torch

from infra.settings import SettingsError
from train.core.engine import DeepSpeedEngine, PlainEngine
from train.core.optim import MuonAdamW, OptimSettings, build_optimizer


class Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed_tokens = torch.nn.Embedding(16, 8)
        self.proj = torch.nn.Linear(8, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.head = torch.nn.Linear(8, 16, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(torch.relu(self.proj(self.embed_tokens(ids)))))


def loss_of(model: Toy) -> torch.Tensor:
    ids = torch.arange(16)
    return torch.nn.functional.cross_entropy(model(ids), (ids * 5 + 3) % 16)


def test_muon_takes_the_weight_matrices_and_adamw_the_rest():
    model = Toy()
    optimizer, _ = build_optimizer(model, OptimSettings(name="muon", muon_lr=0.02), 10)
    assert isinstance(optimizer, MuonAdamW)
    muon = {id(p) for g in optimizer.muon.param_groups for p in g["params"]}
    assert muon == {id(model.proj.weight)}  # embeddings and the vocabulary head stay with AdamW
    adamw = {id(p) for g in optimizer.adamw.param_groups for p in g["params"]}
    assert adamw == {id(p) for n, p in model.named_parameters() if n != "proj.weight"}
    assert [g["lr"] for g in optimizer.muon.param_groups] == [pytest.approx(0.02 / 10)]  # warm-up step 1 of 10
    plain, _ = build_optimizer(Toy(), OptimSettings(), 10)
    assert isinstance(plain, torch.optim.AdamW)


def test_muon_trains_and_resumes_exactly():
    settings = OptimSettings(name="muon", warmup_steps=2)
    model = Toy()
    engine = PlainEngine(model, settings, 20, model)
    start = float(loss_of(model).detach())
    for _ in range(6):
        engine.backward(loss_of(model))
        engine.step()
    assert float(loss_of(model).detach()) < start
    lrs = [g["lr"] for g in engine.optimizer.param_groups]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    saved = copy.deepcopy((engine.optimizer.state_dict(), engine.scheduler.state_dict()))  # as saved to disk
    again = Toy()
    again.load_state_dict(state)
    resumed = PlainEngine(again, settings, 20, again)
    resumed.optimizer.load_state_dict(saved[0])
    resumed.scheduler.load_state_dict(saved[1])
    assert [g["lr"] for g in resumed.optimizer.param_groups] == lrs
    for current in (engine, resumed):  # the same next step from the saved state
        current.backward(loss_of(current.module))
        current.step()
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    with pytest.raises(ValueError, match="another optim.name"):
        resumed.optimizer.load_state_dict(torch.optim.AdamW(again.parameters()).state_dict())


def test_bad_optimizer_settings_are_named():
    with pytest.raises(SettingsError, match="name='sgd'"):
        OptimSettings(name="sgd")
    with pytest.raises(SettingsError, match="muon_lr"):
        OptimSettings(name="muon", muon_lr=0.0)
    with pytest.raises(SettingsError, match="DeepSpeed"):
        DeepSpeedEngine(Toy(), OptimSettings(name="muon"), 10, None, 1, 1, Toy())
