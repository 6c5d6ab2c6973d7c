"""A real SLURM cluster for the tests: munged, slurmctld and two slurmd (two nodes, n1 and n2, on this one host)
started by hand, no systemd, no /etc.

    python -m tests.slurm.cluster up /tmp/cluster     # prints `export SLURM_CONF=...`; then sbatch, squeue, ...
    python -m tests.slurm.cluster down /tmp/cluster

Everything the daemons write (state, spool, logs, pid files, slurm.conf itself) lives in the folder given; clients
find the cluster through SLURM_CONF. munged is started only when no munge daemon answers yet (and then stopped
again by `down`). Needs Debian's `slurm-wlm` and `munge` (`.ci/setup-slurm` installs them) and root, as slurmd
runs jobs as their submitting user and CI runs as root.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

NEEDED = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "munged", "munge", "unmunge")


def missing_programs() -> list[str]:
    return [name for name in NEEDED if shutil.which(name) is None and not Path(f"/usr/sbin/{name}").exists()]


def config_text(folder: Path, host: str, nodes: list[str], cpus: int, memory_mb: int, port: int) -> str:
    return "\n".join([
        "ClusterName=draftsmith-ci",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={port}",
        "SlurmUser=root", "SlurmdUser=root",
        "AuthType=auth/munge", "CredType=cred/munge", "MpiDefault=none",
        # a job credential lives 10 s (default 120): a requeued job may start again that soon after it stopped
        "AuthInfo=cred_expire=10",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core_Memory",
        "SchedulerType=sched/backfill", "ReturnToService=2",
        "JobRequeue=1",  # preempted jobs may requeue themselves (slurm/*.sbatch: --requeue)
        "MinJobAge=3600",  # finished jobs stay visible to `scontrol show job` (no accounting database here)
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/filetxt", f"JobCompLoc={folder}/log/jobcomp.txt",
        f"StateSaveLocation={folder}/state", f"SlurmdSpoolDir={folder}/spool/%n",
        f"SlurmctldPidFile={folder}/slurmctld.pid", f"SlurmdPidFile={folder}/slurmd-%n.pid",
        f"SlurmctldLogFile={folder}/log/slurmctld.log", f"SlurmdLogFile={folder}/log/slurmd-%n.log",
        # several nodes on this one host, each its own slurmd (-N NAME) on its own port (Debian's build allows it)
        *[f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={port + 1 + i} CPUs={cpus} Boards=1 "
          f"SocketsPerBoard=1 CoresPerSocket={cpus} ThreadsPerCore=1 RealMemory={memory_mb} State=UNKNOWN"
          for i, node in enumerate(nodes)],
        f"PartitionName=debug Nodes={','.join(nodes)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO",
        "",
    ])


def _munge_answers() -> bool:
    encoded = subprocess.run(["munge", "-n"], capture_output=True)
    return encoded.returncode == 0 and subprocess.run(["unmunge"], input=encoded.stdout,
                                                      capture_output=True).returncode == 0


def _free_ports(count: int) -> int:
    """The first of `count` adjacent free TCP ports (slurmctld, then one per slurmd)."""
    for _ in range(50):
        sockets = [socket.socket() for _ in range(count)]
        try:
            sockets[0].bind(("127.0.0.1", 0))
            port = sockets[0].getsockname()[1]
            for offset, extra in enumerate(sockets[1:], start=1):
                extra.bind(("127.0.0.1", port + offset))
            return port
        except OSError:
            continue
        finally:
            for opened in sockets:
                opened.close()
    raise RuntimeError(f"no {count} adjacent free TCP ports for slurmctld and the slurmd daemons")


@dataclass
class Cluster:
    folder: Path
    nodes: list[str]
    started_munge: bool

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.folder / "slurm.conf")}

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(list(command), env=dict(os.environ, **self.env), capture_output=True, text=True,
                                timeout=60)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)}: exit {result.returncode}: {result.stderr.strip()}")
        return result

    def cancel_all(self) -> None:
        self.run("scancel", "--full", "--user", os.environ.get("USER", "root"), check=False)


def up(folder: Path, nodes: int = 2, cpus: int = 2, memory_mb: int = 20000, timeout: float = 60.0) -> Cluster:
    """Start munged (if none answers), slurmctld and one slurmd per node (`nodes` nodes named n1, n2, ..., all on
    this host, each declaring `cpus` CPUs and `memory_mb` of memory) on a fresh configuration in `folder`; return
    when every node is idle. Raises RuntimeError naming the logs to read when a daemon does not come up."""
    missing = missing_programs()
    if missing:
        raise RuntimeError(f"SLURM is not installed here (missing {missing}): run .ci/setup-slurm")
    folder = folder.resolve()
    names = [f"n{i + 1}" for i in range(nodes)]
    for sub in ("state", "log", *[f"spool/{name}" for name in names]):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    host = socket.gethostname().split(".")[0]
    (folder / "slurm.conf").write_text(config_text(folder, host, names, cpus, memory_mb, _free_ports(1 + nodes)))
    started_munge = False
    if not _munge_answers():
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
        started_munge = True
        deadline = time.monotonic() + 10
        while not _munge_answers():
            if time.monotonic() > deadline:
                raise RuntimeError("munged did not answer within 10 s (munge -n | unmunge)")
            time.sleep(0.2)
    cluster = Cluster(folder, names, started_munge)
    env = dict(os.environ, **cluster.env)
    subprocess.run(["/usr/sbin/slurmctld"], env=env, check=True)
    for name in names:
        subprocess.run(["/usr/sbin/slurmd", "-N", name], env=env, check=True)
    deadline = time.monotonic() + timeout
    while True:
        states = cluster.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split()
        if states == ["idle"] * nodes:
            return cluster
        if time.monotonic() > deadline:
            down(cluster)
            raise RuntimeError(f"the SLURM nodes are {states or 'not known'} after {timeout:.0f} s: see "
                               f"{folder}/log/slurmctld.log and slurmd-*.log")
        time.sleep(0.3)


def _stop(pid_file: Path) -> None:
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


def down(cluster: Cluster) -> None:
    """Cancel every job, stop both daemons (and munged when `up` started it)."""
    cluster.cancel_all()
    for name in cluster.nodes:
        _stop(cluster.folder / f"slurmd-{name}.pid")
    _stop(cluster.folder / "slurmctld.pid")
    if cluster.started_munge:
        _stop(Path("/run/munge/munged.pid"))


def main() -> None:
    action, folder = sys.argv[1], Path(sys.argv[2])
    if action == "up":
        cluster = up(folder)
        (folder / "munge-started").write_text("1" if cluster.started_munge else "0")
        print(f"export SLURM_CONF={cluster.folder}/slurm.conf")
    elif action == "down":
        marker = folder / "munge-started"
        started = marker.exists() and marker.read_text().strip() == "1"
        nodes = sorted(p.name.removeprefix("slurmd-").removesuffix(".pid") for p in folder.glob("slurmd-*.pid"))
        down(Cluster(folder.resolve(), nodes, started))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
