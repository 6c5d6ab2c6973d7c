"""draftsmith's command: run the configured stages, in order, into `runs/<experiment>/<run_name>/<stage>/`.

    python train/run.py +experiment=smoke
    python train/run.py +experiment=quickstart stages=[eval] +eval.drafters.mine=/path/to/drafter
    python train/run.py -m +experiment=smoke loss=fkl,tvdpp        # a sweep: one run folder per point

A stage whose complete output already exists with the same settings is skipped; an interrupted one is redone.
This file only hands Hydra's config to the runner (`train/pipeline/runner.py`); the stages are registered in
`train/pipeline/stages.py`.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python train/run.py` from a checkout: make the top-level packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra
from omegaconf import DictConfig

from train.pipeline import runner


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(config: DictConfig) -> None:
    """A refused setting, a busy run folder or a read-only / full disk is one line and exit status 2; a stop on the
    cluster's warning signal, after its checkpoint, is one line and exit status 3 (`runner.main`)."""
    runner.main(config)


if __name__ == "__main__":
    main()
