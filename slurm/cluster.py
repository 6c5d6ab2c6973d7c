"""The whole pipeline on a SLURM cluster in one command: dependent jobs, sized by the `cluster` config.

    python slurm/pipeline.py +experiment=quickstart                       # submit, print the job ids, return
    python slurm/pipeline.py +experiment=quickstart cluster.data_gen.workers=8 --wait   # ... and watch to the end
    python slurm/pipeline.py --status runs/quickstart/default              # how a submitted pipeline stands
    python slurm/pipeline.py +experiment=NAME cluster=gpu8 --dry-run       # the sbatch lines, nothing submitted

Every setting is checked first, as `train/run.py` checks it (a bad key is one line and nothing is submitted). Then,
for the stages listed in `stages`:
1. data_gen as a job array of `cluster.data_gen.workers` tasks (slurm/data_gen_array.sbatch; each makes its own
   shards, the last to finish writes the manifest);
2. pretrain and distill as one job of `cluster.train.nodes` nodes x `processes_per_node` processes
   (slurm/train.sbatch: torchrun per node, the first host as rendezvous master), `afterok` on the array;
3. eval, export and online as one job (slurm/run.sbatch), `afterok` on the training job.
Each job is submitted with `--kill-on-invalid-dep=yes`: when one fails, SLURM cancels the jobs after it instead of
leaving them pending forever, and `--wait`/`--status` says which job failed, with the error line of its log.
Logs go to `runs/<experiment>/<run_name>/slurm/`, the submitted plan to `.../slurm/pipeline.json`. Every job asks
for SIGUSR1 `cluster.signal_seconds` before its time limit and requeues itself after a checkpointed stop.
"""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from infra.settings import SettingsError, at_least, check_fields
from train.pipeline.stages import JOB_KINDS, job_stages

REPO_ROOT = Path(__file__).resolve().parents[1]
JOB_SCRIPTS = {"data_gen": "slurm/data_gen_array.sbatch", "train": "slurm/train.sbatch", "run": "slurm/run.sbatch"}
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING", "REQUEUE_HOLD",
          "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "PREEMPTED"}


@dataclass(frozen=True)
class JobSpec:
    """One kind of job's resources. `workers` counts data_gen's array tasks; `nodes` and `processes_per_node`
    shape the training job; cpus, gpus and memory are per node (per array task for data_gen)."""
    cpus: int = 2
    gpus: int = 0
    mem_gb: int = 16
    minutes: int = 60
    workers: int = 1
    nodes: int = 1
    processes_per_node: int = 1

    LIMITS = {"cpus": at_least(1), "gpus": at_least(0), "mem_gb": at_least(1), "minutes": at_least(1),
              "workers": at_least(1), "nodes": at_least(1), "processes_per_node": at_least(1)}

    def __post_init__(self) -> None:
        check_fields(self)

    def sbatch_options(self) -> list[str]:
        options = [f"--cpus-per-task={self.cpus}", f"--mem={self.mem_gb}G", f"--time={self.minutes}"]
        return options + ([f"--gres=gpu:{self.gpus}"] if self.gpus else [])


@dataclass(frozen=True)
class ClusterSettings:
    data_gen: JobSpec
    train: JobSpec
    run: JobSpec
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    extra_sbatch: list[str] = field(default_factory=list)
    signal_seconds: int = 180
    sweep_parallelism: int = 64

    SECTION = "cluster"
    LIMITS = {"signal_seconds": at_least(0), "sweep_parallelism": at_least(1)}

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("data_gen", "run"):
            spec = getattr(self, name)
            if spec.nodes != 1 or spec.processes_per_node != 1:
                raise SettingsError(f"cluster.{name}: nodes and processes_per_node are for cluster.train only (its "
                                    f"jobs run one process; data_gen scales with cluster.data_gen.workers)")
        for name in ("train", "run"):
            if getattr(self, name).workers != 1:
                raise SettingsError(f"cluster.{name}.workers={getattr(self, name).workers}: workers are data_gen's "
                                    f"array tasks (cluster.data_gen.workers)")
        for option in self.extra_sbatch:
            if not option.startswith("--"):
                raise SettingsError(f"cluster.extra_sbatch: {option!r} is not an sbatch option (--name=value)")

    def common_options(self) -> list[str]:
        options = [f"--{key}={getattr(self, key)}" for key in ("partition", "account", "qos") if getattr(self, key)]
        return options + list(self.extra_sbatch)


@dataclass
class Job:
    name: str                # data_gen | train | run
    stages: list[str]
    command: list[str]       # the sbatch command line, without the dependency
    after: str | None        # the job this one waits for (afterok)
    log: str                 # the log file pattern (%j job id, %A/%a array job and task)
    job_id: str | None = None


def user_overrides(overrides: list[str]) -> list[str]:
    """The overrides every job gets: the user's, minus `stages=` (each job names its own stages)."""
    return [o for o in overrides if not re.match(r"^[+~]{0,2}stages=", o)]


