"""Mapping the PyTorchJob's status onto the QwenTrainingJob's status (pure, table-driven)."""

from __future__ import annotations

import pytest

from qwen_operator import conditions as cnd
from qwen_operator import pod_failures as pods

T0, T1, T2 = "2026-01-01T00:00:00Z", "2026-01-01T00:01:00Z", "2026-01-01T00:02:00Z"


def cond(type_, status="True", reason=None, message="", when=T0):
    return {"type": type_, "status": status, "reason": reason or f"PyTorchJob{type_}", "message": message,
            "lastUpdateTime": when, "lastTransitionTime": when}


def conds(status):
    return {c["type"]: c for c in status["conditions"]}


CREATED = [cond("Created")]
RUNNING = [cond("Created"), cond("Running")]
RESTARTING = [cond("Created"), cond("Restarting", message="pod restarted")]
SUCCEEDED = [cond("Created"), cond("Running", "False"), cond("Succeeded", message="PyTorchJob x is successfully completed.")]
FAILED = [cond("Created"), cond("Running", "False"),
          cond("Failed", reason="BackoffLimitExceeded", message="PyTorchJob x has failed because it has reached the specified backoff limit")]
SUSPENDED = [cond("Created"), cond("Running", "False", reason="PyTorchJobSuspended"), cond("Suspended", reason="PyTorchJobSuspended")]
RESUMED = [cond("Created"), cond("Running"), cond("Suspended", "False", reason="PyTorchJobResumed")]


@pytest.mark.parametrize(
    "child_conditions, phase, summary_status, summary_reason",
    [
        (None, "Pending", "Unknown", "Pending"),
        ([], "Pending", "Unknown", "Pending"),
        (CREATED, "Created", "Unknown", "Created"),
        (RUNNING, "Running", "Unknown", "Running"),
        (RESTARTING, "Restarting", "Unknown", "Restarting"),
        (SUCCEEDED, "Succeeded", "True", "PyTorchJobSucceeded"),
        (FAILED, "Failed", "False", "BackoffLimitExceeded"),
        (SUSPENDED, "Suspended", "Unknown", "Suspended"),
        (RESUMED, "Running", "Unknown", "Running"),
    ],
)
def test_phase_and_summary(child_conditions, phase, summary_status, summary_reason):
    child = None if child_conditions is None else {"conditions": child_conditions}
    new = cnd.from_child(child, None, 3, T1)
    assert new["phase"] == phase
    c = conds(new)
    assert [x["type"] for x in new["conditions"]] == ["Created", "Running", "Restarting", "Suspended", "Succeeded", "Failed"]
    assert c["Succeeded"]["status"] == summary_status
    assert c["Succeeded"]["reason"] == summary_reason
    assert all(x["observedGeneration"] == 3 for x in new["conditions"])
    assert new["observedGeneration"] == 3


@pytest.mark.parametrize(
    "child_conditions, expected",
    [
        (RUNNING, {"Created": "True", "Running": "True", "Restarting": "False", "Suspended": "False", "Failed": "False"}),
        (RESTARTING, {"Running": "False", "Restarting": "True"}),
        (FAILED, {"Failed": "True", "Running": "False"}),
        (SUSPENDED, {"Suspended": "True", "Running": "False"}),
        (RESUMED, {"Suspended": "False", "Running": "True"}),
    ],
)
def test_mirrored_conditions_by_type(child_conditions, expected):
    c = conds(cnd.from_child({"conditions": child_conditions}, None, 1, T1))
    for type_, status in expected.items():
        assert c[type_]["status"] == status, type_


def test_failure_reason_and_message_are_copied():
    c = conds(cnd.from_child({"conditions": FAILED}, None, 1, T1))
    assert c["Failed"]["reason"] == "BackoffLimitExceeded"
    assert "backoff limit" in c["Failed"]["message"]
    assert c["Succeeded"]["message"] == c["Failed"]["message"]


def test_last_transition_time_moves_only_on_flips():
    first = cnd.from_child({"conditions": CREATED}, None, 1, T1)
    # Same statuses later, new message: times stay.
    again = cnd.from_child({"conditions": [cond("Created", message="still", when=T2)]}, first, 1, T2)
    assert conds(again)["Created"]["lastTransitionTime"] == conds(first)["Created"]["lastTransitionTime"]
    assert conds(again)["Created"]["message"] == "still"
    assert conds(again)["Running"]["lastTransitionTime"] == conds(first)["Running"]["lastTransitionTime"]
    # Running flips to True: its time moves (to the child's transition time), Created's does not.
    running = cnd.from_child({"conditions": [cond("Created"), cond("Running", when=T2)]}, again, 1, T2)
    assert conds(running)["Running"]["lastTransitionTime"] == T2
    assert conds(running)["Created"]["lastTransitionTime"] == conds(first)["Created"]["lastTransitionTime"]


