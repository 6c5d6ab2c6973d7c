"""Stop cleanly when a cluster warns that the job's time is up, so that the requeued job carries on.

The SLURM scripts (slurm/*.sbatch) ask for `--signal=USR1@<seconds>`: SIGUSR1 that long before the time limit (and
`scancel --signal=USR1 JOB` sends the same by hand). `install()` turns the signal into a flag; the training loops
ask `requested()` at every step boundary, save a checkpoint there and raise `Preempted`; `train/run.py` exits with
`EXIT_CODE` and, on rank 0, touches the file named by DRAFTSMITH_PREEMPT_MARK (set by slurm/common.sh; torchrun
turns its workers' exit codes into its own), on which the script runs `scontrol requeue`. The requeued job resumes
from that checkpoint (`resume=auto`) exactly as from any other. data_gen stops between shards (committed shards
are kept).

In a multi-process launch the ranks must stop at the same step, so the flag is OR-ed over ranks (one small
collective per step). Without the signal nothing here changes what a run computes.
"""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

from infra import distributed

SIGNAL = signal.SIGUSR1
EXIT_CODE = 3  # the process checkpointed and stopped on the warning signal: requeue the job (2 is a refusal)

_flag = {"requested": False}


class Preempted(Exception):
    """Raised at a step boundary after the state needed to resume was saved."""


def _handler(signum, frame) -> None:
    _flag["requested"] = True


def install() -> None:
    """Catch SIGUSR1 from now on (main thread only; a no-op elsewhere)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(SIGNAL, _handler)


def requested() -> bool:
    """Whether any rank got the warning signal. Every rank must call this at the same step."""
    local = 1.0 if _flag["requested"] else 0.0
    return distributed.all_sum([local])[0] > 0


def mark(message: str) -> None:
    """Leave the job script the sign that this stop is a checkpointed one (see the module docstring)."""
    path = os.environ.get("DRAFTSMITH_PREEMPT_MARK")
    if path and distributed.is_main():
        Path(path).write_text(message + "\n")
