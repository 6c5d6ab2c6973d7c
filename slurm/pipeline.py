"""The whole pipeline on a SLURM cluster in one command (see slurm/cluster.py):

    python slurm/pipeline.py +experiment=quickstart [cluster.data_gen.workers=8 ...] [--wait | --dry-run]
    python slurm/pipeline.py --status runs/quickstart/default [--wait]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slurm.cluster import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