def test_unreported_type_is_false_with_now():
    c = conds(cnd.from_child({"conditions": CREATED}, None, 1, T1))
    assert c["Running"] == {"type": "Running", "status": "False", "reason": "NotRunning", "message": "",
                            "lastTransitionTime": T1, "observedGeneration": 1}


def test_restart_drops_running():
    running = cnd.from_child({"conditions": RUNNING}, None, 1, T1)
    restarting = cnd.from_child({"conditions": RESTARTING}, running, 1, T2)
    c = conds(restarting)
    assert c["Running"]["status"] == "False" and c["Running"]["lastTransitionTime"] == T2
    assert restarting["phase"] == "Restarting"


@pytest.mark.parametrize("terminal", [SUCCEEDED, FAILED])
def test_terminal_states_stay_terminal(terminal):
    done = cnd.from_child({"conditions": terminal}, None, 1, T1)
    later = cnd.from_child({"conditions": RUNNING, "replicaStatuses": {"Master": {"active": 1}}}, done, 1, T2)
    assert later["phase"] == done["phase"]
    assert later["conditions"] == done["conditions"]
    assert later["replicas"] == {"Master": {"active": 1, "succeeded": 0, "failed": 0, "restarts": 0}}


def test_replicas_and_times():
    child = {"conditions": RUNNING, "startTime": T0, "completionTime": None,
             "replicaStatuses": {"Master": {"active": 1}, "Worker": {"active": 2, "failed": 1, "selector": "x"}}}
    new = cnd.from_child(child, None, 1, T1)
    assert new["replicas"] == {"Master": {"active": 1, "succeeded": 0, "failed": 0, "restarts": 0},
                               "Worker": {"active": 2, "succeeded": 0, "failed": 1, "restarts": 0}}
    assert new["startTime"] == T0 and "completionTime" not in new
    done = cnd.from_child({"conditions": SUCCEEDED, "completionTime": T2}, new, 1, T2)
    assert done["completionTime"] == T2 and done["startTime"] == T0


def test_other_status_fields_are_kept():
    previous = {"pytorchJob": "x", "configMap": "x-spec", "derived": {"trainIters": 3}, "progress": {"iteration": 2},
                "conditions": [{"type": "Synced", "status": "True", "reason": "ChildrenInSync", "message": "",
                                "lastTransitionTime": T0}]}
    new = cnd.from_child({"conditions": RUNNING}, previous, 1, T1)
    for key in ("pytorchJob", "configMap", "derived", "progress"):
        assert new[key] == previous[key]
    assert conds(new)["Synced"] == previous["conditions"][0]
    assert [c["type"] for c in new["conditions"]][-1] == "Synced"


def test_reconciled_initialises_every_condition():
    new = cnd.reconciled(None, 1, T0, pytorch_job="x", config_map="x-spec", derived={"a": 1})
    c = conds(new)
    assert set(c) == {"Created", "Running", "Restarting", "Suspended", "Succeeded", "Failed", "Synced"}
    assert c["Synced"]["status"] == "True" and c["Synced"]["reason"] == cnd.IN_SYNC
    assert c["Succeeded"]["status"] == "Unknown"
    assert new["phase"] == "Pending" and new["pytorchJob"] == "x" and new["configMap"] == "x-spec"


def test_reconciled_keeps_child_conditions():
    running = cnd.from_child({"conditions": RUNNING}, None, 1, T1)
    new = cnd.reconciled(running, 1, T2, pytorch_job="x")
    assert conds(new)["Running"] == conds(running)["Running"]
    assert new["phase"] == "Running"


def test_reconciled_synced_false_then_true_flips_time():
    bad = cnd.reconciled(None, 1, T0, synced=("False", cnd.CHILD_MODIFIED, "spec.x changed"))
    assert conds(bad)["Synced"]["reason"] == "ChildModified"
    good = cnd.reconciled(bad, 1, T1)
    assert conds(good)["Synced"]["status"] == "True" and conds(good)["Synced"]["lastTransitionTime"] == T1


def test_invalid_spec_is_terminal():
    new = cnd.invalid(None, ["spec.stage: bad", "spec.model: missing"], 1, T0)
    c = conds(new)
    assert new["phase"] == "Invalid"
    assert c["Failed"]["status"] == "True" and c["Failed"]["reason"] == "InvalidSpec"
    assert "spec.stage: bad" in c["Failed"]["message"] and "spec.model: missing" in c["Failed"]["message"]
    assert c["Succeeded"]["status"] == "False" and c["Synced"]["reason"] == "InvalidSpec"
    assert cnd.from_child({"conditions": RUNNING}, new, 1, T1)["conditions"] == new["conditions"]


