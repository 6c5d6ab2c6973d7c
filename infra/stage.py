"""What every stage function gets besides its own typed settings: `StageRun`.

A stage is a plain function in its own module, `run_stage(run: StageRun, **settings) -> dict` (its summary),
registered in the stage table (`train/pipeline/stages.py`); the runner (`train/pipeline/runner.py`) builds the typed
settings from the config, the `StageRun`, and the run directory around each call.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from infra.rundir import StageDir, git_commit
from infra.tracking import Tracker


@dataclass
class StageRun:
    stage: str
    out_dir: Path             # `<stage>.partial/`: everything this stage writes goes here
    run_dir: Path             # `runs/<experiment>/<run_name>/`, where earlier stages' outputs are
    cache_dir: Path           # downloads and dequantized weights, shared by runs
    tracker: Tracker
    config: dict              # the resolved config of the whole run
    target_identity: dict     # name + sha256 of the target's weights
    load_target: Callable[[], Any] = field(repr=False)  # the target, loaded once per process and shared by stages
    resume: str = "auto"      # training stages: continue from the newest checkpoint (auto) or start over (never)
    worker: Any = None        # data_gen: which slice of the shards this process makes (WorkerSettings)

    def target(self):
        """The target model and tokenizer (`models.loading.LoadedModel`), loaded on first use."""
        return self.load_target()

    def output(self, stage: str) -> Path | None:
        """The folder of an earlier stage of this run if it finished, else None."""
        final = StageDir(self.run_dir, stage).final
        return final if (final / "meta.json").exists() else None

    def require(self, stage: str) -> Path:
        found = self.output(stage)
        if found is None:
            raise FileNotFoundError(f"{self.stage} needs the {stage} output in {self.run_dir / stage}; add {stage} "
                                    f"to stages (stages=[{stage},{self.stage}])")
        return found

    @property
    def provenance(self) -> dict:
        """What every output records about how it was made: resolved config, git commit, target identity."""
        return {"config": self.config, "git_commit": git_commit(), "target": self.target_identity}
