"""Pipelines: steps inherit the shared spec, override parts of it, read the previous step's output, and every
problem names its step."""

from __future__ import annotations

import copy

import pytest
import yaml

from qwen_operator.api import validate_resource_spec
from qwen_operator.api.pipeline import deep_merge, pipeline_steps
from tests.spec_cases import EXAMPLES
from qwen_trainer.spec import SpecError

PIPELINE = yaml.safe_load((EXAMPLES / "cpu-pipeline.yaml").read_text())["spec"]


def test_steps_are_wired_output_to_source():
    steps = pipeline_steps(PIPELINE)
    assert [n for n, _, _ in steps] == ["convert", "pretrain", "export"]
    convert, pretrain, export = (e for _, e, _ in steps)
    assert convert["checkpoint"]["source"] == {"path": "/data/tiny-moe-hf", "format": "hf"}
    assert pretrain["checkpoint"]["source"] == {"path": "/data/pipeline/mcore", "format": "mcore"}
    assert export["checkpoint"]["source"] == {"path": "/data/pipeline/pretrain", "format": "mcore"}
    assert pretrain["training"]["trainIters"] == 40 and pretrain["training"]["lr"] == 3.0e-3  # merged, not replaced
    assert "trainIters" not in convert["training"]


def test_problems_name_the_step():
    spec = copy.deepcopy(PIPELINE)
    spec["pipeline"][1]["training"]["minLr"] = 1.0
    spec["pipeline"][2]["checkpoint"] = {}
    with pytest.raises(SpecError) as info:
        validate_resource_spec(spec)
    paths = {p.path for p in info.value.problems}
    assert "spec.pipeline[1].training.minLr" in paths
    assert "spec.pipeline[2].checkpoint.output" in paths


@pytest.mark.parametrize(
    "mutate, path",
    [
        (lambda s: s.update(stage="pretrain"), "spec.stage"),
        (lambda s: s["checkpoint"].update(output={"path": "/x"}), "spec.checkpoint.output"),
        (lambda s: s["pipeline"][1].update(name="convert"), "spec.pipeline[1].name"),
        (lambda s: s["pipeline"][1].update(model={"family": "qwen3"}), "spec.pipeline[1].model"),
        (lambda s: s["pipeline"][0].update(name="Not_A_Label"), "spec.pipeline[0].name"),
        (lambda s: s.update(pipeline=[]), "spec.pipeline"),
    ],
)
def test_pipeline_shape_errors(mutate, path):
    spec = copy.deepcopy(PIPELINE)
    mutate(spec)
    with pytest.raises(SpecError) as info:
        validate_resource_spec(spec)
    assert path in {p.path for p in info.value.problems}, [str(p) for p in info.value.problems]


def test_neither_stage_nor_pipeline():
    spec = copy.deepcopy(PIPELINE)
    del spec["pipeline"]
    with pytest.raises(SpecError) as info:
        validate_resource_spec(spec)
    assert "spec.stage" in {p.path for p in info.value.problems}


def test_deep_merge_keeps_unrelated_keys():
    assert deep_merge({"a": {"b": 1, "c": 2}, "d": 3}, {"a": {"b": 5}}) == {"a": {"b": 5, "c": 2}, "d": 3}
