"""`qwenctl run --local --dry-run`: the pod's command for each step, and `--from-step` to start a pipeline where the
operator would resume it after a fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from qwen_operator.cli import main

PIPELINE = Path(__file__).resolve().parents[2] / "manifests" / "examples" / "cpu-pipeline.yaml"
SINGLE = Path(__file__).resolve().parents[2] / "manifests" / "examples" / "cpu-pretrain.yaml"


def _steps_run(err: str) -> list[str]:
    return [line.split()[2] for line in err.splitlines() if line.startswith("qwenctl: step ")]


def test_every_step_by_default(tmp_path, capsys):
    assert main(["run", str(PIPELINE), "--local", "--root", str(tmp_path), "--dry-run"]) == 0
    assert _steps_run(capsys.readouterr().err) == ["convert", "pretrain", "export"]


def test_from_step_starts_the_pipeline_there(tmp_path, capsys):
    assert main(["run", str(PIPELINE), "--local", "--root", str(tmp_path), "--dry-run", "--from-step", "pretrain"]) == 0
    captured = capsys.readouterr()
    assert _steps_run(captured.err) == ["pretrain", "export"]
    assert "stage: pretrain" in captured.out  # the job spec the first step's pod would get


@pytest.mark.parametrize("file,step,message", [
    (PIPELINE, "train", "--from-step train: the resource's steps are convert, pretrain, export"),
    (SINGLE, "pretrain", "--from-step needs a resource with spec.pipeline"),
])
def test_unknown_step_is_one_line(tmp_path, capsys, file, step, message):
    assert main(["run", str(file), "--local", "--root", str(tmp_path), "--dry-run", "--from-step", step]) != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
