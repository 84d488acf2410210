"""The operator against the real control plane: examples render and run, status follows the child job, invalid
specs are refused or reported, suspend propagates, hand edits are reported, deletion cascades.

Cases marked @both_apis run once per job API: `pytorchjob` on the Kubeflow training-operator, `trainjob` on
Kubeflow Trainer v2 and the JobSet controller (kwok runs the pods of both)."""

from __future__ import annotations


import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from qwen_operator.drift import child_drift
from qwen_operator.render import render
from tests.integration.operator_support import (  # noqa: F401  (crds, jobs, operator are fixtures)
    EXAMPLES, RUNTIME, Jobs, OperatorProcess, both_apis, crds, ensure_pvcs, example, install_crds, jobs, operator,
    tiny_job, wait_for,
)

# Single-stage examples; pipelines run one child job per step (test_operator_pipeline.py).
ALL_EXAMPLES = sorted(p for p in EXAMPLES.glob("*.yaml") if "pipeline" not in (yaml.safe_load(p.read_text()).get("spec") or {}))
# Every example on the training-operator; on Trainer v2 one of each stage, on CPU and on GPUs (1 and 8), which is
# what changes the TrainJob (they all mount a volume); the whole set there doubles the time for no new path.
TRAINJOB_EXAMPLES = ("cpu-convert", "cpu-pretrain", "mcore-moe-finetune", "qwen-moe-pretrain", "export-hf", "evaluate")
assert {p.stem for p in ALL_EXAMPLES} >= set(TRAINJOB_EXAMPLES)
EXAMPLE_CASES = [pytest.param(p, "pytorchjob", id=f"{p.stem}-pytorchjob") for p in ALL_EXAMPLES] + \
    [pytest.param(p, "trainjob", id=f"{p.stem}-trainjob") for p in ALL_EXAMPLES if p.stem in TRAINJOB_EXAMPLES]


def _claims(doc):
    return {v["claimName"] for v in doc["spec"].get("volumes", [])}


@pytest.mark.parametrize("path,job_api", EXAMPLE_CASES, indirect=["job_api"])
def test_example_runs_created_running_succeeded(cluster, operator, jobs, namespace, path, job_api):
    doc = example(path, namespace)
    name = doc["metadata"]["name"]
    ensure_pvcs(jobs.api, namespace, _claims(doc))
    jobs.create(doc)

    # The child job is exactly what render() makes of the live resource.
    pj = wait_for(lambda: jobs.child(name), 30, what=jobs.child_api.kind)
    live = jobs.get(name)
    _, desired = render(live, job_api=job_api, runtime=RUNTIME)
    assert child_drift(desired, pj) == []
    assert pj["metadata"]["ownerReferences"][0]["uid"] == live["metadata"]["uid"]
    cm = wait_for(lambda: jobs.configmaps(), 10, what="ConfigMap")[0]
    assert yaml.safe_load(cm.data["job.yaml"])["spec"]["stage"] == doc["spec"]["stage"]

    # The training-operator (or Trainer v2 through a JobSet) accepts it and makes one pod per node; kwok runs them,
    # with the example's volumes mounted.
    nodes = doc["spec"].get("resources", {}).get("nodes", 1)
    wait_for(lambda: len(jobs.pods(name)) == nodes and all(p.status.phase == "Running" for p in jobs.pods(name)),
             60, what="pods Running")
    jobs.wait_phase(name, "Running", 30)
    running = wait_for(lambda: (r := jobs.get(name))["status"].get("derived") and r, 30, what="reconcile status")
    conds = {c["type"]: c for c in running["status"]["conditions"]}
    assert conds["Created"]["status"] == "True" and conds["Running"]["status"] == "True"
    assert conds["Succeeded"]["status"] == "Unknown"
    assert running["status"]["pytorchJob"] == name and running["status"]["configMap"] == cm.metadata.name
    assert running["status"]["derived"]
    assert running["status"]["observedGeneration"] == running["metadata"]["generation"]

    cluster.set_pod_outcome(namespace, f"training.qwen.dev/job={name}", "succeed", delay="1s")
    done = jobs.wait_phase(name, "Succeeded", 60)
    conds = {c["type"]: c for c in done["status"]["conditions"]}
    assert conds["Succeeded"]["status"] == "True" and conds["Running"]["status"] == "False"
    assert conds["Created"]["lastTransitionTime"] <= conds["Running"]["lastTransitionTime"] \
        <= conds["Succeeded"]["lastTransitionTime"]
    assert done["status"]["replicas"][jobs.child_api.replica]["succeeded"] == 1
    assert operator.alive()