def test_child_deleted_before_finishing_fails():
    running = cnd.from_child({"conditions": RUNNING}, None, 1, T0)
    gone = cnd.child_deleted(running, 1, T1, "x")
    assert gone["phase"] == "Failed"
    assert conds(gone)["Failed"]["reason"] == "ChildDeleted"


def test_child_deleted_after_finishing_changes_nothing():
    done = cnd.from_child({"conditions": SUCCEEDED}, None, 1, T0)
    assert cnd.child_deleted(done, 1, T1, "x") == done


def test_from_child_does_not_mutate_previous():
    previous = cnd.from_child({"conditions": CREATED}, None, 1, T0)
    snapshot = repr(previous)
    cnd.from_child({"conditions": FAILED}, previous, 2, T1)
    assert repr(previous) == snapshot


# ------------------------------------------------------------------------------------ pod failures


def pod(name="j-master-0", uid="u1", phase="Failed", code=137, reason="OOMKilled", message="", restarts=0,
        last=None, replica="master"):
    state = {"terminated": {"exitCode": code, "reason": reason, "message": message, "finishedAt": T1}} \
        if code is not None else {"running": {"startedAt": T1}}
    cs = {"name": "pytorch", "restartCount": restarts, "state": state}
    if last:
        cs["lastState"] = {"terminated": last}
    return {"metadata": {"name": name, "uid": uid, "labels": {"training.kubeflow.org/replica-type": replica}},
            "status": {"phase": phase, "containerStatuses": [cs]}}


def test_pod_failure_reads_exit_code_reason_and_termination_message():
    f = pods.pod_failure(pod(message="checkpoint.source: source /x does not exist\n"))
    assert f == {"replica": "Master", "pod": "j-master-0", "container": "pytorch", "uid": "u1", "run": 0,
                 "exitCode": 137,
                 "reason": "OOMKilled", "message": "checkpoint.source: source /x does not exist", "time": T1}
    assert pods.pod_failure(pod(phase="Running", code=None)) is None
    assert pods.pod_failure(pod(phase="Succeeded", code=0, reason="Completed")) is None
    # An in-place restart (kubelet, OnFailure): the previous run's termination is in lastState.
    inplace = pods.pod_failure(pod(phase="Running", code=None, restarts=2, replica="worker",
                                 last={"exitCode": 1, "reason": "Error", "message": "boom"}))
    assert inplace["replica"] == "Worker" and inplace["run"] == 1 and inplace["exitCode"] == 1


def test_failed_condition_names_pod_exit_code_reason_and_message():
    policy = {"restartPolicy": "Never", "cleanPodPolicy": "None"}
    running = cnd.from_child({"conditions": RUNNING, "replicaStatuses": {"Master": {"active": 1}}}, None, 1, T1)
    f = pods.pod_failure(pod(message="rank 0 crashed: CUDA out of memory"))
    seen = cnd.observe_pod_failure(running, f, policy, "ns", 1, T1)
    assert seen["replicas"]["Master"] == {"active": 0, "succeeded": 0, "failed": 1, "restarts": 0}
    assert conds(seen)["Restarting"]["status"] == "False"  # Never: no restart follows
    assert cnd.observe_pod_failure(seen, f, policy, "ns", 1, T1) is None  # the same run twice counts once
    # The child's Failed (stale replica counts: active 1, failed 0) now carries the pod's story.
    failed = cnd.from_child({"conditions": FAILED, "replicaStatuses": {"Master": {"active": 1}}}, seen, 1, T2,
                           run_policy=policy, namespace="ns")
    msg = conds(failed)["Failed"]["message"]
    assert "Master replica pod j-master-0 exited with code 137 (OOMKilled): rank 0 crashed: CUDA out of memory" in msg
    assert "kubectl logs -n ns j-master-0 -c pytorch" in msg
    assert conds(failed)["Succeeded"]["message"] == msg
    assert failed["replicas"]["Master"] == {"active": 0, "succeeded": 0, "failed": 1, "restarts": 0}


