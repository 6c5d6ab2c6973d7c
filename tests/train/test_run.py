"""train/run.py as users meet it when something is off: two identical commands at once, data_gen workers side by
side, bad settings, a read-only or full disk, a diverged drafter. Real processes, real files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from models.drafter import DrafterSpec, build_drafter, save_drafter
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow  # real train/run.py subprocesses


def command(runs_root, *overrides) -> list[str]:
    return [sys.executable, "train/run.py", "+experiment=smoke", "logger=none", f"runs_root={runs_root}", *overrides]


def run_cli(tmp_path, *overrides, timeout=600) -> subprocess.CompletedProcess:
    env = dict(os.environ, DRAFTSMITH_CACHE=str(tmp_path / "cache"))
    return subprocess.run(command(tmp_path / "runs", *overrides), cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_a_second_identical_run_stops_and_the_first_loses_nothing(tmp_path):
    overrides = ["stages=[data_gen,pretrain,distill]", "pretrain.steps=2000", "pretrain.checkpoint_every=500",
                 "distill.checkpoint_every=2"]
    env = dict(os.environ, DRAFTSMITH_CACHE=str(tmp_path / "cache"))
    first = subprocess.Popen(command(tmp_path / "runs", *overrides), cwd=REPO_ROOT, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    run_dir = tmp_path / "runs" / "smoke" / "default"
    lock = run_dir / ".locks" / "pretrain.lock"
    deadline = time.time() + 300
    while time.time() < deadline and not (lock.exists() and f"pid {first.pid} " in lock.read_text()):
        time.sleep(0.05)
    assert first.poll() is None, "the first run must still be pretraining when the second starts"
    second = run_cli(tmp_path, *overrides)
    first_out, first_err = first.communicate(timeout=600)
    assert first.returncode == 0, first_err[-3000:]
    assert second.returncode == 2
    assert f"is being written by another process (pid {first.pid} on" in second.stderr
    assert "Traceback" not in second.stderr
    assert "data_gen: complete output" in second.stdout  # it skipped what was done, then stopped at the lock
    for stage, steps in (("pretrain", 2000), ("distill", None)):
        folder = run_dir / stage
        assert (folder / "meta.json").exists() and (folder / "settings.fingerprint").exists()
        curve = (folder / "curve.jsonl").read_text().splitlines()
        assert curve and (steps is None or len(curve) == steps)  # every step of the first run is there
        assert list((folder / "checkpoints").glob("step-*"))
    assert not list(run_dir.glob("*.partial"))
    again = run_cli(tmp_path, *overrides)
    assert again.returncode == 0 and again.stdout.count("made with these settings, skipped") == 3


def test_data_gen_workers_write_side_by_side_and_a_duplicate_worker_is_refused(tmp_path):
    overrides = ["stages=[data_gen]", "data.limit=32", "data_gen.shard_size=2", "worker.world_size=2"]
    env = dict(os.environ, DRAFTSMITH_CACHE=str(tmp_path / "cache"))
    workers = [subprocess.Popen(command(tmp_path / "runs", *overrides, f"worker.rank={rank}"), cwd=REPO_ROOT, env=env,
                                text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for rank in (0, 1, 1)]
    results = [(worker.wait(timeout=600), *worker.communicate()) for worker in workers]
    codes = sorted(code for code, _, _ in results)
    refused = [err for code, _, err in results if code == 2]
    assert codes in ([0, 0, 2], [0, 0, 0]), [err[-2000:] for _, _, err in results]
    if refused:  # the duplicate of worker 1 met it at work
        assert "(data_gen.worker-1-of-2) is being written by another process" in refused[0]
    manifest = json.loads((tmp_path / "runs" / "smoke" / "default" / "data_gen" / "manifest.json").read_text())
    assert manifest["records"] > 0 and len(manifest["shards"]) >= 2


def test_a_bad_setting_is_one_line_in_seconds_before_anything_loads(tmp_path):
    started = time.perf_counter()
    result = run_cli(tmp_path, "+distill.epochz=2")
    assert result.returncode == 2
    assert result.stderr.strip() == ("[draftsmith] error: distill.epochz is not a setting of distill "
                                     "(train.distill.DistillSettings); did you mean distill.epochs?")
    assert time.perf_counter() - started < 60 and not (tmp_path / "runs" / "smoke").exists()


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs, mounted read-only or read-write by the test (needs mount rights: root, as in CI)."""
    mount = tmp_path / "disk"
    mount.mkdir()

    def mount_as(options: str):
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size=1m,{options}", "tmpfs", str(mount)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()}): run as root to test full and "
                        f"read-only disks")
        return mount

    yield mount_as
    subprocess.run(["umount", str(mount)], capture_output=True)


