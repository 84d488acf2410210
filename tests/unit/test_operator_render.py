"""Rendering a QwenTrainingJob into its ConfigMap and PyTorchJob (pure functions)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from qwen_operator import render as r
from qwen_trainer.spec import SpecError

# Single-stage examples; multi-step pipelines (spec.pipeline) are not rendered into one PyTorchJob.
EXAMPLES = sorted(p for p in (Path(__file__).resolve().parents[2] / "manifests" / "examples").glob("*.yaml")
                  if "pipeline" not in (yaml.safe_load(p.read_text()).get("spec") or {}))

BASE = {
    "apiVersion": "training.qwen.dev/v1alpha1",
    "kind": "QwenTrainingJob",
    "metadata": {"name": "tiny", "namespace": "team-a", "uid": "1234-abcd"},
    "spec": {
        "stage": "convert",
        "model": {"family": "qwen2.5", "size": "0.5B"},
        "checkpoint": {"source": {"path": "/data/hf"}, "output": {"path": "/data/mcore"}},
        "training": {"globalBatchSize": 48},
        "resources": {"nodes": 3, "gpusPerNode": 8, "cpu": "16", "memory": "128Gi", "sharedMemory": "32Gi"},
    },
}


def resource(**spec_overrides):
    res = copy.deepcopy(BASE)
    for key, value in spec_overrides.items():
        res["spec"][key] = value
    return res


def container(pj, rtype="Master"):
    return pj["spec"]["pytorchReplicaSpecs"][rtype]["template"]["spec"]["containers"][0]


def env_of(pj):
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(pj)["env"]}


def test_render_returns_configmap_then_pytorchjob():
    cm, pj = r.render(resource())
    assert cm["kind"] == "ConfigMap" and pj["kind"] == "PyTorchJob"
    assert pj["apiVersion"] == "kubeflow.org/v1"
    assert pj["metadata"]["name"] == "tiny" and cm["metadata"]["name"] == "tiny-spec"
    assert cm["metadata"]["namespace"] == pj["metadata"]["namespace"] == "team-a"


def test_replicas_master_plus_workers_and_nproc():
    _, pj = r.render(resource())
    specs = pj["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1
    assert specs["Worker"]["replicas"] == 2
    assert pj["spec"]["nprocPerNode"] == "8"
    cmd = container(pj)["command"]
    assert cmd[0] == "torchrun"
    assert "--nproc-per-node=8" in cmd
    assert "--nnodes=$(PET_NNODES)" in cmd and "--node-rank=$(PET_NODE_RANK)" in cmd
    assert "--master-addr=$(PET_MASTER_ADDR)" in cmd and "--master-port=$(PET_MASTER_PORT)" in cmd
    assert cmd[-5:] == ["-m", "qwen_trainer", "run", "--spec", "/etc/qwen/job.yaml"]


def test_single_node_has_no_worker_spec():
    _, pj = r.render(resource(resources={"nodes": 1, "gpusPerNode": 0, "processesPerNode": 2}, training={"globalBatchSize": 8}))
    assert set(pj["spec"]["pytorchReplicaSpecs"]) == {"Master"}
    assert pj["spec"]["nprocPerNode"] == "2"
    assert "resources" not in container(pj) or "nvidia.com/gpu" not in container(pj)["resources"].get("limits", {})


def test_container_basics():
    _, pj = r.render(resource())
    c = container(pj)
    assert c["name"] == "pytorch"
    assert c["resources"]["limits"] == {"nvidia.com/gpu": 8, "cpu": "16", "memory": "128Gi"}
    assert c["resources"]["requests"] == {"cpu": "16", "memory": "128Gi"}
    assert c["ports"] == [{"name": "pytorchjob-port", "containerPort": 23456, "protocol": "TCP"}]
    pod = pj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    shm = next(v for v in pod["volumes"] if v["name"] == r.SHM_VOLUME)
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "32Gi"}
    cmv = next(v for v in pod["volumes"] if v["name"] == r.SPEC_VOLUME)
    assert cmv["configMap"]["name"] == "tiny-spec"
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/etc/qwen"]["readOnly"] is True and "/dev/shm" in mounts


def test_env():
    env = env_of(r.render(resource(nccl={"debug": "INFO", "socketIfname": "eth0", "ibDisable": True,
                                         "timeoutSeconds": 600, "extra": {"NCCL_P2P_LEVEL": "NVL"}}))[1])
    assert env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert env["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "true"
    assert env["QWEN_DIST_TIMEOUT_SECONDS"] == "600"
    assert env["QWEN_STATUS_RESOURCE"] == "team-a/tiny"
    assert env["NCCL_DEBUG"] == "INFO" and env["NCCL_SOCKET_IFNAME"] == "eth0" and env["NCCL_IB_DISABLE"] == "1"
    assert env["NCCL_P2P_LEVEL"] == "NVL"


def test_user_env_replaces_ours_without_duplicates():
    _, pj = r.render(resource(env=[{"name": "CUDA_DEVICE_MAX_CONNECTIONS", "value": "8"},
                                   {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]))
    names = [e["name"] for e in container(pj)["env"]]
    assert names.count("CUDA_DEVICE_MAX_CONNECTIONS") == 1
    assert env_of(pj)["CUDA_DEVICE_MAX_CONNECTIONS"] == "8"
    assert env_of(pj)["TOKEN"] == {"secretKeyRef": {"name": "s", "key": "k"}}


def test_placement_fields():
    _, pj = r.render(resource(
        scheduling={"nodeSelector": {"gpu": "h100"},
                    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    "affinity": {"nodeAffinity": {}}, "priorityClassName": "high", "queueName": "team-a-queue"},
        serviceAccountName="trainer", image={"name": "img:1", "pullPolicy": "Always", "pullSecrets": ["regcred"]},
        volumes=[{"name": "data", "claimName": "pvc-data", "mountPath": "/data", "readOnly": True, "subPath": "x"}],
    ))
    pod = pj["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    assert pod["nodeSelector"] == {"gpu": "h100"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["affinity"] == {"nodeAffinity": {}}
    assert pod["priorityClassName"] == "high"
    assert pod["serviceAccountName"] == "trainer"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["containers"][0]["image"] == "img:1" and pod["containers"][0]["imagePullPolicy"] == "Always"
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "pvc-data", "readOnly": True}} in pod["volumes"]
    assert {"name": "data", "mountPath": "/data", "readOnly": True, "subPath": "x"} in pod["containers"][0]["volumeMounts"]
    assert pj["metadata"]["labels"][r.KUEUE_QUEUE_LABEL] == "team-a-queue"
    assert "schedulerName" not in pod


def test_run_policy_and_suspend():
    _, pj = r.render(resource(suspend=True, runPolicy={"backoffLimit": 5, "restartPolicy": "ExitCode",
                                                       "activeDeadlineSeconds": 3600, "ttlSecondsAfterFinished": 60,
                                                       "cleanPodPolicy": "Running"}))
    assert pj["spec"]["runPolicy"] == {"backoffLimit": 5, "cleanPodPolicy": "Running", "suspend": True,
                                       "activeDeadlineSeconds": 3600, "ttlSecondsAfterFinished": 60}
    assert pj["spec"]["pytorchReplicaSpecs"]["Master"]["restartPolicy"] == "ExitCode"


@pytest.mark.parametrize("scheduler,name", [("volcano", "volcano"), ("scheduler-plugins", "scheduler-plugins-scheduler")])
def test_gang_scheduling(scheduler, name):
    _, pj = r.render(resource(scheduling={"priorityClassName": "p",
                                          "gang": {"enabled": True, "scheduler": scheduler, "scheduleTimeoutSeconds": 120}}))
    assert pj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["schedulerName"] == name
    assert pj["spec"]["runPolicy"]["schedulingPolicy"] == {"minAvailable": 3, "scheduleTimeoutSeconds": 120,
                                                           "priorityClass": "p"}


def test_owner_references_and_labels():
    for obj in r.render(resource()):
        (ref,) = obj["metadata"]["ownerReferences"]
        assert ref == {"apiVersion": "training.qwen.dev/v1alpha1", "kind": "QwenTrainingJob", "name": "tiny",
                       "uid": "1234-abcd", "controller": True, "blockOwnerDeletion": True}
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "qwen-training-job"
        assert labels["app.kubernetes.io/managed-by"] == "qwen-operator"
        assert labels["app.kubernetes.io/instance"] == "tiny"
        assert labels["training.qwen.dev/job"] == "tiny"
        assert labels["training.qwen.dev/stage"] == "convert"
        assert r.HASH_ANNOTATION in obj["metadata"]["annotations"]


def test_offline_render_has_no_owner_reference():
    res = resource()
    del res["metadata"]["uid"]
    for obj in r.render(res):
        assert "ownerReferences" not in obj["metadata"]


def test_configmap_holds_resolved_job_spec():
    cm, _ = r.render(resource())
    doc = yaml.safe_load(cm["data"]["job.yaml"])
    assert set(doc) == {"spec", "derived", "worldSize"}
    assert doc["worldSize"] == 24
    assert doc["spec"]["stage"] == "convert"
    assert "resources" not in doc["spec"] and "image" not in doc["spec"]  # job-spec fields only
    assert doc["spec"]["checkpoint"]["source"]["path"] == "/data/hf"  # camelCase wire form
    assert doc["derived"]


def test_render_is_deterministic():
    assert r.render(resource()) == r.render(resource())


def test_suspend_does_not_change_the_hash():
    a = r.render(resource(suspend=False))[1]["metadata"]["annotations"][r.HASH_ANNOTATION]
    b = r.render(resource(suspend=True))[1]["metadata"]["annotations"][r.HASH_ANNOTATION]
    c = r.render(resource(resources={"nodes": 2, "gpusPerNode": 8}, training={"globalBatchSize": 16}))[1]["metadata"]["annotations"][r.HASH_ANNOTATION]
    assert a == b != c


@pytest.mark.parametrize("name", ["a" * 45, "job.with.dots", "9starts-with-digit", "x" * 200, "UPPER"])
def test_child_names_are_dns1035_and_leave_room_for_suffixes(name):
    child = r.child_name(name)
    assert r._DNS1035.match(child)
    assert len(child + "-worker-99999") <= 63
    assert r.child_name(name) == child  # deterministic


def test_distinct_long_names_do_not_collide():
    assert r.child_name("a" * 50 + "x") != r.child_name("a" * 50 + "y")


def test_invalid_spec_raises_spec_error_with_paths():
    with pytest.raises(SpecError) as err:
        r.render(resource(stage="nonsense"))
    assert any(p.path == "spec.stage" for p in err.value.problems)


def test_reserved_volume_names_are_rejected():
    with pytest.raises(SpecError) as err:
        r.render(resource(volumes=[{"name": "qwen-dshm", "claimName": "c", "mountPath": "/x"}]))
    assert err.value.problems[0].path == "spec.volumes[0].name"


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_renders(path):
    res = yaml.safe_load(path.read_text())
    res["metadata"].setdefault("namespace", "default")
    res["metadata"]["uid"] = "u"
    cm, pj = r.render(res)
    spec = res["spec"]
    nodes = spec.get("resources", {}).get("nodes", 1)
    workers = pj["spec"]["pytorchReplicaSpecs"].get("Worker", {}).get("replicas", 0)
    assert 1 + workers == nodes
    assert len(pj["metadata"]["name"]) <= 45
    assert yaml.safe_load(cm["data"]["job.yaml"])["spec"]["stage"] == spec["stage"]
