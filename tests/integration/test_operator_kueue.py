"""Kueue on the real Kueue controller (v0.17.0), for both job APIs: a ClusterQueue of 8 GPUs and two 8-GPU
resources. The first is admitted and runs; the second waits with a `Queued` condition saying it waits for quota
(the words of its Kueue Workload), its child suspended and no pod; when the first finishes, Kueue admits the
second and it runs."""

from __future__ import annotations

import uuid

import pytest
from kubernetes import client as k
from kubernetes.client.exceptions import ApiException

from tests.integration.conftest import need_extras
from tests.integration.operator_support import (  # noqa: F401  (crds, jobs, operator are fixtures)
    both_apis, crds, jobs, operator, tiny_job, wait_for,
)

G, V = "kueue.x-k8s.io", "v1beta2"
GPUS = {"nodes": 1, "gpusPerNode": 8, "processesPerNode": 8}


def _make_queue(cluster, kube_client, namespace, preemption=None):
    """A ResourceFlavor, a ClusterQueue of 8 GPUs (cpu and memory to spare, `preemption` as given) and a LocalQueue
    `lq` in the test's namespace; yields the ClusterQueue's name and removes the cluster-scoped ones afterwards."""
    need_extras(cluster, "kueue")
    co = k.CustomObjectsApi(kube_client)
    suffix = uuid.uuid4().hex[:6]
    flavor, cq = f"default-{suffix}", f"gpus-{suffix}"
    co.create_cluster_custom_object(G, V, "resourceflavors", {
        "apiVersion": f"{G}/{V}", "kind": "ResourceFlavor", "metadata": {"name": flavor}})
    spec = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
            "resourceGroups": [{"coveredResources": ["cpu", "memory", "nvidia.com/gpu"],
                                "flavors": [{"name": flavor, "resources": [
                                    {"name": "cpu", "nominalQuota": "64"},
                                    {"name": "memory", "nominalQuota": "256Gi"},
                                    {"name": "nvidia.com/gpu", "nominalQuota": "8"}]}]}]}
    if preemption:
        spec["preemption"] = preemption
    co.create_cluster_custom_object(G, V, "clusterqueues", {
        "apiVersion": f"{G}/{V}", "kind": "ClusterQueue", "metadata": {"name": cq}, "spec": spec})
    co.create_namespaced_custom_object(G, V, namespace, "localqueues", {
        "apiVersion": f"{G}/{V}", "kind": "LocalQueue", "metadata": {"name": "lq"}, "spec": {"clusterQueue": cq}})
    wait_for(lambda: any(c["type"] == "Active" and c["status"] == "True" for c in
                         (co.get_cluster_custom_object(G, V, "clusterqueues", cq).get("status") or {})
                         .get("conditions") or []), 30, what=f"ClusterQueue {cq} Active")
    yield cq
    for plural, name in (("clusterqueues", cq), ("resourceflavors", flavor)):
        try:
            co.delete_cluster_custom_object(G, V, plural, name)
        except ApiException as e:
            if e.status != 404:
                raise


@pytest.fixture
def local_queue(cluster, kube_client, namespace):
    yield from _make_queue(cluster, kube_client, namespace)


@pytest.fixture
def preempting_queue(cluster, kube_client, namespace):
    """The same queue, whose ClusterQueue preempts lower-priority workloads for a higher-priority one."""
    yield from _make_queue(cluster, kube_client, namespace, {"withinClusterQueue": "LowerPriority"})


@pytest.fixture
def priority_classes(cluster, kube_client):
    """Two Kueue WorkloadPriorityClasses, (low, high), values 100 and 10000."""
    need_extras(cluster, "kueue")
    co = k.CustomObjectsApi(kube_client)
    suffix = uuid.uuid4().hex[:6]
    names = (f"low-{suffix}", f"high-{suffix}")
    for name, value in zip(names, (100, 10000)):
        co.create_cluster_custom_object(G, V, "workloadpriorityclasses", {
            "apiVersion": f"{G}/{V}", "kind": "WorkloadPriorityClass", "metadata": {"name": name}, "value": value,
            "description": f"test priority {value}"})
    yield names
    for name in names:
        try:
            co.delete_cluster_custom_object(G, V, "workloadpriorityclasses", name)
        except ApiException as e:
            if e.status != 404:
                raise