def plan(stages: list[str], cluster: ClusterSettings, overrides: list[str], run_dir: Path, name: str,
         deepspeed_enabled: bool, vllm: bool = False) -> list[Job]:
    """The jobs for `stages` (in running order), each waiting for the one before it."""
    logs, jobs, previous = run_dir / "slurm", [], None
    passed = user_overrides(overrides)
    for kind in JOB_KINDS:  # in running order; which stages each runs is the stage table's `job`
        mine = [s for s in stages if s in job_stages(kind)]
        if not mine:
            continue
        spec = getattr(cluster, kind)
        log = str(logs / (f"{kind}-%A_%a.out" if kind == "data_gen" else f"{kind}-%j.out"))
        command = ["sbatch", "--parsable", f"--job-name={name}-{kind}", f"--output={log}", "--kill-on-invalid-dep=yes",
                   f"--signal=USR1@{cluster.signal_seconds}", *cluster.common_options(), *spec.sbatch_options()]
        if kind == "data_gen":
            if vllm:  # vLLM lives in its own environment (.venv-vllm): slurm/common.sh
                command.append("--export=ALL,DRAFTSMITH_ENV=vllm")
            command += [f"--array=0-{spec.workers - 1}", JOB_SCRIPTS[kind], *passed]
        elif kind == "train":
            processes = spec.nodes * spec.processes_per_node
            if processes > 1 and not deepspeed_enabled:
                raise SettingsError(f"cluster.train runs {processes} processes ({spec.nodes} node(s) x "
                                    f"{spec.processes_per_node}): data-parallel training needs deepspeed=zero1|zero2|"
                                    f"zero3 (or cluster.train.nodes=1 cluster.train.processes_per_node=1)")
            command += [f"--nodes={spec.nodes}", "--ntasks-per-node=1", JOB_SCRIPTS[kind],
                        str(spec.processes_per_node), f"stages=[{','.join(mine)}]", *passed]
        else:
            command += [JOB_SCRIPTS[kind], f"stages=[{','.join(mine)}]", *passed]
        jobs.append(Job(kind, mine, command, previous, log))
        previous = kind
    return jobs


def submit(jobs: list[Job], plan_file: Path) -> None:
    """sbatch each job in order, the later ones `afterok` on the one before; writes the plan with the job ids."""
    ids: dict[str, str] = {}
    Path(jobs[0].log).parent.mkdir(parents=True, exist_ok=True)  # SLURM does not create a log's folder
    for job in jobs:
        command = list(job.command)
        if job.after:
            command.insert(2, f"--dependency=afterok:{ids[job.after]}")
        result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
        if result.returncode != 0:
            submitted = ", ".join(f"{k} {v}" for k, v in ids.items())
            raise RuntimeError(f"sbatch refused the {job.name} job ({result.stderr.strip()})"
                               + (f"; already submitted: {submitted} (scancel them, or keep them)" if ids else ""))
        job.job_id = ids[job.name] = result.stdout.strip().split(";")[0]
        write_plan(plan_file, jobs)


def write_plan(plan_file: Path, jobs: list[Job]) -> None:
    plan_file.parent.mkdir(parents=True, exist_ok=True)
    plan_file.write_text(json.dumps([asdict(job) for job in jobs], indent=1) + "\n")


def read_plan(plan_file: Path) -> list[Job]:
    try:
        return [Job(**job) for job in json.loads(plan_file.read_text())]
    except (OSError, json.JSONDecodeError, TypeError) as error:
        raise SettingsError(f"{plan_file}: no readable pipeline plan ({error}); submit with slurm/pipeline.py"
                            ) from None


@dataclass
class JobState:
    state: str               # COMPLETED, FAILED, CANCELLED, ... (the worst over an array's tasks), or UNKNOWN
    exit_code: str = ""
    reason: str = ""
    tasks: int = 1

    @property
    def active(self) -> bool:
        return self.state in ACTIVE


def job_state(job_id: str) -> JobState:
    """The job's state from `scontrol show job` (while slurmctld remembers it), else from `sacct`."""
    shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    records = [dict(re.findall(r"(\w+)=(\S*)", line)) for line in shown.stdout.splitlines() if "JobState=" in line]
    if shown.returncode != 0 or not records:
        accounted = subprocess.run(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "State,ExitCode"],
                                   capture_output=True, text=True)
        records = [{"JobState": line.split("|")[0].split()[0], "ExitCode": line.split("|")[1]}
                   for line in accounted.stdout.splitlines() if "|" in line] if accounted.returncode == 0 else []
    if not records:
        return JobState("UNKNOWN", reason="slurmctld no longer lists it and accounting (sacct) is off")
    active = [r for r in records if r.get("JobState") in ACTIVE]
    unfinished = [r for r in records if r.get("JobState") != "COMPLETED"]
    chosen = (active or unfinished or records)[0]  # an array is as far as its least finished task
    return JobState(chosen.get("JobState", "UNKNOWN"), chosen.get("ExitCode", ""), chosen.get("Reason", ""),
                    len(records))