def test_a_read_only_runs_root_or_cache_is_one_line(tmp_path, tiny_disk):
    read_only = tiny_disk("ro")
    result = run_cli(tmp_path, f"runs_root={read_only / 'runs'}")
    assert result.returncode == 2
    assert result.stderr.strip() == (f"[draftsmith] error: runs_root={read_only / 'runs'}: cannot write there "
                                     f"(Read-only file system); choose a writable folder with runs_root=...")
    env = dict(os.environ, DRAFTSMITH_CACHE=str(read_only / "cache"))
    result = subprocess.run(command(tmp_path / "runs", "stages=[data_gen]"), cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("[draftsmith] error: Read-only file system: ")
    assert str(read_only / "cache") in result.stderr and "Traceback" not in result.stderr


def test_a_disk_too_small_for_data_gen_is_refused_with_the_space_it_needs(tmp_path, tiny_disk):
    small = tiny_disk("rw")
    result = run_cli(tmp_path, f"runs_root={small}", "stages=[data_gen]", "data.limit=64",
                     "data_gen.max_new_tokens=512", "data_gen.top_k_logprobs=32")
    assert result.returncode == 2, result.stderr[-2000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("[draftsmith] error: estimated disk use: ") and "Not enough space" in error
    assert f"free on {small}" in error



def test_a_disk_that_fills_mid_write_is_an_os_error_naming_the_path(tiny_disk, tiny_target):
    """torch (a checkpoint's files) and safetensors (a final model) say a full disk as a RuntimeError or a
    SafetensorError with no path; every write a run makes goes through `writing`, which makes it the OSError it is,
    naming the path, and the runner prints that as one line."""
    import errno

    from safetensors.torch import save_file

    from infra.rundir import as_disk_error, writing

    small = tiny_disk("rw")
    big = {"w": torch.zeros(512, 1024)}  # 2 MiB on a 1 MiB disk
    writes = {"torch": lambda path: torch.save(big, path), "safetensors": lambda path: save_file(big, str(path)),
              "a drafter": lambda path: save_drafter(build_drafter(DrafterSpec(
                  name="d", hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4, intermediate_size=1024),
                  tiny_target.model, tiny_target.tokenizer), tiny_target.tokenizer, path)}
    for name, write in writes.items():
        path = small / name.replace(" ", "_")
        with pytest.raises(Exception) as raw:
            write(path)
        with pytest.raises(OSError) as caught:
            with writing(path):
                write(path)
        assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path), (name, raw.value)
        assert "No space left on device" in caught.value.strerror
        for leftover in small.iterdir():
            subprocess.run(["rm", "-rf", str(leftover)])
    assert as_disk_error(ValueError("a bad value"), small) is None

def test_eval_refuses_a_drafter_whose_weights_are_nan(tmp_path, tiny_target):
    drafter = build_drafter(DrafterSpec(name="d", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2,
                                        intermediate_size=64), tiny_target.model, tiny_target.tokenizer)
    with torch.no_grad():
        next(drafter.parameters()).fill_(float("nan"))
    save_drafter(drafter, tiny_target.tokenizer, tmp_path / "diverged")
    result = run_cli(tmp_path, "stages=[eval]", "eval.include_untrained=false", "eval.baselines=[]",
                     f"+eval.drafters.diverged={tmp_path / 'diverged'}")
    assert result.returncode == 2, result.stderr[-2000:]
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"[draftsmith] error: drafter 'diverged' ({tmp_path / 'diverged'}) has NaN or inf "
                                f"weights in 1 tensors")
    assert not (tmp_path / "runs" / "smoke" / "default" / "eval").exists()  # nothing ranked, nothing named best


