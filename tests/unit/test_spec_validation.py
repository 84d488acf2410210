"""Every example validates; every broken spec fails naming its field; the CLI never shows a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from qwen_operator.api import validate_resource_spec
from qwen_operator.api.pipeline import pipeline_steps
from tests.spec_cases import CASES, EXAMPLES, Case
from qwen_trainer.spec import SpecError, derive, load_job_spec

EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_examples_are_valid(path):
    doc = yaml.safe_load(path.read_text())
    spec = validate_resource_spec(doc["spec"])
    steps = [s for _, _, s in pipeline_steps(doc["spec"])] if spec.pipeline else [spec]
    for step in steps:
        derived = derive(step.job_spec(), step.world_size())
        assert derived.world_size == step.world_size()
        assert derived.padded_vocab_size >= 151936 or step.model.architecture.vocab_size


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_broken_spec_names_its_field(case: Case):
    with pytest.raises(SpecError) as info:
        validate_resource_spec(case.resource()["spec"])
    paths = [p.path for p in info.value.problems]
    assert case.path in paths, f"expected a problem at {case.path}, got {[str(p) for p in info.value.problems]}"
    for problem in info.value.problems:
        assert problem.message and problem.path.startswith("spec")


def test_every_problem_is_reported_not_just_the_first():
    doc = CASES[0].resource()
    doc["spec"]["parallelism"]["sequenceParallel"] = True
    doc["spec"]["training"]["minLr"] = 1.0
    doc["spec"]["training"]["precision"] = "fp8"
    doc["spec"]["training"]["transformerEngine"] = False
    with pytest.raises(SpecError) as info:
        validate_resource_spec(doc["spec"])
    paths = {p.path for p in info.value.problems}
    assert {"spec.parallelism.tensor", "spec.training.minLr", "spec.training.precision"} <= paths


def test_iterations_follow_the_seed_arithmetic():
    spec = load_job_spec(
        {
            "stage": "pretrain",
            "model": {"family": "qwen1.5", "size": "0.5B"},
            "training": {"trainTokens": 10_000_000_000, "warmupTokens": 100_000, "globalBatchSize": 8, "seqLength": 2048},
            "data": {"pretrain": {"prefixes": [{"path": "/d"}]}},
            "checkpoint": {"output": {"path": "/o"}},
        },
        world_size=8,
    )
    d = derive(spec, 8)
    assert (d.train_iters, d.warmup_iters, d.decay_iters) == (610351, 6, 610351)
    assert d.padded_vocab_size == 151936 and d.data_parallel_size == 8 and d.gradient_accumulation_steps == 1


def test_iteration_schedule_decays_after_warmup():
    spec = load_job_spec(
        {
            "stage": "finetune",
            "model": {"family": "qwen2.5", "size": "7B", "backend": "megatron-lm"},
            "training": {"trainIters": 1000, "warmupIters": 10},
            "data": {"sft": {"trainPath": "/d.json"}},
            "checkpoint": {"output": {"path": "/o"}},
        }
    )
    d = derive(spec)
    assert (d.train_iters, d.warmup_iters, d.decay_iters) == (1000, 10, 990)
    assert d.padded_vocab_size == 152064 and d.lr_decay_style == "linear" and d.init_method_std == 0.006


def _qwenctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qwen_operator.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_validates_examples():
    result = _qwenctl("validate", *map(str, EXAMPLE_FILES))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(": valid") == len(EXAMPLE_FILES)


def test_cli_reports_broken_specs_with_paths(tmp_path):
    files = []
    for case in CASES:
        f = tmp_path / f"{case.id}.yaml"
        f.write_text(yaml.safe_dump(case.resource()))
        files.append(str(f))
    result = _qwenctl("validate", *files)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    for case, f in zip(CASES, files):
        lines = [line for line in result.stderr.splitlines() if line.startswith(f)]
        assert any(f": {case.path}: " in line for line in lines), (case.id, lines)


@pytest.mark.parametrize(
    "content, expected",
    [
        ("{not yaml: [", "is not valid YAML"),
        ("kind: ConfigMap\n", "no QwenTrainingJob document"),
        ("apiVersion: wrong/v1\nkind: QwenTrainingJob\nmetadata: {name: x}\nspec: {}\n", "apiVersion must be"),
        ("apiVersion: training.qwen.dev/v1alpha1\nkind: QwenTrainingJob\nmetadata: {name: x}\nspec: 3\n", "spec: expected a mapping"),
    ],
)
def test_cli_bad_files(tmp_path, content, expected):
    f = tmp_path / "bad.yaml"
    f.write_text(content)
    result = _qwenctl("validate", str(f))
    assert result.returncode == 1
    assert expected in result.stderr and "Traceback" not in result.stderr


def test_cli_missing_file():
    result = _qwenctl("validate", "/nonexistent/job.yaml")
    assert result.returncode == 1 and "no such file" in result.stderr


def test_cli_explain_reports_derived_values():
    result = _qwenctl("explain", str(EXAMPLES / "qwen-moe-pretrain.yaml"), "-o", "json")
    assert result.returncode == 0, result.stderr
    import json

    report = json.loads(result.stdout)
    assert report["derived"]["trainIters"] == 610351
    assert report["derived"]["worldSize"] == 8
    assert report["memoryPerGpuEstimate"]["totalGib"] > 0
