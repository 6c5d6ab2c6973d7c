"""Run directories say which code made them: the real commit in a git checkout, `-dirty` when tracked files were
changed, an explicit "unknown" elsewhere."""
from __future__ import annotations

import subprocess

from infra.rundir import git_commit


def git(folder, *arguments) -> str:
    return subprocess.run(["git", *arguments], cwd=folder, check=True, capture_output=True, text=True).stdout.strip()


def commit_file(folder, text: str) -> str:
    (folder / "a.txt").write_text(text)
    git(folder, "add", "a.txt")
    git(folder, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", text.strip())
    return git(folder, "rev-parse", "HEAD")


def test_commit_of_a_checkout_clean_and_dirty(tmp_path):
    read = git_commit.__wrapped__  # what the checkout holds now (git_commit itself keeps its first answer)
    git(tmp_path, "init", "-q")
    head = commit_file(tmp_path, "one\n")
    assert read(tmp_path) == head
    (tmp_path / "untracked.txt").write_text("not part of the commit\n")
    assert read(tmp_path) == head  # untracked files do not change what ran
    (tmp_path / "a.txt").write_text("two\n")
    assert read(tmp_path) == head + "-dirty"


def test_the_commit_is_the_one_the_process_started_with(tmp_path):
    """A commit made while a long run works must not be recorded as the code that run ran."""
    git(tmp_path, "init", "-q")
    first = commit_file(tmp_path, "one\n")
    assert git_commit(tmp_path) == first
    second = commit_file(tmp_path, "two\n")
    assert git_commit(tmp_path) == first and git_commit.__wrapped__(tmp_path) == second


def test_outside_a_checkout_the_commit_is_explicitly_unknown(tmp_path):
    assert git_commit(tmp_path) == "unknown (not a git checkout)"


def test_a_stage_lock_has_one_holder_and_dies_with_it(tmp_path):
    """The second writer is refused at once, told who holds the lock; kill -9 of the holder frees it."""
    import os
    import signal
    import sys

    import pytest

    from infra.rundir import RunLocked, exclusive
    from tests.conftest import REPO_ROOT

    lock = tmp_path / ".locks" / "distill.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
                               "from infra.rundir import exclusive\n"
                               f"with exclusive(Path({str(lock)!r}), 'distill'):\n"
                               "    print('held', flush=True)\n    time.sleep(120)\n"],
                              cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLocked, match=f"distill is being written by another process \\(pid {holder.pid} on"):
            with exclusive(lock, "distill"):
                pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    with exclusive(lock, "distill"):  # nothing to clean up by hand after a crash
        assert f"pid {os.getpid()} " in lock.read_text()


def test_workers_beginning_one_stage_together_keep_each_others_folder(tmp_path, monkeypatch):
    """data_gen's workers begin the stage at the same moment (CI saw one empty the `.partial` folder the other had
    made but not yet stamped, which then failed writing its stamp). Worker A is held between making the folder and
    stamping it while worker B begins: B must wait, then find A's stamp and keep the folder."""
    import threading

    import infra.rundir as rundir

    inside, release, errors = threading.Event(), threading.Event(), []
    real_write = rundir.write_atomically

    def slow_write(path, text):
        if threading.current_thread().name == "A":
            inside.set()
            release.wait(5)
        real_write(path, text)

    monkeypatch.setattr(rundir, "write_atomically", slow_write)
    settings = {"data_gen": {"seed": 0}}

    def begin():
        try:
            rundir.StageDir(tmp_path, "data_gen").begin(settings)
            (tmp_path / "data_gen.partial" / f"{threading.current_thread().name}.shard").write_text("rows")
        except Exception as error:  # noqa: BLE001 - the assertion below names it
            errors.append(repr(error))

    first = threading.Thread(target=begin, name="A")
    first.start()
    assert inside.wait(5)
    second = threading.Thread(target=begin, name="B")
    second.start()
    second.join(0.5)
    assert second.is_alive(), "B did not wait for A's set-up"
    release.set()
    first.join(5), second.join(5)
    assert errors == []
    assert sorted(p.name for p in (tmp_path / "data_gen.partial").iterdir()) == ["A.shard", "B.shard",
                                                                                 "settings.fingerprint"]
