"""Running a configured pipeline: every setting checked first, then each stage in order into
`runs/<experiment>/<run_name>/<stage>/`, a complete stage with the same settings reused, one writer per stage folder
(a lock), preflight before the first stage that does work, one line and exit status 2 for every refusal.
`train/run.py` (the command) hands its Hydra config to `main`; the stages are those of `train/pipeline/stages.py`.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import sys
import tempfile
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from data_gen.generate import ShardsPending, WorkerSettings
from data_gen.sources import SourceFormatError
from infra import distributed, preemption
from infra.rundir import (DISK_ERRNOS, NotEnoughSpace, RunLocked, StageDir, StageMismatchError, git_commit,
                          writing)
from infra.settings import SettingsError, check_config, integer, one_of, shown
from infra.stage import StageRun
from infra.tracking import LoggerSettings, Tracker
from models.compat import check_versions
from models.drafter import VocabularyMismatchError
from models.loading import DamagedWeightsError, TargetUnavailable, load_target, resolve_device, resolve_model_dir
from train.core.checkpoint import DamagedCheckpointError
from train.core.engine import UnsafeCheckpointError
from train.pipeline.preflight import check_run
from train.pipeline.stages import DISTRIBUTED_STAGES, RUN_SECTIONS, STAGES, sections
from train.pipeline.sweep import record_point, sweep_point

def say(message: str) -> None:
    """Print once per launch (rank 0 of a torchrun/deepspeed launch)."""
    if distributed.is_main():
        print(message, flush=True)


def typed(config: DictConfig, section: str):
    return instantiate(config[section], _convert_="all")


def stage_arguments(name: str, config: DictConfig) -> dict:
    """run_stage's keyword arguments: `settings` is the stage's own section, every other one is named as such."""
    wanted = [p for p in inspect.signature(STAGES[name].run).parameters if p != "run"]
    unknown = [p for p in wanted if (name if p == "settings" else p) not in STAGES[name].sections]
    assert not unknown, f"{name}.run_stage reads {unknown}, which its fingerprint does not cover"
    return {p: typed(config, name if p == "settings" else p) for p in wanted}


TOP_LEVEL = {"experiment", "run_name", "stages", "runs_root", "cache_dir", "seed", "device", "worker", "resume",
             "preflight", "overwrite"}
TOP_LEVEL_RULES = {"resume": one_of("auto", "never"), "seed": integer, "preflight": one_of(True, False),
                   "overwrite": one_of(True, False)}


def check_settings(config: DictConfig, launched: bool | None = None) -> tuple[list[str], Path]:
    """Every setting the run will use, checked before anything loads or is written: the stages' sections (types,
    ranges, unknown keys: infra.settings), the top-level keys, and combinations that cannot work. Returns the
    stages in running order and the run directory (inside runs_root, writable). `launched`: whether the training
    stages will run under a distributed launcher (default: whether this process was; slurm/pipeline.py's jobs
    are)."""
    unknown = [s for s in config.stages if s not in STAGES]
    if unknown:
        raise SettingsError(f"stages={list(config.stages)}: unknown {unknown}; choose from {list(STAGES)}")
    stages = sorted(config.stages, key=list(STAGES).index)
    known = set(sections())
    extra = sorted(set(config) - TOP_LEVEL - known)
    if extra:
        raise SettingsError(f"{extra[0]} is not a setting (top-level keys: {sorted(TOP_LEVEL)}, sections: "
                            f"{sorted(known)})")
    for key, rule in TOP_LEVEL_RULES.items():
        if not rule.test(config[key]):
            raise SettingsError(f"{key}={shown(config[key])}: {rule.allowed}")
    try:
        WorkerSettings(**config.worker)
    except (SettingsError, ValueError, TypeError) as error:
        raise SettingsError(f"worker: {error}") from None
    check_config(config, sorted({s for stage in stages for s in STAGES[stage].sections} | {"target", *RUN_SECTIONS}))
    runs_root = Path(config.runs_root).resolve()
    run_dir = runs_root / config.experiment / config.run_name
    for key in ("experiment", "run_name"):
        name = str(config[key])
        if not name or Path(name).is_absolute() or ".." in Path(name).parts:
            raise SettingsError(f"{key}={name!r}: must be a name inside runs_root={config.runs_root} (no '..', not an "
                                f"absolute path); to write elsewhere, set runs_root=...")
    if "export" in stages and (Path(config.export.name).name != config.export.name or config.export.name in (
            "", ".", "..")):
        raise SettingsError(f"export.name={config.export.name!r}: must be a plain folder name (no '/' or '..')")
    launched = distributed.launched() if launched is None else launched
    if config.deepspeed.enabled and set(stages) & set(DISTRIBUTED_STAGES) and not launched:
        raise SettingsError(f"deepspeed.enabled=true (ZeRO stage {config.deepspeed.stage}) trains through a "
                            f"distributed launcher, and this process was started without one. Run "
                            f"`torchrun --nproc_per_node=N train/run.py {' '.join(sys.argv[1:])}` (N processes; N=1 "
                            f"works), or deepspeed=none for one plain process")
    if "eval" in stages:
        trained = {s for s in ("pretrain", "distill") if s in stages or StageDir(run_dir, s).meta() is not None}
        if not (config.eval.include_untrained or config.eval.drafters or trained):
            raise SettingsError("eval has no drafter to evaluate: this run has no pretrain or distill output, "
                                "eval.include_untrained=false and eval.drafters is empty; add "
                                "+eval.drafters.NAME=/path/to/drafter or include_untrained=true")
    writable(runs_root, "runs_root")
    return stages, run_dir


def writable(folder: Path, key: str) -> None:
    """One line naming the folder when it cannot be written, instead of a traceback later."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as error:
        raise SettingsError(f"{key}={folder}: cannot write there ({error.strerror or error}); choose a writable "
                            f"folder with {key}=...") from None