def test_a_bad_prompt_file_a_directory_or_an_unreachable_hub_target_is_one_line(tmp_path):
    """A malformed line (the hint names the key that exists), a directory given as the file, a hub model out of reach:
    one `[draftsmith] error:` line each, exit status 2, and no `data_gen.partial/` left by a refused data_gen."""
    bad = tmp_path / "bad_utf8.jsonl"
    bad.write_bytes(b'{"prompt": "fine"}\n{"prompt": "caf\xe9 au lait, the byte after caf is not UTF-8 here"}\n')
    cases = {
        "bad line": (["stages=[data_gen]", "data=jsonl", f"data.location={bad}"],
                     f"[draftsmith] error: {bad}:2: not valid UTF-8 at byte"),
        "directory": (["stages=[data_gen]", "data=jsonl", f"data.location={tmp_path}"],
                      f"[draftsmith] error: data source 'jsonl': {tmp_path} is a directory"),
        "hub offline": (["stages=[data_gen]", "target=hub", "target.location=nobody/not-a-model-here"],
                        "[draftsmith] error: target.location='nobody/not-a-model-here' (hub, revision main): cannot "
                        "be fetched"),
    }
    for name, (overrides, start) in cases.items():
        env = dict(os.environ, DRAFTSMITH_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1",
                   HF_HOME=str(tmp_path / "hf"))
        result = subprocess.run(command(tmp_path / "runs", *overrides), cwd=REPO_ROOT, env=env, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 2, (name, result.stderr[-2000:])
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        assert lines[-1].startswith(start), (name, lines[-3:])
        assert "Traceback" not in result.stderr, name
        assert not list((tmp_path / "runs").rglob("*.partial")), name
    result = run_cli(tmp_path, "stages=[data_gen]", "data=jsonl", f"data.location={bad}")
    assert "(set data.bad_records=skip to count and skip such lines)" in result.stderr


def test_ctrl_c_is_one_line_and_the_same_command_continues(tmp_path):
    """SIGINT mid-pretrain: one line (no KeyboardInterrupt traceback), exit status 130; the rerun resumes."""
    import signal

    overrides = ["stages=[pretrain]", "pretrain.steps=3000", "pretrain.checkpoint_every=100"]
    env = dict(os.environ, DRAFTSMITH_CACHE=str(tmp_path / "cache"))
    # SIGINT as a terminal delivers it, also where this suite runs as a background job (which ignores SIGINT)
    process = subprocess.Popen(command(tmp_path / "runs", *overrides), cwd=REPO_ROOT, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    checkpoints = tmp_path / "runs" / "smoke" / "default" / "pretrain.partial" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not list(checkpoints.glob("step-*[0-9]")):
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 130, err[-2000:]
    assert "Traceback" not in err, err[err.index("Traceback") - 200:][:3000]
    assert err.strip().splitlines()[-1].startswith("[draftsmith] error: interrupted (SIGINT)"), err[-1000:]
    again = subprocess.run(command(tmp_path / "runs", *overrides), cwd=REPO_ROOT, env=env, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    summary = json.loads((tmp_path / "runs" / "smoke" / "default" / "pretrain" / "meta.json").read_text())["summary"]
    assert summary["resumed_at"] >= 100 and summary["steps"] == 3000
