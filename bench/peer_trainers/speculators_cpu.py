"""`speculators` (0.9.0) run on a machine without an accelerator, in its own environment (.venv-peers/speculators):

    .venv-peers/speculators/bin/python bench/peer_trainers/speculators_cpu.py train --verifier-name-or-path ...

Runs the peer's own command-line program after three run-time changes, each only where no accelerator exists and
none touching its loss, optimizer or data (bench/peer_trainers/speculators_io.py CPU_CHANGES says why each is
needed). Single process (LOCAL_RANK would start its accelerator-only distributed path). With
SPEC_METRICS_JSONL=PATH every metrics dict its trainer logs is also appended to PATH, one JSON object a line.
Imports only the peer and torch: nothing of draftsmith runs in the peer's environment.
"""
import json
import logging
import os
import sys
from pathlib import Path

sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]  # its own
# folder holds draftsmith's adapters, not the peer
if "LOCAL_RANK" in os.environ:
    sys.exit("speculators_cpu.py runs one process on the CPU: unset LOCAL_RANK (no torchrun)")

import torch  # noqa: E402


def without_accelerator() -> None:
    import speculators.train.checkpointer as checkpointer
    import speculators.train.trainer as trainer

    if torch.accelerator.is_available():
        return
    torch.accelerator.synchronize = lambda device=None: None  # CPU kernels are synchronous
    trainer.get_local_rank = lambda: torch.device("cpu")      # the device it moves model and batches to
    checkpointer.get_current_device = lambda: "cpu"           # where a resumed checkpoint is loaded


class MetricsFile(logging.Handler):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.file = open(path, "a", buffering=1)  # noqa: SIM115 (open for the process's life)

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, dict) and not getattr(record, "hparams", False):
            self.file.write(json.dumps(record.msg, default=str) + "\n")


def main() -> None:
    without_accelerator()
    metrics = os.environ.get("SPEC_METRICS_JSONL")
    if metrics:
        import speculators.train.cli as cli

        setup = cli.setup_metric_logger

        def with_file(*args, **kwargs):
            setup(*args, **kwargs)
            logging.getLogger("speculators.metrics").addHandler(MetricsFile(metrics))

        cli.setup_metric_logger = with_file
    from speculators.cli import app

    sys.argv = ["speculators", *sys.argv[1:]]
    app()


if __name__ == "__main__":
    main()