def run(config: DictConfig) -> dict[str, Path]:
    """Run `config.stages` in order; returns each stage's output directory."""
    check_versions()
    git_commit()  # pinned now: the stages' meta.json name the code this process loaded, not a later checkout
    stages, run_dir = check_settings(config)
    if distributed.world_size() > 1:
        outside = [s for s in stages if s not in DISTRIBUTED_STAGES]
        if outside:
            raise SettingsError(f"{distributed.world_size()} processes were launched, but stages {outside} run in one "
                             f"process: run them first without torchrun, then launch stages={list(DISTRIBUTED_STAGES)}")
        distributed.init()
    cache_dir = Path(config.cache_dir)
    resolved = OmegaConf.to_container(config, resolve=True)
    target_spec, logger_settings, loaded = typed(config, "target"), typed(config, "logger"), []

    def load_once():
        if not loaded:
            loaded.append(load_target(target_spec, cache_dir, device=resolve_device(config.device)))
        return loaded[0]

    outputs, checked = {}, not config.preflight
    for index, stage in enumerate(stages):
        stage_dir = StageDir(run_dir, stage)
        with stage_dir.lock(lock_name(stage, config.worker)) if distributed.is_main() else contextlib.nullcontext():
            settings = {section: resolved[section] for section in STAGES[stage].sections}
            settings["inputs"] = {name: (StageDir(run_dir, name).meta() or {}).get("fingerprint")
                                  for name in STAGES[stage].inputs}
            if stage_dir.check_reusable(settings, bool(config.overwrite)):
                say(f"[draftsmith] {stage}: complete output in {stage_dir.final} made with these settings, skipped")
                outputs[stage] = stage_dir.final
                continue
            if not checked:  # before the first stage that does work: can every stage still to come run here?
                seconds = check_run(stages[index:], target_spec, cache_dir, data_gen=typed(config, "data_gen"),
                                    drafter=typed(config, "drafter"), deepspeed=typed(config, "deepspeed"))
                say(f"[draftsmith] preflight: {', '.join(stages[index:])} can run here (checked in {seconds:.1f} s)")
                checked = True
            say(f"[draftsmith] {stage}: running into {stage_dir.final}")
            if distributed.is_main():
                stage_dir.begin(settings)
            distributed.barrier()
            tracker = Tracker(logger_settings if distributed.is_main() else LoggerSettings(backend="none"), run_dir,
                              stage, resolved)
            _, identity = resolve_model_dir(target_spec, cache_dir)
            context = StageRun(stage=stage, out_dir=stage_dir.partial, run_dir=run_dir, cache_dir=cache_dir,
                               tracker=tracker, config=resolved, target_identity=identity.as_dict(),
                               load_target=load_once, resume=config.resume, worker=WorkerSettings(**config.worker))
            try:
                with writing(stage_dir.partial):  # torch's and safetensors' words for a full disk, as an OSError
                    summary = STAGES[stage].run(context, **stage_arguments(stage, config))
            except ShardsPending as pending:  # other data_gen workers still at work, or a dry run: stop here
                tracker.finish({})
                print(f"[draftsmith] {stage}: not complete: {pending}", flush=True)
                return outputs
            except preemption.Preempted:
                tracker.finish({})
                raise
            except BaseException:
                if distributed.is_main():
                    stage_dir.discard_unstarted()  # a stage refused before it wrote anything leaves no folder
                raise
            tracker.finish({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
            if distributed.is_main():
                stage_dir.commit(settings, resolved, identity.as_dict(), summary)
            distributed.barrier()
        outputs[stage] = stage_dir.final
        printable = {k: v for k, v in summary.items() if not isinstance(v, dict)}
        say(f"[draftsmith] {stage}: done -> {outputs[stage]}\n  {json.dumps(printable, default=str)}")
    return outputs


def lock_name(stage: str, worker: DictConfig) -> str:
    """data_gen workers of one run write disjoint shards, so each holds the lock of its own slice."""
    if stage == "data_gen" and worker.world_size > 1:
        return f"data_gen.worker-{worker.rank}-of-{worker.world_size}"
    return stage


REFUSALS = (SettingsError, RunLocked, StageMismatchError, DamagedCheckpointError, UnsafeCheckpointError,
            DamagedWeightsError, VocabularyMismatchError, SourceFormatError, TargetUnavailable)


def main(config: DictConfig) -> None:
    """A refused setting, a busy run folder or a read-only / full disk is one line and exit status 2; a stop on the
    cluster's warning signal (infra/preemption.py), after its checkpoint, is one line and exit status 3. A point of a
    sweep that is refused or fails says so (the same line, or its traceback) and returns, so that the sweep runs its
    other points; its outcome goes into the sweep's table and exit status (train/pipeline/sweep.py)."""
    preemption.install()
    point = sweep_point(config)  # a point of a sweep (-m): its own run folder, recorded for the comparison
    outputs: dict = {}
    try:
        outputs = run(config)
    except preemption.Preempted as stopped:
        record_point(point, config, f"preempted: {stopped}")
        say(f"[draftsmith] preempted: {stopped}")
        preemption.mark(str(stopped))
        sys.exit(preemption.EXIT_CODE)
    except REFUSALS as error:
        record_point(point, config, f"refused: {error}")
        refuse(str(error), point)
        return
    except OSError as error:
        if isinstance(error, FileNotFoundError) and error.errno is None:  # ours: a missing input, named in words
            record_point(point, config, f"refused: {error}")
            refuse(str(error), point)
            return
        if error.errno not in DISK_ERRNOS and not isinstance(error, NotEnoughSpace):
            _failed(point, config, error)
            return
        message = f"{error.strerror or error}" + (f": {error.filename}" if error.filename else "")
        record_point(point, config, f"refused: {message}")
        refuse(message, point)
        return
    except Exception as error:
        _failed(point, config, error)
        return
    except KeyboardInterrupt:  # Ctrl-C: one line; a sweep stops here too
        record_point(point, config, "failed: interrupted (SIGINT)")
        close_progress_bars()
        print("[draftsmith] error: interrupted (SIGINT); finished stages and the newest checkpoints are kept: the "
              "same command continues from them", file=sys.stderr, flush=True)
        sys.exit(130)
    except BaseException as error:  # SystemExit: the whole sweep stops, this point recorded
        record_point(point, config, f"failed: {type(error).__name__}: {error}")
        raise
    finally:
        distributed.shutdown()  # leave the process group while every rank is alive, not in exit's destructors
    missing = [stage for stage in config.stages if stage not in outputs]
    record_point(point, config, f"not complete: {missing} did not finish (see its log)" if missing else "done")


def _failed(point: Path | None, config: DictConfig, error: Exception) -> None:
    """An unexpected error: raised as it is in a single run; in a sweep, its traceback printed and the point
    recorded as failed, so the sweep goes on to its other points."""
    record_point(point, config, f"failed: {type(error).__name__}: {error}")
    if point is None:
        raise error
    import traceback

    traceback.print_exception(error, file=sys.stderr)
    say(f"[draftsmith] sweep point {config.run_name} failed ({type(error).__name__}: {error}); the sweep goes on")


def close_progress_bars() -> None:
    """Close the progress bars an error left open, so that nothing redraws them under the error line."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def refuse(message: str, point: Path | None = None) -> None:
    """One line on stderr and exit status 2; a sweep's point only says it (the sweep's exit status counts it)."""
    close_progress_bars()
    print(f"[draftsmith] error: {message}", file=sys.stderr, flush=True)
    if point is None:
        sys.exit(2)