def test_a_job_past_its_backoff_limit_says_whether_its_pods_went():
    """The training-operator (v1.9.3) fails a job of Never replicas with backoffLimit 0 either for the backoff limit
    (deleting every pod, whatever cleanPodPolicy says) or through the replica's status (keeping it); both were seen
    on the dev cluster. Its Failed message tells which."""
    policy = {"restartPolicy": "Never", "cleanPodPolicy": "None", "backoffLimit": 0}
    f = pods.pod_failure(pod(message="boom"))
    early = pods.describe_failure(f, policy, "ns")  # the pod's watch, before the job's verdict
    assert "may delete its pods" in early and "kubectl logs -n ns j-master-0 -c pytorch" in early
    running = cnd.from_child({"conditions": RUNNING, "replicaStatuses": {"Master": {"active": 1}}}, None, 1, T1)
    seen = cnd.observe_pod_failure(running, f, policy, "ns", 1, T1)
    by_backoff = FAILED[:2] + [{**FAILED[2], "message": "Job j has failed because it has reached the specified backoff limit"}]
    gone = conds(cnd.from_child({"conditions": by_backoff}, seen, 1, T2, run_policy=policy, namespace="ns"))
    assert "The pod is deleted: the job reached spec.runPolicy.backoffLimit (0)" in gone["Failed"]["message"]
    assert "kubectl logs" not in gone["Failed"]["message"] and "backoffLimit: 1 or more" in gone["Failed"]["message"]
    by_status = FAILED[:2] + [{**FAILED[2], "message": "PyTorchJob j is failed because 1 Master replica(s) failed."}]
    kept = conds(cnd.from_child({"conditions": by_status}, seen, 1, T2, run_policy=policy, namespace="ns"))
    assert "Logs: kubectl logs -n ns j-master-0 -c pytorch (PyTorchJob j is failed" in kept["Failed"]["message"]
    # Within the limit nothing is deleted.
    assert pods.describe_failure(f, {**policy, "backoffLimit": 1}, "ns").endswith(
        "Logs: kubectl logs -n ns j-master-0 -c pytorch")


def test_pod_failure_after_the_childs_failed_still_names_the_pod():
    policy = {"restartPolicy": "OnFailure", "cleanPodPolicy": "None"}
    failed = cnd.from_child({"conditions": FAILED}, None, 1, T1, run_policy=policy, namespace="ns")
    f = pods.pod_failure(pod(code=1, reason="Error", message="bad spec"))
    later = cnd.observe_pod_failure(failed, f, policy, "ns", 1, T2)
    msg = conds(later)["Failed"]["message"]
    assert msg.startswith("Master replica pod j-master-0 exited with code 1 (Error): bad spec.")
    assert "restartPolicy: Never" in msg  # the pod is replaced or deleted: how to keep it for logs
    assert later["phase"] == "Failed"


def test_restarting_true_while_a_pod_is_replaced_then_counted():
    policy = {"restartPolicy": "OnFailure"}
    running = cnd.from_child({"conditions": RUNNING, "replicaStatuses": {"Master": {"active": 1}}}, None, 1, T1)
    f = pods.pod_failure(pod(code=1, reason="Error", message="nccl timeout"))
    restarting = cnd.observe_pod_failure(running, f, policy, "ns", 1, T1)
    assert restarting["phase"] == "Restarting"
    c = conds(restarting)["Restarting"]
    assert c["status"] == "True" and c["reason"] == "PodFailed" and "nccl timeout" in c["message"]
    # The child's own status (Running, Restarting never reported) does not turn it off...
    still = cnd.from_child({"conditions": RUNNING, "replicaStatuses": {"Master": {"active": 0}}}, restarting, 1, T2)
    assert conds(still)["Restarting"]["status"] == "True" and still["phase"] == "Restarting"
    # ...a running replacement does.
    replacement = pod(uid="u2", phase="Running", code=None)
    assert pods.pod_running_again(replacement, still) == "Master"
    assert pods.pod_running_again(pod(uid="u1", phase="Running", code=None), still) is None
    assert cnd.pending_restart(still)
    again = cnd.observe_pod_running(still, "Master", 1, T2)
    assert conds(again)["Restarting"]["status"] == "False" and again["phase"] == "Running"
    assert again["replicas"]["Master"]["restarts"] == 1 and again["restarts"] == 1
    assert cnd.observe_pod_running(again, "Master", 1, T2) is None and not cnd.pending_restart(again)
    # ExitCode restarts only retryable codes.
    assert pods.will_restart({"exitCode": 137}, {"restartPolicy": "ExitCode"})
    assert not pods.will_restart({"exitCode": 1}, {"restartPolicy": "ExitCode"})


def test_duration_on_completion():
    done = cnd.from_child({"conditions": SUCCEEDED, "startTime": T0, "completionTime": T2}, None, 1, T2)
    assert done["duration"] == "2m0s"
    assert cnd.duration("2026-01-01T00:00:00Z", "2026-01-01T01:02:03Z") == "1h2m3s"
