"""Kubeflow Trainer v2 TrainJob rendering and status mapping, and the Kueue labels of both child APIs (pure)."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import yaml

from qwen_operator import config as cfg_mod
from qwen_operator import drift
from qwen_operator import render as r
from qwen_operator import conditions as cnd
from qwen_operator import pod_failures as pods
from qwen_operator import trainjob_status
from qwen_trainer.spec import SpecError

from .test_operator_render import BASE, resource

NOW = "2026-07-01T12:00:00Z"


def trainjob(res=None, **kw):
    return r.render(res or resource(), job_api="trainjob", **kw)


def pod_patch(tj):
    (patch,) = tj["spec"]["runtimePatches"]
    (job,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert job["name"] == "node"
    return job["template"]["spec"]["template"]


# ------------------------------------------------------------------------------------------- render


def test_trainjob_references_the_runtime_and_sets_the_trainer():
    cm, tj = trainjob()
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["name"] == "tiny-spec"
    assert tj["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and tj["kind"] == "TrainJob"
    assert tj["metadata"]["name"] == "tiny" and tj["metadata"]["namespace"] == "team-a"
    assert tj["spec"]["runtimeRef"] == {"name": "qwen-torch-distributed", "apiGroup": "trainer.kubeflow.org",
                                        "kind": "ClusterTrainingRuntime"}
    t = tj["spec"]["trainer"]
    assert t["numNodes"] == 3 and t["numProcPerNode"] == 8
    assert t["resourcesPerNode"] == {"limits": {"nvidia.com/gpu": 8, "cpu": "16", "memory": "128Gi"},
                                     "requests": {"cpu": "16", "memory": "128Gi"}}
    assert t["image"] == "ghcr.io/qwen-k8s/trainer-gpu:0.1.0"
    env = {e["name"]: e["value"] for e in t["env"]}
    assert env["QWEN_STATUS_RESOURCE"] == "team-a/tiny" and env["QWEN_JOB_SPEC"] == "/etc/qwen/job.yaml"
    assert "command" not in t  # the runtime's torchrun line
    assert tj["spec"]["suspend"] is False
    assert tj["metadata"]["ownerReferences"][0]["uid"] == "1234-abcd"
    assert r.HASH_ANNOTATION in tj["metadata"]["annotations"]


def test_trainjob_runtime_name_is_a_setting():
    _, tj = trainjob(runtime="site-torch")
    assert tj["spec"]["runtimeRef"]["name"] == "site-torch"


def test_trainjob_pod_patch_carries_volumes_shm_and_placement():
    _, tj = trainjob(resource(
        scheduling={"nodeSelector": {"gpu": "h100"}, "tolerations": [{"key": "g", "operator": "Exists"}],
                    "affinity": {"nodeAffinity": {}}},
        serviceAccountName="trainer", image={"name": "img:1", "pullSecrets": ["regcred"]},
        volumes=[{"name": "data", "claimName": "pvc-data", "mountPath": "/data", "readOnly": True}]))
    (patch,) = tj["spec"]["runtimePatches"]
    assert patch["manager"] == "training.qwen.dev/qwen-operator"
    pod = pod_patch(tj)
    assert pod["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "qwen-operator"
    spec = pod["spec"]
    names = [v["name"] for v in spec["volumes"]]
    assert names == ["qwen-job-spec", "qwen-dshm", "data"]
    assert spec["volumes"][0]["configMap"]["name"] == "tiny-spec"
    assert spec["volumes"][1]["emptyDir"] == {"medium": "Memory", "sizeLimit": "32Gi"}
    (c,) = spec["containers"]
    assert c["name"] == "node"
    assert [m["mountPath"] for m in c["volumeMounts"]] == ["/etc/qwen", "/dev/shm", "/data"]
    assert spec["nodeSelector"] == {"gpu": "h100"} and spec["tolerations"] == [{"key": "g", "operator": "Exists"}]
    assert spec["affinity"] == {"nodeAffinity": {}} and spec["serviceAccountName"] == "trainer"
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert tj["spec"]["trainer"]["image"] == "img:1"


def test_trainjob_active_deadline_and_suspend():
    _, tj = trainjob(resource(suspend=True, runPolicy={"activeDeadlineSeconds": 600}))
    assert tj["spec"]["suspend"] is True and tj["spec"]["activeDeadlineSeconds"] == 600


def test_trainjob_suspend_does_not_change_the_hash():
    _, a = trainjob()
    _, b = trainjob(resource(suspend=True))
    assert a["metadata"]["annotations"] == b["metadata"]["annotations"]
    assert r.rendered_hash(a) != r.rendered_hash(r.render(resource())[1])


@pytest.mark.parametrize("scheduling,field", [
    ({"gang": {"enabled": True}}, "spec.scheduling.gang.enabled"),
    ({"priorityClassName": "high"}, "spec.scheduling.priorityClassName"),
])
def test_trainjob_refuses_what_a_trainjob_cannot_carry(scheduling, field):
    with pytest.raises(SpecError) as err:
        trainjob(resource(scheduling=scheduling))
    assert [p.path for p in err.value.problems] == [field]


def test_unknown_job_api_is_refused():
    with pytest.raises(ValueError, match="mpijob"):
        r.render(resource(), job_api="mpijob")


def test_trainjob_pipeline_steps_are_labelled_and_named():
    path = [p for p in __import__("pathlib").Path(__file__).resolve().parents[2].glob("manifests/examples/*.yaml")
            if "pipeline" in (yaml.safe_load(p.read_text()).get("spec") or {})][0]
    doc = yaml.safe_load(path.read_text())
    doc["metadata"].update(namespace="ns", uid="u")
    objs = r.render(doc, job_api="trainjob")
    kinds = [o["kind"] for o in objs]
    assert kinds == ["ConfigMap", "TrainJob"] * (len(objs) // 2)
    assert all(r.LABEL_STEP in o["metadata"]["labels"] for o in objs)


def test_trainjob_drift_ignores_suspend_but_not_our_patch():
    _, tj = trainjob()
    live = copy.deepcopy(tj)
    live["spec"]["suspend"] = True
    live["spec"]["managedBy"] = "trainer.kubeflow.org/trainjob-controller"
    assert drift.child_drift(tj, live) == []
    pod_patch(live)["spec"]["volumes"][1]["emptyDir"]["sizeLimit"] = "1Gi"
    assert drift.child_drift(tj, live) == [
        "spec.runtimePatches[0].trainingRuntimeSpec.template.spec.replicatedJobs[0].template.spec.template.spec"
        ".volumes[1].emptyDir.sizeLimit"]


# -------------------------------------------------------------------------------------------- Kueue


@pytest.mark.parametrize("job_api", ["pytorchjob", "trainjob"])
def test_queue_from_spec_labels_and_suspends_the_child(job_api):
    _, child = r.render(resource(scheduling={"queueName": "team-a-queue", "workloadPriorityClassName": "prod"}),
                        job_api=job_api)
    labels = child["metadata"]["labels"]
    assert labels[r.KUEUE_QUEUE_LABEL] == "team-a-queue" and labels[r.KUEUE_PRIORITY_LABEL] == "prod"
    suspend = child["spec"]["suspend"] if job_api == "trainjob" else child["spec"]["runPolicy"]["suspend"]
    assert suspend is True


@pytest.mark.parametrize("job_api", ["pytorchjob", "trainjob"])
def test_queue_label_on_the_resource_reaches_the_child(job_api):
    res = resource()
    res["metadata"]["labels"] = {r.KUEUE_QUEUE_LABEL: "lq", r.KUEUE_PRIORITY_LABEL: "low", "other": "x"}
    _, child = r.render(res, job_api=job_api)
    labels = child["metadata"]["labels"]
    assert labels[r.KUEUE_QUEUE_LABEL] == "lq" and labels[r.KUEUE_PRIORITY_LABEL] == "low"
    assert "other" not in labels
    assert r.initially_suspended(res, r.render_with_spec(res)[0]) is True


def test_spec_queue_wins_over_the_resource_label():
    res = resource(scheduling={"queueName": "from-spec"})
    res["metadata"]["labels"] = {r.KUEUE_QUEUE_LABEL: "from-label"}
    spec = r.render_with_spec(res)[0]
    assert r.kueue_labels(res, spec) == {r.KUEUE_QUEUE_LABEL: "from-spec"}


def test_no_queue_no_kueue_labels_and_not_suspended():
    res = resource()
    spec, (_, pj) = r.render_with_spec(res)
    assert r.kueue_labels(res, spec) == {}
    assert r.initially_suspended(res, spec) is False
    assert pj["spec"]["runPolicy"]["suspend"] is False
    assert not any(k.startswith("kueue.x-k8s.io/") for k in pj["metadata"]["labels"])


def test_priority_label_alone_does_not_suspend():
    res = resource(scheduling={"workloadPriorityClassName": "prod"})
    spec = r.render_with_spec(res)[0]
    assert r.kueue_labels(res, spec) == {r.KUEUE_PRIORITY_LABEL: "prod"}
    assert r.initially_suspended(res, spec) is False


def test_child_suspend_patches():
    assert r.child_suspend_patch("TrainJob", True) == {"spec": {"suspend": True}}
    assert r.child_suspend_patch("PyTorchJob", False) == {"spec": {"runPolicy": {"suspend": False}}}
    assert r.child_kind("trainjob") == "TrainJob" and r.child_kind("pytorchjob") == "PyTorchJob"


# ------------------------------------------------------------------------------------------- status
# TrainJob and JobSet status documents in the form the Trainer v2.3.0 and JobSet controllers write them.

CREATED_AT = "2026-07-01T10:00:00Z"


def tj_doc(conditions=(), jobs=None, suspend=False):
    doc = {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob",
           "metadata": {"name": "tiny", "namespace": "team-a", "creationTimestamp": CREATED_AT, "generation": 1},
           "spec": {"suspend": suspend, "runtimeRef": {"name": "qwen-torch-distributed"}}, "status": {}}
    if conditions:
        doc["status"]["conditions"] = list(conditions)
    if jobs is not None:
        doc["status"]["jobsStatus"] = jobs
    return doc


def node_job(active=0, ready=0, succeeded=0, failed=0, suspended=0):
    return {"name": "node", "active": active, "ready": ready, "succeeded": succeeded, "failed": failed,
            "suspended": suspended}


SUSPENDED = {"type": "Suspended", "status": "True", "reason": "Suspended", "message": "TrainJob is suspended",
             "lastTransitionTime": "2026-07-01T10:00:01Z"}
RESUMED = {"type": "Suspended", "status": "False", "reason": "Resumed", "message": "TrainJob is resumed",
           "lastTransitionTime": "2026-07-01T10:05:00Z"}
COMPLETE = {"type": "Complete", "status": "True", "reason": "AllJobsCompleted",
            "message": "jobset completed successfully", "lastTransitionTime": "2026-07-01T11:00:00Z"}
FAILED = {"type": "Failed", "status": "True", "reason": "ReachedMaxRestarts",
          "message": "jobset failed due to reaching max number of restarts",
          "lastTransitionTime": "2026-07-01T11:30:00Z"}
DEADLINE = {"type": "Failed", "status": "True", "reason": "DeadlineExceeded",
            "message": "TrainJob exceeded its active deadline", "lastTransitionTime": "2026-07-01T11:10:00Z"}


def conds(status):
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def test_created_but_not_yet_running():
    s = cnd.from_trainjob(tj_doc(jobs=[node_job(active=1)]), None, 1, NOW)
    assert s["phase"] == "Created"
    c = conds(s)
    assert c["Created"] == ("True", trainjob_status.TRAINJOB_CREATED) and c["Running"] == ("False", trainjob_status.JOBS_NOT_READY)
    assert c["Succeeded"][0] == "Unknown"
    assert s["replicas"] == {"Node": {"active": 1, "succeeded": 0, "failed": 0, "restarts": 0}}
    assert s["startTime"] == CREATED_AT


def test_queued_by_kueue_is_suspended():
    s = cnd.from_trainjob(tj_doc([SUSPENDED], jobs=[node_job(suspended=1)], suspend=True), None, 1, NOW)
    assert s["phase"] == "Suspended"
    assert conds(s)["Suspended"] == ("True", "Suspended") and conds(s)["Running"][0] == "False"


def test_suspended_from_spec_before_any_condition():
    s = cnd.from_trainjob(tj_doc(suspend=True), None, 1, NOW)
    assert s["phase"] == "Suspended"


def test_resumed_and_running():
    s = cnd.from_trainjob(tj_doc([RESUMED], jobs=[node_job(active=1, ready=1)]), None, 1, NOW)
    assert s["phase"] == "Running"
    c = conds(s)
    assert c["Running"] == ("True", trainjob_status.TRAINJOB_RUNNING) and c["Suspended"] == ("False", "Resumed")
    assert "1 of 1" in cnd.get_condition(s, "Running")["message"]


def test_complete_maps_to_succeeded_with_completion_time_and_duration():
    s = cnd.from_trainjob(tj_doc([COMPLETE], jobs=[node_job(succeeded=1)]), None, 1, NOW)
    assert s["phase"] == "Succeeded"
    summary = cnd.get_condition(s, "Succeeded")
    assert (summary["status"], summary["reason"]) == ("True", "AllJobsCompleted")
    assert summary["lastTransitionTime"] == COMPLETE["lastTransitionTime"]
    assert s["completionTime"] == COMPLETE["lastTransitionTime"] and s["duration"] == "1h0m0s"
    assert conds(s)["Running"] == ("False", "AllJobsCompleted")


@pytest.mark.parametrize("failed", [FAILED, DEADLINE])
def test_failed_maps_to_failed_with_reason(failed):
    s = cnd.from_trainjob(tj_doc([RESUMED, failed], jobs=[node_job(failed=1)]), None, 1, NOW, namespace="team-a")
    assert s["phase"] == "Failed"
    f = cnd.get_condition(s, "Failed")
    assert (f["status"], f["reason"], f["message"]) == ("True", failed["reason"], failed["message"])
    summary = cnd.get_condition(s, "Succeeded")
    assert (summary["status"], summary["reason"]) == ("False", failed["reason"])


def test_failed_message_names_the_failed_pod_when_the_pods_watch_saw_it():
    previous = {"failures": [{"replica": "Node", "pod": "tiny-node-0-0-abcde", "uid": "p1", "run": 0, "exitCode": 1,
                              "reason": "Error", "message": "error: out of data", "replaced": True}]}
    s = cnd.from_trainjob(tj_doc([FAILED], jobs=[node_job(failed=1)]), previous, 1, NOW,
                         run_policy={"restartPolicy": "OnFailure"}, namespace="team-a")
    message = cnd.get_condition(s, "Failed")["message"]
    assert "tiny-node-0-0-abcde" in message and "out of data" in message and "ReachedMaxRestarts" not in message
    assert FAILED["message"] in message


def test_jobset_restart_shows_restarting():
    jobset = {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet", "metadata": {"name": "tiny"},
              "status": {"restarts": 1, "replicatedJobsStatus": [node_job(active=1)]}}
    s = cnd.from_trainjob(tj_doc([RESUMED], jobs=[node_job(active=1)]), None, 1, NOW, jobset=jobset)
    assert s["phase"] == "Restarting"
    assert conds(s)["Restarting"] == ("True", trainjob_status.JOBSET_RESTARTING)
    # Ready again: Restarting turns off.
    jobset["status"]["replicatedJobsStatus"] = [node_job(active=1, ready=1)]
    s = cnd.from_trainjob(tj_doc([RESUMED], jobs=[node_job(active=1, ready=1)]), s, 1, NOW, jobset=jobset)
    assert s["phase"] == "Running" and conds(s)["Restarting"][0] == "False"


def test_jobs_from_the_jobset_when_the_trainjob_has_none_yet():
    jobset = {"status": {"replicatedJobsStatus": [node_job(active=2, ready=2)]}}
    child = trainjob_status.trainjob_child_status(tj_doc(), jobset)
    assert child["replicaStatuses"] == {"Node": {"active": 2, "succeeded": 0, "failed": 0}}
    assert {c["type"]: c["status"] for c in child["conditions"]}["Running"] == "True"


def test_terminal_stays_terminal():
    done = cnd.from_trainjob(tj_doc([COMPLETE], jobs=[node_job(succeeded=1)]), None, 1, NOW)
    again = cnd.from_trainjob(tj_doc([COMPLETE, FAILED], jobs=[node_job(failed=1)]), done, 1, NOW)
    assert again["phase"] == "Succeeded" and again["conditions"] == done["conditions"]


def test_child_deleted_names_the_kind():
    s = cnd.child_deleted({"phase": "Running"}, 1, NOW, "tiny", kind="TrainJob")
    assert s["phase"] == "Failed" and cnd.get_condition(s, "Failed")["message"].startswith("TrainJob tiny was deleted")


def test_pod_of_a_trainjob_is_matched_by_its_jobset():
    pod = {"metadata": {"labels": {"jobset.sigs.k8s.io/jobset-name": "tiny",
                                   "jobset.sigs.k8s.io/replicatedjob-name": "node"}}}
    assert pods.pod_job_name(pod) == "tiny"
    pj_pod = {"metadata": {"labels": {"training.kubeflow.org/job-name": "tiny2"}}}
    assert pods.pod_job_name(pj_pod) == "tiny2"


def test_failed_trainjob_pod_names_its_node_container_in_the_logs_hint():
    pod = {"metadata": {"name": "tiny-node-0-0-x7k2p", "uid": "p1",
                        "labels": {"jobset.sigs.k8s.io/jobset-name": "tiny",
                                   "jobset.sigs.k8s.io/replicatedjob-name": "node"}},
           "status": {"phase": "Failed", "containerStatuses": [{"name": "node", "restartCount": 0, "state": {
               "terminated": {"exitCode": 1, "reason": "Error", "message": "boom"}}}]}}
    failure = pods.pod_failure(pod)
    assert failure["replica"] == "Node" and failure["container"] == "node"
    text = pods.describe_failure(failure, {"restartPolicy": "Never", "cleanPodPolicy": "None"}, "team-a")
    assert text.startswith("Node replica pod tiny-node-0-0-x7k2p exited with code 1 (Error): boom.")
    assert text.endswith("kubectl logs -n team-a tiny-node-0-0-x7k2p -c node")


# ------------------------------------------------------------------------------------------ settings


def test_job_api_setting_from_env_and_flags():
    assert cfg_mod.OperatorConfig.from_env({}).job_api == "pytorchjob"
    c = cfg_mod.OperatorConfig.from_env({"QWEN_OPERATOR_JOB_API": "TrainJob",
                                         "QWEN_OPERATOR_TRAINJOB_RUNTIME": "site-torch"})
    assert (c.job_api, c.trainjob_runtime) == ("trainjob", "site-torch")
    with pytest.raises(ValueError):
        cfg_mod.OperatorConfig.from_env({"QWEN_OPERATOR_JOB_API": "mpijob"})
    c = cfg_mod.from_args(["--job-api", "trainjob", "--trainjob-runtime", "x"], env={})
    assert (c.job_api, c.trainjob_runtime) == ("trainjob", "x")
    assert cfg_mod.from_args(["--job-api", "pytorchjob"], env={"QWEN_OPERATOR_JOB_API": "trainjob"}).job_api == \
        "pytorchjob"
    assert cfg_mod.JOB_APIS == r.JOB_APIS and cfg_mod.DEFAULT_TRAINJOB_RUNTIME == r.DEFAULT_RUNTIME


def test_qwenctl_render_job_api_trainjob(tmp_path):
    path = tmp_path / "job.yaml"
    doc = copy.deepcopy(BASE)
    path.write_text(yaml.safe_dump(doc))
    out = subprocess.run([sys.executable, "-m", "qwen_operator.cli", "render", str(path), "--job-api", "trainjob"],
                         capture_output=True, text=True, check=True).stdout
    kinds = [d["kind"] for d in yaml.safe_load_all(out)]
    assert kinds == ["ConfigMap", "TrainJob"]


def test_handlers_watch_only_the_chosen_api_and_read_the_jobset_only_when_needed():
    from qwen_operator import handlers as h
    from qwen_operator import mirror

    assert h.CONFIG.job_api in h._WATCHED
    h.watch_children("trainjob")
    h.watch_children("trainjob")  # once
    assert "trainjob" in h._WATCHED
    with pytest.raises(ValueError):
        h.watch_children("mpijob")
    assert mirror.needs_jobset(tj_doc([RESUMED], jobs=[node_job(active=1)])) is True
    assert mirror.needs_jobset(tj_doc([RESUMED], jobs=[node_job(active=1, ready=1)])) is False
    assert mirror.needs_jobset(tj_doc([COMPLETE], jobs=[node_job(succeeded=1)])) is False
    _, tj = trainjob(resource(serviceAccountName="trainer"))
    assert mirror.live_service_account(tj) == "trainer"
    # When a TrainJob reports Failed its JobSet has stopped restarting and keeps the failed pods.
    assert mirror.run_policy(tj)["restartPolicy"] == "Never"


@pytest.mark.parametrize("failure_policy,restarts,expected", [
    ({"restartStrategy": "Recreate"}, 0, "Never"),  # maxRestarts 0 (omitted): the first failure fails the JobSet
    ({"maxRestarts": 3}, 0, "OnFailure"),
    ({"maxRestarts": 3}, 2, "OnFailure"),
    ({"maxRestarts": 3}, 3, "Never"),
])
def test_jobset_failure_policy_in_run_policy_words(failure_policy, restarts, expected):
    js = {"spec": {"failurePolicy": failure_policy}, "status": {"restarts": restarts}}
    assert pods.jobset_run_policy(js) == {"restartPolicy": expected, "cleanPodPolicy": "None"}
    assert pods.jobset_run_policy(None)["restartPolicy"] == "OnFailure"
