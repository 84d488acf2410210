"""The local control plane's command line is the harness's own (`qwen-devcluster`); `qwenctl dev-cluster`
only says where it went."""

from __future__ import annotations

import shlex
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

from qwen_devcluster import __main__ as devcluster_cli  # noqa: E402
from qwen_operator import cli as qwenctl  # noqa: E402


@pytest.mark.parametrize("argv", [["dev-cluster"], ["dev-cluster", "up", "--nodes", "2"],
                                  ["dev-cluster", "--state-dir", "/tmp/a b", "status"], ["dev-cluster", "--help"]])
def test_qwenctl_dev_cluster_points_to_qwen_devcluster(argv, capsys):
    assert qwenctl.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"qwenctl dev-cluster moved to the development harness: run {shlex.join(['qwen-devcluster', *argv[1:]])}"]


def test_qwenctl_help_still_lists_dev_cluster(capsys):
    with pytest.raises(SystemExit):
        qwenctl.main(["--help"])
    assert "qwen-devcluster" in capsys.readouterr().out


def test_the_console_script_is_the_harness_main():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, func = scripts["qwen-devcluster"].partition(":")
    assert module == devcluster_cli.__name__ and getattr(devcluster_cli, func) is devcluster_cli.main


def test_qwen_devcluster_keeps_the_options_of_qwenctl_dev_cluster(tmp_path):
    args = devcluster_cli.parser().parse_args(
        ["up", "--state-dir", str(tmp_path), "--build", "--nodes", "2", "--gpus-per-node", "4",
         "--no-training-operator", "--extras", "jobset,kueue"])
    assert (args.command, args.state_dir, args.build, args.nodes, args.gpus_per_node, args.no_training_operator,
            args.extras) == ("up", tmp_path, True, 2, 4, True, "jobset,kueue")
    assert devcluster_cli.parser().parse_args(["down", "--keep-logs"]).keep_logs


def test_qwen_devcluster_without_a_cluster(tmp_path, capsys):
    assert devcluster_cli.main(["status", "--state-dir", str(tmp_path)]) == 1
    assert devcluster_cli.main(["down", "--state-dir", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == [f"no cluster recorded in {tmp_path}"] * 2


def test_qwen_devcluster_reports_an_unexpected_error_in_one_line(tmp_path, monkeypatch, capsys):
    def broken(state_dir):
        raise RuntimeError("state file unreadable")

    monkeypatch.setattr(devcluster_cli, "status", broken)
    monkeypatch.delenv("QWEN_DEVCLUSTER_DEBUG", raising=False)
    assert devcluster_cli.main(["status", "--state-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "qwen-devcluster: internal error: RuntimeError: state file unreadable "
        "(set QWEN_DEVCLUSTER_DEBUG=1 for a traceback)"]
