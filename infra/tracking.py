"""Experiment tracking through the real `wandb` library: offline by default, online when configured.

Online mode reads the API key from wandb's own login (`wandb login`) or the WANDB_API_KEY environment variable;
draftsmith never copies it into configs, logs or run directories.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from infra.settings import check_fields

BACKENDS = ("wandb", "none")
MODES = ("offline", "online", "disabled")


@dataclass(frozen=True)
class LoggerSettings:
    SECTION: ClassVar[str] = "logger"
    backend: str = "wandb"
    mode: str = "offline"
    project: str = "draftsmith"
    entity: str | None = None

    def __post_init__(self) -> None:
        check_fields(self)
        if self.backend not in BACKENDS or self.mode not in MODES:
            raise ValueError(f"logger.backend must be one of {BACKENDS} and logger.mode one of {MODES}, "
                             f"got {self.backend!r}/{self.mode!r}")


class Tracker:
    """One W&B run per stage, grouped by `<experiment>/<run_name>`. With backend none it only remembers."""

    def __init__(self, settings: LoggerSettings, run_dir: Path, stage: str, config: dict) -> None:
        self.history: list[dict] = []
        self._run = None
        if settings.backend == "wandb" and settings.mode != "disabled":
            import wandb

            group = f"{run_dir.parent.name}/{run_dir.name}"
            self._run = wandb.init(project=settings.project, entity=settings.entity, mode=settings.mode,
                                   dir=str(run_dir), group=group, name=f"{group}/{stage}", job_type=stage,
                                   config=config, reinit="finish_previous")

    def log(self, metrics: dict, step: int | None = None) -> None:
        self.history.append({"step": step, **metrics})
        if self._run is not None:
            self._run.log(metrics, step=step)

    def table(self, key: str, columns: list[str], rows: list[list]) -> None:
        if self._run is not None:
            import wandb

            self._run.log({key: wandb.Table(columns=columns, data=rows)})

    def finish(self, summary: dict) -> None:
        if self._run is not None:
            self._run.summary.update(summary)
            self._run.finish()
            self._run = None
