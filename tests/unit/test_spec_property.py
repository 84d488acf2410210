"""Property test: validation of any generated resource either accepts it or raises SpecError with field
paths (never another exception), and everything it accepts renders into Kubernetes objects."""

from __future__ import annotations

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from qwen_operator.api import validate_resource_spec
from qwen_operator.render import render
from qwen_trainer.spec import SpecError, presets

STAGES = ["convert", "pretrain", "finetune", "export", "evaluate"]
FORMATS = ["hf", "megatron-lm", "mcore", "torch_dist", "megablocks"]
small = st.sampled_from([1, 2, 3, 4, 8])


@st.composite
def family_and_size(draw):
    family = draw(st.sampled_from(presets.FAMILIES))
    return family, draw(st.sampled_from(presets.sizes(family)))


@st.composite
def resources(draw):
    family, size = draw(family_and_size())
    stage = draw(st.sampled_from(STAGES))
    spec: dict = {
        "stage": stage,
        "model": {"family": family, "size": size, "backend": draw(st.sampled_from(["megatron-lm", "megatron-core", "megablocks"]))},
        "parallelism": {
            "tensor": draw(small),
            "pipeline": draw(small),
            "context": draw(st.sampled_from([1, 2])),
            "expert": draw(small),
            "sequenceParallel": draw(st.booleans()),
            "distributedOptimizer": draw(st.booleans()),
        },
        "training": {
            "precision": draw(st.sampled_from(["bf16", "fp16", "fp8"])),
            "microBatchSize": draw(st.integers(min_value=-1, max_value=4)),
            "globalBatchSize": draw(st.sampled_from([1, 8, 12, 32, 64])),
            "seqLength": draw(st.sampled_from([128, 2048, 4097])),
            "transformerEngine": draw(st.booleans()),
            "lr": draw(st.sampled_from([1e-5, 3e-4, 0.0])),
        },
        "resources": {"nodes": draw(st.integers(min_value=1, max_value=4)), "gpusPerNode": draw(st.sampled_from([0, 1, 2, 4, 8]))},
    }
    if draw(st.booleans()):
        spec["training"][draw(st.sampled_from(["trainTokens", "trainIters", "epochs"]))] = draw(st.integers(min_value=1, max_value=10**10))
    if draw(st.booleans()):
        spec["model"]["moe"] = {"numExperts": draw(small), "topK": draw(st.sampled_from([1, 2, 4]))}
    if draw(st.booleans()):
        spec["data"] = {"pretrain": {"prefixes": [{"path": "/mnt/data/corpus"}]}}
    if draw(st.booleans()):
        spec.setdefault("data", {})["sft"] = {"trainPath": draw(st.sampled_from(["/mnt/sft.json", "sft.json"])), "packing": draw(st.booleans())}
    checkpoint = {}
    if draw(st.booleans()):
        checkpoint["source"] = {"path": "/mnt/in", "format": draw(st.sampled_from(FORMATS))}
    if draw(st.booleans()):
        checkpoint["output"] = {"path": "/mnt/out", "format": draw(st.sampled_from(FORMATS))}
    spec["checkpoint"] = checkpoint
    if stage == "evaluate":
        spec["evaluate"] = {"tasks": draw(st.lists(st.sampled_from(["mmlu", "perplexity"]), max_size=2))}
    return {
        "apiVersion": "training.qwen.dev/v1alpha1",
        "kind": "QwenTrainingJob",
        "metadata": {"name": "prop", "namespace": "default", "uid": "0000"},
        "spec": spec,
    }


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(resources())
def test_validation_never_crashes_and_accepted_specs_render(resource):
    try:
        validate_resource_spec(resource["spec"])
    except SpecError as err:
        assert err.problems and all(p.path.startswith("spec") and p.message for p in err.problems)
        event("rejected")
        return
    event("accepted")
    objects = render(resource)
    kinds = sorted(o["kind"] for o in objects)
    assert "PyTorchJob" in kinds and "ConfigMap" in kinds
