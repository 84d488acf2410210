"""The MemoryFits condition: a training stage's memory estimate (qwenctl explain's) against its card."""

from __future__ import annotations

import copy

import yaml

from qwen_operator import conditions as cnd
from qwen_operator.api.devices import EXCEEDS, FITS, NOT_ESTIMATED, PRODUCT_LABEL, device_memory, memory_fit
from qwen_operator.api import validate_resource_spec

EXAMPLES = "manifests/examples"
NO_MODEL_PARALLEL = {"parallelism.tensor": 1, "parallelism.pipeline": 1, "parallelism.sequenceParallel": False,
                     "parallelism.distributedOptimizer": False}


def _spec(name: str, **changes):
    doc = yaml.safe_load(open(f"{EXAMPLES}/{name}"))["spec"]
    for path, value in changes.items():
        node = doc
        keys = path.split(".")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return validate_resource_spec(copy.deepcopy(doc))


def test_7b_without_model_parallelism_exceeds_an_80_gb_card_and_says_what_to_change():
    spec = _spec("mcore-dense-pretrain.yaml", **NO_MODEL_PARALLEL)
    status, reason, message = memory_fit(spec, 79)
    assert (status, reason) == ("False", EXCEEDS)
    assert "GiB per GPU" in message and "tensor 1 x pipeline 1" in message and "--gpu-memory-gib" in message
    need = float(message.split("estimated ")[1].split(" GiB")[0])
    assert need > 79


def test_the_card_named_in_the_node_selector_wins_over_the_operator_default():
    spec = _spec("mcore-dense-pretrain.yaml", **NO_MODEL_PARALLEL)
    need = float(memory_fit(spec, 79)[2].split("estimated ")[1].split(" GiB")[0])
    roomy = _spec("mcore-dense-pretrain.yaml", **NO_MODEL_PARALLEL,
                  **{"scheduling.nodeSelector": {PRODUCT_LABEL: "NVIDIA-B200"}})
    assert memory_fit(roomy, 79)[:2] == (("True", FITS) if need <= 178 else ("False", EXCEEDS))
    assert "NVIDIA-B200" in memory_fit(roomy, 79)[2]
    assert device_memory({PRODUCT_LABEL: "NVIDIA-H200"}, 79)[0] == 139
    assert device_memory({PRODUCT_LABEL: "Some-New-Card"}, 79) == (79.0, "unknown nvidia.com/gpu.product "
                                                                       "'Some-New-Card'; the operator's --gpu-memory-gib")
    assert device_memory({}, None)[0] is None


def test_the_shipped_example_fits_and_other_stages_are_not_estimated():
    assert memory_fit(_spec("mcore-dense-pretrain.yaml"), 79)[:2] == ("True", FITS)
    assert memory_fit(_spec("mcore-dense-convert.yaml"), 79) == ("True", NOT_ESTIMATED, "not a training stage on GPUs")
    assert memory_fit(_spec("cpu-pretrain.yaml"), 79)[1] == NOT_ESTIMATED
    unknown = _spec("mcore-dense-pretrain.yaml")
    assert memory_fit(unknown, None)[:2] == ("Unknown", NOT_ESTIMATED)


def test_reconciled_status_carries_the_condition_without_changing_the_phase():
    miss = ("False", EXCEEDS, "estimated 150.0 GiB per GPU ...")
    status = cnd.reconciled(None, 1, "2026-12-06T00:00:00Z", pytorch_job="j", memory=miss)
    got = {c["type"]: c for c in status["conditions"]}
    assert got[cnd.MEMORY_FITS]["status"] == "False" and got[cnd.MEMORY_FITS]["reason"] == EXCEEDS
    assert status["phase"] == cnd.reconciled(None, 1, "2026-12-06T00:00:00Z", pytorch_job="j")["phase"]