def _queued(jobs, name):
    return jobs.condition(name, "Queued")


def _workload_of(jobs, child):
    for w in jobs.custom.list_namespaced_custom_object(G, V, jobs.ns, "workloads")["items"]:
        if any(r.get("name") == child for r in w["metadata"].get("ownerReferences") or []):
            return w
    return None


@both_apis
def test_second_8_gpu_job_is_queued_for_quota_and_runs_when_the_first_finishes(cluster, operator, jobs, namespace,
                                                                               local_queue):
    # The first names the queue in its spec; it is admitted and runs.
    jobs.create(tiny_job("first", namespace, resources=GPUS, scheduling={"queueName": "lq"}))
    admitted = wait_for(lambda: (q := _queued(jobs, "first")).get("reason") == "Admitted" and q, 60,
                        what="the first admitted")
    assert admitted["status"] == "False" and f"admitted by ClusterQueue {local_queue}" in admitted["message"]
    jobs.wait_phase("first", "Running", 60)
    assert jobs.child("first")["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "lq"
    assert jobs.child_suspended("first") is False  # Kueue unsuspended what the operator created suspended

    # The second names it with the standard label on the resource; the quota is taken.
    second = tiny_job("second", namespace, resources=GPUS)
    second["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "lq"}
    jobs.create(second)
    waiting = wait_for(lambda: (q := _queued(jobs, "second")).get("reason") == "WaitingForQuota" and q, 60,
                       what="the second waiting for quota")
    assert waiting["status"] == "True"
    assert waiting["message"].startswith("waiting for quota in LocalQueue lq: couldn't assign flavors to pod set")
    assert "insufficient unused quota for nvidia.com/gpu" in waiting["message"]
    # ... in the Workload's own words.
    workload = _workload_of(jobs, "second")
    reserved = next(c for c in workload["status"]["conditions"] if c["type"] == "QuotaReserved")
    assert reserved["status"] == "False" and reserved["message"] in waiting["message"]
    assert workload["metadata"]["name"] in waiting["message"]
    status = jobs.get("second")["status"]
    assert status["phase"] == "Queued"
    summary = next(c for c in status["conditions"] if c["type"] == "Succeeded")
    assert summary["status"] == "Unknown" and summary["message"] == waiting["message"]  # kubectl get -o wide
    assert jobs.child_suspended("second") is True and jobs.pods("second") == []
    wait_for(lambda: [e for e in jobs.events("second") if e.reason == "Queued" and e.type == "Normal"], 30,
             what="Queued event")

    # The first finishes: Kueue admits the second, which runs.
    cluster.set_pod_outcome(namespace, "training.qwen.dev/job=first", "succeed", delay="1s")
    jobs.wait_phase("first", "Succeeded", 60)
    admitted = wait_for(lambda: (q := _queued(jobs, "second")).get("reason") == "Admitted" and q, 90,
                        what="the second admitted")
    assert admitted["status"] == "False"
    jobs.wait_phase("second", "Running", 60)
    assert len(jobs.pods("second")) == 1 and jobs.child_suspended("second") is False
    assert wait_for(lambda: [e for e in jobs.events("second") if e.reason == "Admitted"], 30, what="Admitted event")
    assert _queued(jobs, "first")["reason"] == "Admitted"  # a finished job keeps its last word


@both_apis
def test_a_higher_priority_job_preempts_a_lower_one_which_runs_again_when_it_finishes(
        cluster, operator, jobs, namespace, preempting_queue, priority_classes):
    low_class, high_class = priority_classes
    # The low one names its WorkloadPriorityClass in its spec; it is admitted and runs.
    jobs.create(tiny_job("low", namespace, resources=GPUS,
                         scheduling={"queueName": "lq", "workloadPriorityClassName": low_class}))
    wait_for(lambda: _queued(jobs, "low").get("reason") == "Admitted", 60, what="the low one admitted")
    jobs.wait_phase("low", "Running", 60)
    low_child = jobs.child("low")
    assert low_child["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == low_class
    low_workload = _workload_of(jobs, low_child["metadata"]["name"])
    assert low_workload["spec"]["priorityClassRef"] == {"group": G, "kind": "WorkloadPriorityClass",
                                                        "name": low_class}
    assert low_workload["spec"]["priority"] == 100

    # The high one names its class with the standard label on the resource; the ClusterQueue preempts the low one.
    high = tiny_job("high", namespace, resources=GPUS, scheduling={"queueName": "lq"})
    high["metadata"]["labels"] = {"kueue.x-k8s.io/priority-class": high_class}
    jobs.create(high)
    preempted = wait_for(lambda: (q := _queued(jobs, "low")).get("reason") == "Preempted" and q, 90,
                         what="the low one preempted")
    assert preempted["status"] == "True"
    assert "Preempted to accommodate a workload" in preempted["message"]
    assert "prioritization in the ClusterQueue" in preempted["message"]
    assert low_workload["metadata"]["name"] in preempted["message"]
    assert "QwenTrainingJob high" in preempted["message"]  # the preemptor, by the resource's name
    # ... from the Workload's own conditions.
    workload = _workload_of(jobs, low_child["metadata"]["name"])
    conds = {c["type"]: c for c in workload["status"]["conditions"]}
    assert conds["Evicted"]["status"] == "True" and conds["Evicted"]["reason"] == "Preempted"
    assert conds["Preempted"]["status"] == "True" and conds["Preempted"]["reason"] == "InClusterQueue"
    warning = wait_for(lambda: [e for e in jobs.events("low") if e.reason == "Preempted" and e.type == "Warning"],
                       30, what="Preempted Warning event")
    assert "QwenTrainingJob high" in warning[0].message

    # The high one is admitted and runs; the low one is suspended, its pods gone, and waits (phase Queued).
    wait_for(lambda: _queued(jobs, "high").get("reason") == "Admitted", 90, what="the high one admitted")
    jobs.wait_phase("high", "Running", 60)
    assert jobs.get("high")["status"].get("phase") == "Running"
    assert _workload_of(jobs, jobs.child("high")["metadata"]["name"])["spec"]["priority"] == 10000
    wait_for(lambda: jobs.child_suspended("low") is True and jobs.pods("low") == [], 60,
             what="the low one suspended, its pods gone")
    low = jobs.get("low")["status"]
    assert low["phase"] == "Queued"
    summary = next(c for c in low["conditions"] if c["type"] == "Succeeded")
    assert summary["status"] == "Unknown" and "Preempted" in summary["message"]

    # The high one finishes: the low one is admitted again and runs.
    cluster.set_pod_outcome(namespace, "training.qwen.dev/job=high", "succeed", delay="1s")
    jobs.wait_phase("high", "Succeeded", 60)
    wait_for(lambda: _queued(jobs, "low").get("reason") == "Admitted", 90, what="the low one admitted again")
    jobs.wait_phase("low", "Running", 60)
    assert len(jobs.pods("low")) == 1 and jobs.child_suspended("low") is False
    assert wait_for(lambda: len([e for e in jobs.events("low") if e.reason == "Admitted"]) >= 2 or
                    [e for e in jobs.events("low") if e.reason == "Admitted" and (e.count or 1) >= 2], 30,
                    what="a second Admitted event")


def test_a_pytorchjob_takes_its_kueue_priority_from_the_pods_priority_class(cluster, operator, jobs, namespace,
                                                                             local_queue, kube_client):
    """Without a WorkloadPriorityClass, Kueue reads a PyTorchJob's priority from its pods' PriorityClass
    (spec.scheduling.priorityClassName). A TrainJob cannot set it (the operator refuses it: unit-tested)."""
    sched = k.SchedulingV1Api(kube_client)
    name = f"train-{uuid.uuid4().hex[:6]}"
    sched.create_priority_class(k.V1PriorityClass(metadata=k.V1ObjectMeta(name=name), value=500))
    try:
        jobs.create(tiny_job("pc", namespace, resources=GPUS,
                             scheduling={"queueName": "lq", "priorityClassName": name}))
        workload = wait_for(lambda: (w := _workload_of(jobs, jobs.child("pc")["metadata"]["name"])) and
                            w["spec"].get("priority") is not None and w, 60, what="the Workload's priority")
        assert workload["spec"]["priorityClassRef"] == {"group": "scheduling.k8s.io", "kind": "PriorityClass",
                                                        "name": name}
        assert workload["spec"]["priority"] == 500
        jobs.wait_phase("pc", "Running", 60)
        assert {p.spec.priority_class_name for p in jobs.pods("pc")} == {name}
    finally:
        sched.delete_priority_class(name)
