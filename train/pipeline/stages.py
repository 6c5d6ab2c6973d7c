"""The stage table: the one place a stage is registered.

A stage is one module with a plain `run_stage(run: StageRun, settings=<its own section>, <other sections by name>)
-> dict` (its summary) and one conf group of the same name. Everything that needs to know the stages reads this
table: the runner (order, fingerprints, reuse, which stages a distributed launch may run), preflight (the checks
each stage needs), the SLURM pipeline (which job runs it) and the config tests (which groups must bind).

Adding a stage: its module, its conf group, and one `Stage` line below.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

JOB_KINDS = ("data_gen", "train", "run")  # the SLURM jobs, in the order they run (slurm/cluster.py)
CHECKS = ("data_gen", "training", "eval", "export")  # preflight's checks (train/pipeline/preflight.py)


@dataclass(frozen=True)
class Stage:
    module: str                # where its run_stage lives
    sections: tuple[str, ...]  # the config sections it reads: they (and its inputs') make its fingerprint
    inputs: tuple[str, ...]    # earlier stages whose outputs it reads
    job: str                   # the SLURM job that runs it (JOB_KINDS)
    checks: tuple[str, ...]    # what preflight runs before it (CHECKS)
    distributed: bool = False  # whether a torchrun/deepspeed launch may run it
    package: str | None = None  # the package that is the stage's own, when it has one (train/online/, export/)

    def __post_init__(self) -> None:
        assert self.job in JOB_KINDS and set(self.checks) <= set(CHECKS), self
        assert self.package is None or self.module.startswith(self.package + "."), self

    @property
    def home(self) -> str:
        """Where the stage lives: its package, else its module (what no other stage may import)."""
        return self.package or self.module

    @property
    def run(self) -> Callable[..., dict]:
        """The stage's `run_stage`, imported on first use (checking settings needs no stage imported)."""
        return importlib.import_module(self.module).run_stage


STAGES = {
    "data_gen": Stage("data_gen.generate", ("target", "data", "data_gen"), (), job="data_gen", checks=("data_gen",)),
    "pretrain": Stage("train.pretrain", ("target", "drafter", "corpus", "pretrain", "deepspeed"), (), job="train",
                      checks=("training",), distributed=True),
    "distill": Stage("train.distill", ("target", "drafter", "distill", "loss", "deepspeed", "corpus"),
                     ("data_gen", "pretrain"), job="train", checks=("training",), distributed=True),
    "eval": Stage("eval.speculative", ("target", "drafter", "eval_data", "eval"), ("pretrain", "distill"), job="run",
                  checks=("eval",)),
    "export": Stage("export.stage", ("target", "export"), ("eval", "pretrain", "distill"), job="run",
                    checks=("export",), package="export"),
    "online": Stage("train.online.stage", ("target", "online", "loss"), ("pretrain", "distill"), job="run",
                    checks=("training", "eval"), package="train.online"),
}
DISTRIBUTED_STAGES = tuple(name for name, stage in STAGES.items() if stage.distributed)
# the config sections no stage owns but every run reads
RUN_SECTIONS = ("logger", "cluster")


def job_stages(kind: str) -> tuple[str, ...]:
    """The stages the SLURM job `kind` runs, in running order."""
    return tuple(name for name, stage in STAGES.items() if stage.job == kind)


def sections() -> list[str]:
    """Every config section a stage or the run reads, each once."""
    return sorted({section for stage in STAGES.values() for section in stage.sections} | set(RUN_SECTIONS))
