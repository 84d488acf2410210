"""Rules between a job and where it runs: training on CPU cannot use GPU-only features and must request cpu and
memory; world-size messages count processes, with the real numbers; the CRD says the same in CEL with field paths,
and names up to 63 characters are accepted (children get hashed short names)."""

from __future__ import annotations

import copy

import pytest
import yaml

from qwen_operator.api import validate_resource_spec
from qwen_operator.api.crd import build_crd
from qwen_operator.render import child_name, render
from tests.spec_cases import EXAMPLES
from qwen_trainer.spec import SpecError

MCORE_7B = yaml.safe_load((EXAMPLES / "mcore-dense-pretrain.yaml").read_text())


def problems(spec) -> list[str]:
    with pytest.raises(SpecError) as err:
        validate_resource_spec(spec)
    return [str(p) for p in err.value.problems]


def test_7b_pretrain_on_cpu_is_refused_naming_the_gpu_features_and_requests():
    spec = copy.deepcopy(MCORE_7B["spec"])
    spec["parallelism"].update({"tensor": 1, "pipeline": 1})
    spec["resources"] = {"nodes": 1, "gpusPerNode": 0}
    spec["training"].update({"transformerEngine": True, "flashAttention": True})
    found = problems(spec)
    gpu = [p for p in found if p.startswith("spec.resources.gpusPerNode:")]
    assert gpu and "on CPU" in gpu[0] and "training.transformerEngine" in gpu[0] \
        and "training.flashAttention" in gpu[0] and "megatron-core" in gpu[0]
    assert any(p.startswith("spec.resources.cpu:") and "resources.cpu and resources.memory" in p for p in found)


def test_cpu_training_with_requests_and_no_gpu_features_is_accepted():
    cpu = yaml.safe_load((EXAMPLES / "cpu-pretrain.yaml").read_text())
    assert validate_resource_spec(cpu["spec"]).resources.gpus_per_node == 0
    spec = copy.deepcopy(cpu["spec"])
    del spec["resources"]["memory"]
    assert problems(spec) == [
        "spec.resources.memory: the pretrain stage on CPU (gpusPerNode is 0) must request resources.memory: "
        "without them the pods may land on a node without room for the model"]
    # Conversion on CPU needs neither.
    convert = yaml.safe_load((EXAMPLES / "cpu-convert.yaml").read_text())["spec"]
    convert["resources"] = {"nodes": 1, "gpusPerNode": 0}
    validate_resource_spec(convert)


def test_world_size_messages_count_processes_with_the_real_numbers():
    spec = copy.deepcopy(MCORE_7B["spec"])
    spec["parallelism"].update({"tensor": 2, "pipeline": 1})
    spec["training"].update({"transformerEngine": False, "flashAttention": False})
    spec["resources"] = {"nodes": 1, "gpusPerNode": 0, "cpu": "8", "memory": "64Gi"}
    world = [p for p in problems(spec) if "tensor x pipeline x context" in p]
    assert world == ["spec.resources.gpusPerNode: the 1 processes (nodes x processesPerNode, on CPU: gpusPerNode is 0)"
                     " must be a multiple of tensor x pipeline x context = 2 x 1 x 1 = 2"]
    spec["resources"] = {"nodes": 1, "gpusPerNode": 3}
    world = [p for p in problems(spec) if "tensor x pipeline x context" in p]
    assert world and "the 3 processes (nodes x 3 GPUs per node)" in world[0]


def test_crd_rules_carry_field_paths_and_names_may_have_63_characters():
    crd = build_crd()
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert schema["properties"]["metadata"]["properties"]["name"]["maxLength"] == 63
    assert not [r for r in schema["x-kubernetes-validations"] if "metadata.name" in r["rule"]]
    for rule in schema["properties"]["spec"]["x-kubernetes-validations"]:
        assert rule.get("fieldPath"), rule
    rules = {r["fieldPath"]: r for r in schema["properties"]["spec"]["x-kubernetes-validations"]}
    assert "self.resources.gpusPerNode" in rules[".resources.gpusPerNode"]["rule"] or any(
        "transformerEngine" in r["rule"] and r["fieldPath"] == ".resources.gpusPerNode"
        for r in schema["properties"]["spec"]["x-kubernetes-validations"])
    assert "has(self.resources.memory)" in rules[".resources"]["rule"]


def test_63_character_names_render_children_with_short_hashed_names():
    name = "a" * 30 + "-" + "b" * 32
    assert len(name) == 63
    doc = yaml.safe_load((EXAMPLES / "cpu-convert.yaml").read_text())
    doc["metadata"].update({"name": name, "namespace": "ns"})
    cm, pj = render(doc)
    short = child_name(name)
    assert pj["metadata"]["name"] == short and len(short) <= 45 and short != child_name(name[:-1] + "c")
    assert len(f"{short}-worker-99") <= 63 and cm["metadata"]["name"] == f"{short}-spec"
    container = pj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert {"name": "QWEN_STATUS_RESOURCE", "value": f"ns/{name}"} in container["env"]