@both_apis
def test_multi_node_job_gets_workers_and_torchrun_env(cluster, operator, jobs, namespace, job_api):
    body = tiny_job("two-nodes", namespace, resources={"nodes": 2, "gpusPerNode": 8}, training={"globalBatchSize": 16},
                    nccl={"debug": "WARN"})
    jobs.create(body)
    wait_for(lambda: len(jobs.pods("two-nodes")) == 2, 60, what="2 pods")
    pods = {p.metadata.name: p for p in jobs.pods("two-nodes")}
    ranks = set()
    for pod in pods.values():
        c = next(c for c in pod.spec.containers if c.name == jobs.child_api.container)
        env = {e.name: e for e in c.env}
        # Every $(VAR) our command uses is injected by the training-operator (or Trainer v2).
        for var in ("PET_NNODES", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"):
            assert var in env, var
        assert env["PET_NNODES"].value == "2" and env["PET_NPROC_PER_NODE"].value == "8"
        assert env["NCCL_DEBUG"].value == "WARN" and env["QWEN_STATUS_RESOURCE"].value == f"{namespace}/two-nodes"
        assert c.resources.limits["nvidia.com/gpu"] == "8"
        assert "--nproc-per-node=$(PET_NPROC_PER_NODE)" in c.command or "--nproc-per-node=8" in c.command
        if job_api == "pytorchjob":
            assert env["WORLD_SIZE"].value == "16"
            ranks.add(env["PET_NODE_RANK"].value)
        else:  # Trainer v2: the node rank is the Job's completion index, read from the pod's annotation
            assert "job-completion-index" in env["PET_NODE_RANK"].value_from.field_ref.field_path
            ranks.add(pod.metadata.annotations["batch.kubernetes.io/job-completion-index"])
    assert ranks == {"0", "1"}
    if job_api == "pytorchjob":
        assert set(pods) == {"two-nodes-master-0", "two-nodes-worker-0"}
    else:
        assert {p.metadata.labels["jobset.sigs.k8s.io/jobset-name"] for p in pods.values()} == {"two-nodes"}
    jobs.wait_phase("two-nodes", "Running", 30)


@both_apis
@pytest.mark.no_restarts
def test_failing_pod_drives_failed_with_reason(cluster, operator, jobs, namespace):
    jobs.create(tiny_job("fails", namespace, runPolicy={"restartPolicy": "Never", "backoffLimit": 0}))
    wait_for(lambda: [p for p in jobs.pods("fails") if p.status.phase == "Running"], 60, what="pod Running")
    cluster.set_pod_outcome(namespace, "training.qwen.dev/job=fails", "fail", delay="1s", exit_code=1)
    done = jobs.wait_phase("fails", "Failed", 60)
    conds = {c["type"]: c for c in done["status"]["conditions"]}
    assert conds["Failed"]["status"] == "True"
    assert conds["Failed"]["reason"] and conds["Failed"]["message"]
    assert conds["Succeeded"]["status"] == "False" and conds["Succeeded"]["reason"] == conds["Failed"]["reason"]
    # Terminal stays terminal: a later child change does not move the phase.
    jobs.patch_child("fails", {"metadata": {"labels": {"touched": "yes"}}})
    assert jobs.phase("fails") == "Failed"


def test_invalid_spec_rejected_at_apply_time(jobs, namespace, operator):
    bad = tiny_job("bad-cel", namespace, parallelism={"sequenceParallel": True})  # needs tensor > 1 (CEL)
    with pytest.raises(ApiException) as err:
        jobs.create(bad)
    assert err.value.status == 422
    assert "spec.parallelism.sequenceParallel" in err.value.body
    with pytest.raises(ApiException) as err:
        jobs.create(tiny_job("bad-enum", namespace, stage="nonsense"))  # schema
    assert err.value.status == 422 and "spec.stage" in err.value.body
    assert jobs.children() == []


def test_invalid_spec_reported_by_condition_and_event(jobs, namespace, operator):
    # Accepted by the CRD, refused by the operator's rendering (a volume name the operator reserves).
    bad = tiny_job("bad-volume", namespace, volumes=[{"name": "qwen-dshm", "claimName": "x", "mountPath": "/x"}])
    jobs.create(bad)
    jobs.wait_phase("bad-volume", "Invalid", 30)
    failed = jobs.condition("bad-volume", "Failed")
    assert failed["status"] == "True" and failed["reason"] == "InvalidSpec"
    assert "spec.volumes[0].name" in failed["message"]
    wait_for(lambda: [e for e in jobs.events("bad-volume") if e.reason == "InvalidSpec" and e.type == "Warning"],
             30, what="InvalidSpec event")
    assert jobs.children() == [] and jobs.configmaps() == []
    # The operator keeps running and still reconciles valid jobs.
    assert operator.alive()
    jobs.create(tiny_job("fine", namespace))
    jobs.wait_phase("fine", "Running", 60)


@both_apis
def test_suspend_is_propagated_and_other_changes_refused(jobs, namespace, operator):
    jobs.create(tiny_job("sus", namespace, suspend=True))
    wait_for(lambda: jobs.child("sus"), 30, what=jobs.child_api.kind)
    assert jobs.child_suspended("sus") is True
    jobs.wait_phase("sus", "Suspended", 30)
    assert jobs.pods("sus") == []

    jobs.patch("sus", {"spec": {"suspend": False}})
    wait_for(lambda: jobs.child_suspended("sus") is False, 30, what="child resumed")
    jobs.wait_phase("sus", "Running", 60)
    assert jobs.condition("sus", "Suspended")["status"] == "False"
    assert len(jobs.pods("sus")) == 1

    # Suspended again while running: the pods go, the phase says so; resumed, it runs again.
    jobs.patch("sus", {"spec": {"suspend": True}})
    jobs.wait_phase("sus", "Suspended", 60)
    wait_for(lambda: not jobs.pods("sus"), 60, what="pods removed while suspended")
    jobs.patch("sus", {"spec": {"suspend": False}})
    jobs.wait_phase("sus", "Running", 60)

    with pytest.raises(ApiException) as err:
        jobs.patch("sus", {"spec": {"resources": {"nodes": 2}}})
    assert err.value.status == 422 and "immutable" in err.value.body


@both_apis
def test_hand_edited_child_is_reported_not_reverted(jobs, namespace, operator, job_api):
    # Trainer v2 lets a TrainJob's runtime patches change only while it is suspended.
    jobs.create(tiny_job("edited", namespace, suspend=job_api == "trainjob"))
    jobs.wait_phase("edited", "Suspended" if job_api == "trainjob" else "Running", 60)
    patch, field = jobs.child_api.hand_edit(jobs.child("edited"))
    jobs.patch_child("edited", patch)
    synced = wait_for(lambda: (c := jobs.condition("edited", "Synced")).get("reason") == "ChildModified" and c, 30,
                      what="Synced=False ChildModified")
    assert synced["status"] == "False" and field in synced["message"]
    wait_for(lambda: [e for e in jobs.events("edited") if e.reason == "ChildModified"], 30, what="ChildModified event")
    edited = "someone/else:1" if field == "image" else "someone-else"
    assert edited in str(jobs.child("edited")["spec"])  # reported, not reverted


@both_apis
def test_deletion_cascades_to_children(jobs, namespace, operator, job_api):
    jobs.create(tiny_job("gone", namespace))
    wait_for(lambda: len(jobs.pods("gone")) == 1, 60, what="pod")
    if job_api == "trainjob":
        assert [js["metadata"]["name"] for js in jobs.jobsets()] == ["gone"]
    jobs.delete("gone")
    wait_for(lambda: not jobs.children() and not jobs.configmaps() and not jobs.pods("gone"), 60,
             what="children garbage-collected")
    if job_api == "trainjob":
        wait_for(lambda: not jobs.jobsets(), 30, what="the TrainJob's JobSet garbage-collected")


def test_metrics_and_probes(jobs, namespace, operator):
    jobs.create(tiny_job("metered", namespace))
    jobs.wait_phase("metered", "Running", 60)
    text = wait_for(lambda: (t := operator.metrics()) and
                    'qwen_operator_reconciles_total{handler="reconcile",result="ok"} 1.0' in t and t, 30,
                    what="reconcile counted")
    assert "qwen_operator_reconcile_duration_seconds_bucket" in text
    assert 'qwen_operator_jobs{phase="Running"} 1.0' in text
    status, body = operator.get("/healthz", port=operator.liveness_port)
    assert status == 200
    assert operator.get("/readyz")[0] == 200
    # Structured logs: one JSON object per line.
    assert operator.log_records(), operator.output()[-2000:]
