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


@pytest.fixture
def local_queue(cluster, kube_client, namespace):
    """A ResourceFlavor, a ClusterQueue of 8 GPUs (cpu and memory to spare) and a LocalQueue `lq` in the test's
    namespace; the cluster-scoped ones are removed afterwards."""
    need_extras(cluster, "kueue")
    co = k.CustomObjectsApi(kube_client)
    suffix = uuid.uuid4().hex[:6]
    flavor, cq = f"default-{suffix}", f"gpus-{suffix}"
    co.create_cluster_custom_object(G, V, "resourceflavors", {
        "apiVersion": f"{G}/{V}", "kind": "ResourceFlavor", "metadata": {"name": flavor}})
    co.create_cluster_custom_object(G, V, "clusterqueues", {
        "apiVersion": f"{G}/{V}", "kind": "ClusterQueue", "metadata": {"name": cq},
        "spec": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                 "resourceGroups": [{"coveredResources": ["cpu", "memory", "nvidia.com/gpu"],
                                     "flavors": [{"name": flavor, "resources": [
                                         {"name": "cpu", "nominalQuota": "64"},
                                         {"name": "memory", "nominalQuota": "256Gi"},
                                         {"name": "nvidia.com/gpu", "nominalQuota": "8"}]}]}]}})
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
