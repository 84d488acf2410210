"""Smoke tests of the local control plane: real apiserver, controller-manager, scheduler,
training-operator, with kwok standing in for kubelets on fake GPU nodes."""

from __future__ import annotations

import time
from typing import Any, Callable

import pytest

k = pytest.importorskip("kubernetes.client")

from qwen_devcluster import DELAY_ANNOTATION, EXIT_CODE_ANNOTATION, OUTCOME_ANNOTATION  # noqa: E402

GROUP, VERSION, PLURAL = "kubeflow.org", "v1", "pytorchjobs"


def wait_for(what: str, fn: Callable[[], Any], timeout: float = 60.0, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def pytorchjob(name: str, annotations: dict[str, str] | None, workers: int = 1) -> dict[str, Any]:
    def replica(replicas: int) -> dict[str, Any]:
        return {
            "replicas": replicas,
            "restartPolicy": "Never",
            "template": {
                "metadata": {"annotations": dict(annotations or {})},
                "spec": {"containers": [{
                    "name": "pytorch",
                    "image": "registry.invalid/qwen/trainer:test",
                    "command": ["python", "-m", "qwen_trainer", "run"],
                    "resources": {"limits": {"nvidia.com/gpu": 8}, "requests": {"cpu": "4", "memory": "16Gi"}},
                }]},
            },
        }

    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "PyTorchJob",
        "metadata": {"name": name},
        "spec": {"pytorchReplicaSpecs": {"Master": replica(1), "Worker": replica(workers)}},
    }


def conditions(job: dict[str, Any]) -> dict[str, str]:
    return {c["type"]: c["status"] for c in job.get("status", {}).get("conditions", []) or []}


def test_fake_gpu_nodes_are_ready(cluster, kube_client):
    nodes = k.CoreV1Api(kube_client).list_node(label_selector="qwen.test/fake-node=true").items
    assert len(nodes) >= 2
    for n in nodes:
        assert n.status.capacity["nvidia.com/gpu"] == "8"
        assert n.status.allocatable["nvidia.com/gpu"] == "8"
        assert {"cpu", "memory", "pods"} <= set(n.status.allocatable)
        ready = [c for c in n.status.conditions if c.type == "Ready"]
        assert ready and ready[0].status == "True", n.metadata.name


def test_server_version_is_pinned(cluster, kube_client):
    info = k.VersionApi(kube_client).get_code()
    assert info.major == "1" and info.git_version.startswith("v1.")


def _run_job(kube_client, namespace: str, name: str, annotations: dict[str, str]) -> tuple[dict, set[str]]:
    """Create a PyTorchJob and follow it to a terminal condition; returns the job and every condition seen True."""
    co = k.CustomObjectsApi(kube_client)
    co.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, pytorchjob(name, annotations))
    seen: set[str] = set()

    def terminal():
        job = co.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        seen.update(t for t, s in conditions(job).items() if s == "True")
        return job if {"Succeeded", "Failed"} & {t for t, s in conditions(job).items() if s == "True"} else None

    job = wait_for(f"PyTorchJob {name} to finish", terminal, timeout=90, interval=0.1)
    return job, seen


def test_pytorchjob_runs_to_succeeded(cluster, kube_client, namespace):
    job, seen = _run_job(kube_client, namespace, "ok-job", {OUTCOME_ANNOTATION: "succeed", DELAY_ANNOTATION: "3s"})
    assert conditions(job).get("Succeeded") == "True", job.get("status")
    assert {"Created", "Running", "Succeeded"} <= seen
    # Real scheduling: both pods landed on fake GPU nodes, each taking a whole node's 8 GPUs.
    pods = k.CoreV1Api(kube_client).list_namespaced_pod(
        namespace, label_selector="training.kubeflow.org/job-name=ok-job").items
    assert sorted(p.metadata.name for p in pods) == ["ok-job-master-0", "ok-job-worker-0"]
    assert all(p.spec.node_name and p.spec.node_name.startswith("gpu-node-") for p in pods)
    assert len({p.spec.node_name for p in pods}) == 2
    assert job["status"]["replicaStatuses"]["Master"].get("succeeded") == 1


def test_pytorchjob_runs_to_failed(cluster, kube_client, namespace):
    job, seen = _run_job(kube_client, namespace, "bad-job",
                         {OUTCOME_ANNOTATION: "fail", DELAY_ANNOTATION: "2s", EXIT_CODE_ANNOTATION: "3"})
    assert conditions(job).get("Failed") == "True", job.get("status")
    assert "Succeeded" not in seen
    assert {"Created", "Running"} <= seen
    pod = k.CoreV1Api(kube_client).read_namespaced_pod("bad-job-master-0", namespace)
    assert pod.status.phase == "Failed"
    assert pod.status.container_statuses[0].state.terminated.exit_code == 3


def test_garbage_collector_deletes_dependents(cluster, kube_client, namespace):
    core = k.CoreV1Api(kube_client)
    owner = core.create_namespaced_config_map(namespace, k.V1ConfigMap(metadata=k.V1ObjectMeta(name="owner")))
    ref = k.V1OwnerReference(api_version="v1", kind="ConfigMap", name="owner", uid=owner.metadata.uid)
    core.create_namespaced_config_map(namespace, k.V1ConfigMap(
        metadata=k.V1ObjectMeta(name="child", owner_references=[ref]), data={"a": "b"}))
    core.delete_namespaced_config_map("owner", namespace)

    def child_gone():
        try:
            core.read_namespaced_config_map("child", namespace)
            return False
        except k.ApiException as e:
            return e.status == 404

    wait_for("the garbage collector to delete the dependent ConfigMap", child_gone, timeout=60)


def test_deleting_pytorchjob_removes_its_pods(cluster, kube_client, namespace):
    co, core = k.CustomObjectsApi(kube_client), k.CoreV1Api(kube_client)
    # No outcome annotation: the pods keep running until their owner goes away.
    co.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, pytorchjob("long-job", None))
    sel = "training.kubeflow.org/job-name=long-job"

    def both_running():
        pods = core.list_namespaced_pod(namespace, label_selector=sel).items
        return len(pods) == 2 and all(p.status.phase == "Running" for p in pods)

    wait_for("both pods Running", both_running, timeout=60)
    pods = core.list_namespaced_pod(namespace, label_selector=sel).items
    assert all(any(o.kind == "PyTorchJob" for o in p.metadata.owner_references or []) for p in pods)
    co.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "long-job")
    wait_for("pods and services of the deleted job to be garbage-collected",
             lambda: not core.list_namespaced_pod(namespace, label_selector=sel).items
             and not core.list_namespaced_service(namespace, label_selector=sel).items, timeout=60)


def test_measure_reports_every_component(cluster):
    m = cluster.measure()
    assert set(m["components"]) == {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler",
                                    "kwok-controller", "training-operator", *cluster.extras}
    assert all(c["alive"] for c in m["components"].values())
    assert m["total_rss_mib"] > 0 and m["startup_s"] > 0
