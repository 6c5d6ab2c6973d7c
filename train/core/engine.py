"""How an optimizer step is taken: plain PyTorch in one process, or DeepSpeed ZeRO 0-3 over many.

Both engines take the same calls from a training loop, so pretrain and distill have one loop each:

    outputs = engine.forward(*inputs)  # the training forward (default: the model's logits at loss positions)
    engine.backward(loss_share)   # once per micro-batch; loss_share = this micro-batch's part of the global mean
    grad_norm = engine.step()     # once per optimizer step: clip, update, schedule, zero the gradients
    engine.save(folder) / engine.load(folder)

A loss share is the micro-batch's loss times its fraction of the optimizer step's loss positions (over all
micro-batches and ranks), so the summed gradient is exactly that of the mean over the whole step, whatever the
split. DeepSpeed divides by the number of ranks and of accumulation steps itself, which `backward` undoes.
The training forward is a module (`LogitsAt(model)` for a causal LM, the drafter itself for a feature drafter)
so that DeepSpeed sees every forward pass; its parameters are the model's.
"""
from __future__ import annotations

import contextlib
import copy
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import torch

from infra import distributed
from infra.settings import SettingsError, check_fields
from models.loading import check_safetensors
from train.core.optim import OptimSettings, build_optimizer

STAGES = (0, 1, 2, 3)


@dataclass(frozen=True)
class DeepSpeedSettings:
    """`conf/deepspeed/*.yaml`. enabled=false trains with plain PyTorch. `config` is a DeepSpeed config; the
    batch sizes, accumulation and clipping are filled in from the stage's own settings so they cannot disagree."""
    SECTION: ClassVar[str] = "deepspeed"
    enabled: bool = False
    stage: int = 0
    bf16: bool = False
    offload_optimizer: bool = False
    config: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_fields(self)
        if self.stage not in STAGES:
            raise ValueError(f"deepspeed.stage={self.stage} is not one of {STAGES}")

    def ds_config(self, micro_batch: int, accumulation: int, grad_clip: float) -> dict:
        zero = {"stage": self.stage}
        if self.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu"}
        config = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": accumulation,
                  "gradient_clipping": grad_clip, "zero_optimization": zero, "bf16": {"enabled": self.bf16},
                  "zero_force_ds_cpu_optimizer": False, "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}
        return _merge(config, copy.deepcopy(self.config))


def logits_at(model: torch.nn.Module, input_ids: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor,
              position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """LM-head logits [1, N, V] at the N `positions` only: prompt positions never reach the vocabulary projection,
    which is most of a small drafter's cost and a fifth of the target's. `attention` is a [B, T] padding mask or a
    [B, 1, T, T] boolean mask (packed documents). A drafter with a reduced draft vocabulary gives its compact
    [1, N, V_draft] logits (`models.drafter.ReducedVocabHead`)."""
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention,
                                 position_ids=position_ids).last_hidden_state
    head = model.get_output_embeddings()
    logits = getattr(head, "compact", head)(hidden[positions])
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return logits.unsqueeze(0)


