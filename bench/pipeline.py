"""What the pipeline benches (`loss_ablation.py`, `recipes.py`) share: running one `train/run.py` command."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str]) -> None:
    """`python train/run.py ARGS` in the repository root, echoed with its wall time; a failure stops the bench."""
    command = [sys.executable, "train/run.py", *args]
    print("$", " ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO_ROOT, check=True)
    print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)
