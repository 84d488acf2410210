"""The operator's small pure helpers around the API client: the slimmed body cache, merge patches, the
jobs-by-phase counts."""

from __future__ import annotations

from qwen_operator.kube import Kube, _merge_patch, slim
from qwen_operator.metrics import JOBS, PhaseTracker


def body(rv: str, **status):
    return {
        "apiVersion": "training.qwen.dev/v1alpha1", "kind": "QwenTrainingJob",
        "metadata": {"name": "a", "namespace": "ns", "uid": "u1", "generation": 1, "resourceVersion": rv,
                     "labels": {"team": "x"},
                     "annotations": {"training.qwen.dev/last-handled-configuration": '{"spec": {}}\n',
                                     "note": "kept"},
                     "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}]},
        "spec": {"stage": "convert"},
        "status": status,
    }


def test_slim_drops_managed_fields_and_the_diffbase_but_shares_the_rest():
    b = body("5", phase="Created")
    s = slim(b)
    assert "managedFields" not in s["metadata"]
    assert s["metadata"]["annotations"] == {"note": "kept"}
    assert s["metadata"]["labels"] == {"team": "x"}
    assert s["metadata"]["resourceVersion"] == "5" and s["metadata"]["uid"] == "u1"
    assert s["spec"] is b["spec"] and s["status"] is b["status"]  # shared, not copied
    assert "managedFields" in b["metadata"]  # the original is untouched
    assert b["metadata"]["annotations"]["training.qwen.dev/last-handled-configuration"]


def test_slim_without_annotations():
    b = body("1")
    del b["metadata"]["annotations"]
    assert "annotations" not in slim(b)["metadata"]


def test_cache_keeps_the_newest_resource_version():
    kube = Kube.__new__(Kube)
    kube.cache = {}
    kube.remember(body("7", phase="Running"))
    kube.remember(body("6", phase="Created"))  # an older event arriving late
    assert kube.cache[("ns", "a")]["status"] == {"phase": "Running"}
    kube.remember(body("8", phase="Succeeded"))
    assert kube.cache[("ns", "a")]["status"] == {"phase": "Succeeded"}
    assert "managedFields" not in kube.cache[("ns", "a")]["metadata"]
    kube.forget("ns", "a")
    assert kube.cache == {}


def test_merge_patch():
    assert _merge_patch({"a": 1, "b": {"c": 1, "d": 2}}, {"a": 1, "b": {"c": 2, "d": 2}, "e": 3}) == \
        {"b": {"c": 2}, "e": 3}
    assert _merge_patch({"a": 1, "b": {"c": 1}}, {"b": {}}) == {"a": None, "b": {"c": None}}


def gauge(phase: str) -> float:
    return JOBS.labels(phase)._value.get()


def test_phase_tracker_counts_incrementally():
    t = PhaseTracker()
    for i in range(5):
        t.set("ns", f"j{i}", None)
    assert t.counts()["Pending"] == 5 and gauge("Pending") == 5
    t.set("ns", "j0", "Running")
    t.set("ns", "j0", "Running")  # unchanged: counted once
    t.set("ns", "j1", "Running")
    assert t.counts()["Pending"] == 3 and t.counts()["Running"] == 2
    assert gauge("Running") == 2
    t.forget("ns", "j0")
    t.forget("ns", "missing")
    assert t.counts()["Running"] == 1 and gauge("Running") == 1
    assert sum(t.counts().values()) == 4
