"""The converter's command line at its edges: every case ends in one `error:` line naming the path and the problem
(before any work where that is knowable up front), an empty output folder is filled, scratch folders of killed
runs are cleaned up (never a live run's), and error lines of several ranks come out once each, whole."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from .convert_models import assert_same, save_tiny
from qwen_trainer.__main__ import main
from qwen_trainer.errors import ErrorLines, write_termination_log

warnings.filterwarnings("ignore", category=UserWarning)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return save_tiny("qwen2.5-tied", tmp_path_factory.mktemp("hf") / "qwen2")


@pytest.fixture(scope="module")
def mcore(qwen2, tmp_path_factory):
    out = tmp_path_factory.mktemp("mc") / "mcore"
    assert main(["convert", "--from", "hf", "--to", "mcore", "--tp", "2", "--pp", "2", "--no-progress",
                 str(qwen2), str(out)]) == 0
    return out


def _convert(*args: str) -> int:
    return main(["convert", "--no-progress", *args])


def _one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback" not in err[0]
    return err[0]


def test_empty_existing_output_folder_is_filled(qwen2, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    assert _convert("--from", "hf", "--to", "mcore", str(qwen2), str(out)) == 0
    assert (out / "latest_checkpointed_iteration.txt").is_file()
    back = tmp_path / "back"
    assert _convert("--from", "mcore", "--to", "hf", str(out), str(back)) == 0
    assert_same(qwen2, back)


def test_non_empty_output_folder_refused_before_any_work(qwen2, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert _convert("--from", "hf", "--to", "mcore", str(qwen2), str(out)) == 1
    line = _one_error(capsys)
    assert str(out) in line and "already holds files" in line and "--overwrite" in line
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_output_under_a_file_or_unwritable_folder_is_one_line(qwen2, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert _convert("--from", "hf", "--to", "mcore", str(qwen2), str(blocker / "out")) == 1
    line = _one_error(capsys)
    assert str(blocker) in line and "not a directory" in line
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        try:
            assert _convert("--from", "hf", "--to", "mcore", str(qwen2), str(locked / "out")) == 1
            line = _one_error(capsys)
            assert str(locked) in line and "not writable" in line
        finally:
            locked.chmod(0o755)


def test_read_only_filesystem_is_one_line(qwen2, capsys):
    target = Path("/proc/qwen-convert-test/out")  # procfs: no folder can be made there, even by root
    assert _convert("--from", "hf", "--to", "mcore", str(qwen2), str(target)) == 1
    line = _one_error(capsys)
    assert "target /proc/qwen-convert-test/out" in line


def test_truncated_rank_file_is_one_line_naming_the_source(mcore, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(mcore, src)
    rank = sorted(src.rglob("*.pt"))[-1]
    with open(rank, "r+b") as f:
        f.truncate(rank.stat().st_size // 2)
    assert _convert("--from", "mcore", "--to", "hf", str(src), str(tmp_path / "out")) == 1
    line = _one_error(capsys)
    assert f"source {src}" in line and "mcore" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output, no scratch folder


def test_missing_rank_folder_is_one_line_naming_the_source(mcore, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(mcore, src)
    rank_dirs = sorted(p for p in (src / "release").iterdir() if p.is_dir())
    shutil.rmtree(rank_dirs[-1])
    assert _convert("--from", "mcore", "--to", "hf", str(src), str(tmp_path / "out")) == 1
    line = _one_error(capsys)
    assert f"source {src}" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_scratch_of_a_killed_run_is_removed_a_live_runs_is_kept(qwen2, tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.tmp-{dead.pid}"
    (stale / "release").mkdir(parents=True)
    (stale / "release" / "half.pt").write_bytes(b"x" * 1000)
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    live = tmp_path / f".out.tmp-{running.pid}"  # a conversion still running
    live.mkdir()
    other = tmp_path / f".other.tmp-{dead.pid}"  # another target's: not ours to clean
    other.mkdir()
    try:
        assert _convert("--from", "hf", "--to", "mcore", str(qwen2), str(tmp_path / "out")) == 0
    finally:
        running.kill()
        running.wait()
    assert not stale.exists()
    assert live.is_dir() and other.is_dir()
    assert (tmp_path / "out" / "latest_checkpointed_iteration.txt").is_file()


def test_error_lines_of_two_ranks_come_out_whole_and_once(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    shared = io.StringIO()
    ranks = [ErrorLines(shared, run_id="run-1"), ErrorLines(shared, run_id="run-1")]
    # print() writes the text and the newline separately: interleave two ranks' halves.
    ranks[0].write("error: checkpoint.source: source /x does not exist")
    ranks[1].write("error: checkpoint.source: source /x does not exist")
    ranks[0].write("\n")
    ranks[1].write("\n")
    ranks[1].write("error: rank 1 crashed: only here\n")
    ranks[0].write("a log line\n")
    assert shared.getvalue().splitlines() == [
        "error: checkpoint.source: source /x does not exist",
        "error: rank 1 crashed: only here",
        "a log line",
    ]
    # Each rank still remembers its own errors for its container's termination message.
    assert ranks[1].lines == ["error: checkpoint.source: source /x does not exist", "error: rank 1 crashed: only here"]
    # Another run (a restarted pod) prints the same error again.
    again = io.StringIO()
    ErrorLines(again, run_id="run-2").write("error: checkpoint.source: source /x does not exist\n")
    assert again.getvalue() == "error: checkpoint.source: source /x does not exist\n"
    # A later launch under the same run id (torchrun's default "none"), from another launcher, prints it too.
    monkeypatch.setattr("os.getppid", lambda: 1)
    later = io.StringIO()
    ErrorLines(later, run_id="run-1").write("error: checkpoint.source: source /x does not exist\n")
    assert later.getvalue() == "error: checkpoint.source: source /x does not exist\n"


def test_failing_command_writes_its_error_to_the_termination_log(tmp_path):
    log = tmp_path / "termination-log"
    env = {**os.environ, "QWEN_TERMINATION_LOG": str(log)}
    r = subprocess.run([sys.executable, "-m", "qwen_trainer", "convert", "--from", "hf", "--to", "mcore",
                        str(tmp_path / "missing"), str(tmp_path / "out")], capture_output=True, text=True, env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert log.read_text() == f"source {tmp_path / 'missing'} does not exist"
    # Nothing is written outside a container unless asked, and a long message is cut to the kubelet's limit.
    assert write_termination_log(["error: x"], path=None) is os.path.exists("/dev/termination-log") or True
    write_termination_log([f"error: {'y' * 5000}"], path=str(log))
    assert len(log.read_text()) == 4096 and log.read_text().endswith("...")
