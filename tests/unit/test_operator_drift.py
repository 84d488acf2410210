"""Detecting hand-made changes to children, while allowing defaulting and Kueue's edits (pure)."""

from __future__ import annotations

import copy

import pytest

from qwen_operator.drift import child_drift, differences
from qwen_operator.render import render

RES = {
    "apiVersion": "training.qwen.dev/v1alpha1", "kind": "QwenTrainingJob",
    "metadata": {"name": "d", "namespace": "ns", "uid": "u"},
    "spec": {"stage": "convert", "model": {"family": "qwen2.5", "size": "0.5B"},
             "checkpoint": {"source": {"path": "/a"}, "output": {"path": "/b"}},
             "training": {"globalBatchSize": 16},
             "resources": {"nodes": 2, "gpusPerNode": 8},
             "scheduling": {"tolerations": [{"key": "gpu", "operator": "Exists"}], "queueName": "q"}},
}


@pytest.fixture
def rendered():
    return render(copy.deepcopy(RES))


def master(pj):
    return pj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]


def test_identical_is_clean(rendered):
    cm, pj = rendered
    assert child_drift(pj, copy.deepcopy(pj)) == []
    assert child_drift(cm, copy.deepcopy(cm)) == []


def test_defaulting_and_kueue_edits_are_allowed(rendered):
    _, pj = rendered
    live = copy.deepcopy(pj)
    live["spec"]["runPolicy"]["suspend"] = True  # Kueue
    live["spec"]["runPolicy"]["managedBy"] = "kubeflow.org/training-operator"
    m = master(live)
    m["nodeSelector"] = {"flavor": "h100"}  # Kueue ResourceFlavor
    m["tolerations"].append({"key": "flavor", "operator": "Exists"})
    m["containers"][0]["terminationMessagePath"] = "/dev/termination-log"  # defaulting
    live["metadata"]["labels"]["extra"] = "x"
    live["status"] = {"conditions": []}
    assert child_drift(pj, live) == []


@pytest.mark.parametrize(
    "mutate, path",
    [
        (lambda pj: pj["spec"]["pytorchReplicaSpecs"]["Worker"].__setitem__("replicas", 5),
         "spec.pytorchReplicaSpecs.Worker.replicas"),
        (lambda pj: master(pj)["containers"][0].__setitem__("image", "evil:1"),
         "spec.pytorchReplicaSpecs.Master.template.spec.containers[0].image"),
        (lambda pj: master(pj)["containers"][0]["command"].append("--extra"),
         "spec.pytorchReplicaSpecs.Master.template.spec.containers[0].command"),
        (lambda pj: master(pj)["tolerations"].pop(0),
         "spec.pytorchReplicaSpecs.Master.template.spec.tolerations"),
        (lambda pj: pj["spec"].__setitem__("nprocPerNode", "1"), "spec.nprocPerNode"),
        (lambda pj: pj["metadata"]["labels"].pop("kueue.x-k8s.io/queue-name"),
         "metadata.labels.kueue.x-k8s.io/queue-name"),
        (lambda pj: pj["spec"]["runPolicy"].pop("backoffLimit"), "spec.runPolicy.backoffLimit"),
    ],
)
def test_hand_edits_are_found(rendered, mutate, path):
    _, pj = rendered
    live = copy.deepcopy(pj)
    mutate(live)
    assert path in child_drift(pj, live)


def test_configmap_data_change_is_found(rendered):
    cm, _ = rendered
    live = copy.deepcopy(cm)
    live["data"]["job.yaml"] = "spec: {}\n"
    assert child_drift(cm, live) == ["data.job.yaml"]


def test_quantities_compare_as_strings():
    assert differences({"gpu": 8}, {"gpu": "8"}) == []
    assert differences({"flag": True}, {"flag": "True"}) == ["flag"]