def failure_line(log_pattern: str, job_id: str) -> str:
    """The `[draftsmith] error:` line (or the last line) of a failed job's logs."""
    pattern = log_pattern.replace("%A", job_id).replace("%j", job_id).replace("%a", "*")
    found = sorted(Path(pattern).parent.glob(Path(pattern).name))
    lines = [line for path in found for line in path.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() and "[draftsmith]" in line]
    traceback = [line for line in lines if re.match(r"^\w+(\.\w+)*(Error|Exception):", line)]
    chosen = (errors or traceback or lines[-1:] or ["(no log written)"])[-1]
    return f"{chosen.strip()}  (log: {pattern})"


def report(jobs: list[Job]) -> tuple[bool, bool, list[str]]:
    """(all done, all completed, one line per job); a failed job's line quotes its error, a cancelled dependent
    names the job whose failure stopped it."""
    states = {job.name: job_state(job.job_id) for job in jobs if job.job_id}
    lines, failed = [], None
    for job in jobs:
        state = states.get(job.name, JobState("NOT SUBMITTED"))
        what = f"{job.name:<8} job {job.job_id or '-':<8} {'+'.join(job.stages):<24} {state.state}"
        if state.tasks > 1:
            what += f" ({state.tasks} tasks)"
        stopped_by_dependency = state.state == "CANCELLED" and "Dependency" in state.reason
        if state.state not in ACTIVE | {"COMPLETED", "UNKNOWN"} and failed is None and not stopped_by_dependency:
            failed = job
            what += f", exit {state.exit_code}: {failure_line(job.log, job.job_id)}"
        elif stopped_by_dependency:
            stopped_by = failed or next((j for j in jobs if j.name == job.after), None)
            what += f": not run, because {stopped_by.name} (job {stopped_by.job_id}) did not succeed"
        elif state.state == "PENDING" and state.reason not in ("", "None"):
            what += f" ({state.reason})"
        lines.append(what)
    done = not any(s.active for s in states.values())
    completed = all(job.name in states and states[job.name].state == "COMPLETED" for job in jobs)
    return done, completed, lines


def watch(jobs: list[Job], every: float = 5.0) -> bool:
    """Print the jobs' states as they change until none is pending or running; True when every job completed."""
    shown = None
    while True:
        done, completed, lines = report(jobs)
        if lines != shown:
            print(f"[pipeline] {time.strftime('%H:%M:%S')}\n  " + "\n  ".join(lines), flush=True)
            shown = lines
        if done:
            return completed
        time.sleep(every)


def compose(overrides: list[str]):
    """The run's config, composed as `train/run.py` composes it."""
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(str(REPO_ROOT / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides)


def main(argv: list[str]) -> int:
    from hydra.errors import HydraException
    from hydra.utils import instantiate

    from train.pipeline.runner import check_settings

    flags = {a for a in argv if a.startswith("--")}
    unknown = flags - {"--wait", "--dry-run", "--help"} - {a for a in flags if a.startswith("--status")}
    if "--help" in flags or unknown:
        print(__doc__ + (f"\nunknown option(s): {sorted(unknown)}" if unknown else ""))
        return 0 if not unknown else 2
    status = next((a for a in argv if a.startswith("--status")), None)
    try:
        if status is not None:
            folder = Path(status.partition("=")[2] or argv[argv.index(status) + 1])
            jobs = read_plan(folder / "slurm" / "pipeline.json")
            return 0 if (watch(jobs) if "--wait" in flags else print_report(jobs)) else 1
        overrides = [a for a in argv if not a.startswith("--")]
        try:
            config = compose(overrides)
        except HydraException as error:
            raise SettingsError(str(error)) from None
        stages, run_dir = check_settings(config, launched=True)
        cluster = instantiate(config.cluster, _convert_="all")
        name = f"draftsmith-{config.experiment}-{config.run_name}".replace("/", "-")
        jobs = plan(stages, cluster, overrides, run_dir, name, bool(config.deepspeed.enabled),
                    config.data_gen.backend == "vllm")
    except SettingsError as error:
        print(f"[pipeline] error: {error}", file=sys.stderr)
        return 2
    if "--dry-run" in flags:
        for job in jobs:
            after = f"  (afterok: the {job.after} job)" if job.after else ""
            print(shlex.join(job.command) + after)
        print("[pipeline] dry run: nothing submitted")
        return 0
    plan_file = run_dir / "slurm" / "pipeline.json"
    try:
        submit(jobs, plan_file)
    except (RuntimeError, FileNotFoundError) as error:
        print(f"[pipeline] error: {error}", file=sys.stderr)
        return 1
    for job in jobs:
        print(f"[pipeline] {job.name:<8} job {job.job_id:<8} stages {','.join(job.stages):<24} log {job.log}"
              + (f"  (after {job.after})" if job.after else ""))
    print(f"[pipeline] plan: {plan_file}; watch with: python slurm/pipeline.py --status {run_dir} [--wait]",
          flush=True)
    return 0 if "--wait" not in flags or watch(jobs) else 1


def print_report(jobs: list[Job]) -> bool:
    done, completed, lines = report(jobs)
    print("  " + "\n  ".join(lines))
    return done and completed