class LogitsAt(torch.nn.Module):
    """`logits_at` as a module's forward, so DeepSpeed sees every training forward pass: ZeRO-3 counts
    micro-batches in its engine's forward, and without that it overwrites accumulated gradients."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        return logits_at(self.model, input_ids, attention, positions, position_ids)


def _merge(base: dict, override: dict) -> dict:
    for key, value in override.items():
        base[key] = _merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return base


class PlainEngine:
    def __init__(self, model: torch.nn.Module, optim: OptimSettings, total_steps: int,
                 forward: torch.nn.Module) -> None:
        self.module, self.forward_module = model, forward
        self.optimizer, self.scheduler = build_optimizer(model, optim, total_steps)
        self.grad_clip = optim.grad_clip

    def forward(self, *inputs):
        return self.forward_module(*inputs)

    def backward(self, loss_share: torch.Tensor) -> None:
        loss_share.backward()

    def step(self) -> float:
        grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_model

        save_model(self.module, str(folder / "model.safetensors"))  # handles tied weights
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                   folder / "optimizer.pt")

    def load(self, folder: Path) -> None:
        from safetensors.torch import load_model

        check_safetensors(folder / "model.safetensors")
        load_model(self.module, str(folder / "model.safetensors"), device=str(next(self.module.parameters()).device))
        state = torch.load(folder / "optimizer.pt", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def full_parameters(self):
        """Context in which every parameter is whole (a no-op here; ZeRO-3 gathers)."""
        return contextlib.nullcontext()

    def close(self) -> None:
        """Nothing to release (DeepSpeed's engine has hooks and buffers; see DeepSpeedEngine.close)."""


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file that would need arbitrary code to unpickle."""


class DeepSpeedEngine:
    """DeepSpeed's engine around the same AdamW + warmup-cosine schedule as `PlainEngine`."""

    def __init__(self, model: torch.nn.Module, optim: OptimSettings, total_steps: int, settings: DeepSpeedSettings,
                 micro_batch: int, accumulation: int, forward: torch.nn.Module) -> None:
        import deepspeed

        if optim.name == "muon":
            raise SettingsError("optim.name=muon: DeepSpeed's ZeRO flattens the weight matrices Muon orthogonalizes; "
                                "use optim.name=adamw with deepspeed.enabled=true", "optim.name")
        distributed.init()
        optimizer, scheduler = build_optimizer(model, optim, total_steps)
        self.config = settings.ds_config(micro_batch, accumulation, optim.grad_clip)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=forward, optimizer=optimizer, lr_scheduler=scheduler, config=self.config)
        self.module, self.stage = model, settings.stage
        self.scale = distributed.world_size() * accumulation

    def forward(self, *inputs):
        return self.engine(*inputs)

    def backward(self, loss_share: torch.Tensor) -> None:
        self.engine.backward(loss_share * self.scale)
        self.engine.step()  # DeepSpeed counts micro-batches and updates only at the accumulation boundary

    def step(self) -> float:
        grad_norm = self.engine.get_global_grad_norm()
        return float(grad_norm) if grad_norm is not None else float("nan")

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, folder: Path) -> None:
        self.engine.save_checkpoint(str(folder), tag="deepspeed")

    def load(self, folder: Path) -> None:
        try:
            with weights_only_loads():
                path, _ = self.engine.load_checkpoint(str(folder), tag="deepspeed", load_optimizer_states=True,
                                                      load_lr_scheduler_states=True)
        except pickle.UnpicklingError as error:
            reason = next((line for line in str(error).splitlines() if "GLOBAL" in line or "Unsupported" in line),
                          str(error).splitlines()[0])
            raise UnsafeCheckpointError(
                f"{folder / 'deepspeed'}: refused to unpickle a file holding a type outside DeepSpeed's allow-list "
                f"(train.core.engine.DEEPSPEED_PICKLED_TYPES); such a file can run code when loaded. Remove that "
                f"checkpoint folder, or pass resume=never. ({reason.strip()})") from None
        if path is None:
            raise FileNotFoundError(f"{folder}: no DeepSpeed checkpoint (tag 'deepspeed') to resume from")

    def full_parameters(self):
        if self.stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None)

    def close(self) -> None:
        """Release ZeRO's hooks, buffers and optimizer state now, while the process group still exists, rather than
        leaving them to interpreter exit (a ZeRO-3 rank once aborted there: `terminate called without an active
        exception`)."""
        self.engine.destroy()


# The only non-tensor types DeepSpeed's ZeRO checkpoints pickle (torch.serialization.get_unsafe_globals_in_checkpoint
# on ZeRO-1/2/3 checkpoints of deepspeed 0.19); anything else in a checkpoint is refused, not run.
DEEPSPEED_PICKLED_TYPES = (("deepspeed.utils.tensor_fragment", "fragment_address"),
                           ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
                           ("deepspeed.runtime.zero.config", "ZeroStageEnum"))


@contextlib.contextmanager
def weights_only_loads():
    """Inside, every `torch.load` unpickles with `weights_only=True` (DeepSpeed's own calls ask for False), allowing
    only `DEEPSPEED_PICKLED_TYPES`: a crafted checkpoint cannot run code on resume."""
    import importlib

    allowed = [getattr(importlib.import_module(module), name) for module, name in DEEPSPEED_PICKLED_TYPES]
    original = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    with torch.serialization.safe_globals(allowed):
        torch.load = load
        try:
            yield
        finally:
            torch.load = original


def save_weights(engine: PlainEngine | DeepSpeedEngine, folder: Path,
                 save: Callable[[torch.nn.Module, Path], object]) -> None:
    """The trained model saved by `save(model, folder)` (its kind's format, LoRA merged), written atomically by
    rank 0 with ZeRO-3 parameters gathered; every rank calls it."""
    with engine.full_parameters():
        if distributed.is_main():
            temporary = folder.with_name(folder.name + ".tmp")
            shutil.rmtree(temporary, ignore_errors=True)
            save(engine.module, temporary)
            shutil.rmtree(folder, ignore_errors=True)
            temporary.replace(folder)
    distributed.barrier()


def micro_batches(batch: list, accumulation: int) -> list[list]:
    """This rank's share of an optimizer step: `accumulation` micro-batches, each split evenly over ranks."""
    per_micro = len(batch) // accumulation
    chunks = [batch[i * per_micro: (i + 1) * per_micro] for i in range(accumulation)]
    world, rank = distributed.world_size(), distributed.rank()
    return [chunk[rank * len(chunk) // world: (rank + 1) * len(chunk) // world] for chunk in chunks]


def build_engine(model: torch.nn.Module, optim: OptimSettings, total_steps: int, deepspeed: DeepSpeedSettings,
                 micro_batch: int, accumulation: int,
                 forward: torch.nn.Module | None = None) -> PlainEngine | DeepSpeedEngine:
    """The engine that trains `model`; `forward` is the training forward (default `LogitsAt(model)`)."""
    forward = LogitsAt(model) if forward is None else forward
    if deepspeed.enabled:
        return DeepSpeedEngine(model, optim, total_steps, deepspeed, micro_batch, accumulation, forward)
    if distributed.world_size() > 1:
        raise ValueError(f"{distributed.world_size()} processes were launched but deepspeed is off: pass "
                         f"deepspeed=zero1 (or zero0/zero2/zero3) to train data-parallel")
    return PlainEngine(model, optim, total_steps, forward)
