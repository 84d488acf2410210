"""The operator's decisions without a cluster: `reconcile` (what create/resume/update do with the children found)
and `mirror` (what a watched child job, pod or Kueue Workload changes in the resource, and which Events say so)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from qwen_operator import conditions as cnd
from qwen_operator import kueue_status
from qwen_operator import pod_failures as pods
from qwen_operator import mirror
from qwen_operator import reconcile as rc
from qwen_operator.api import API_VERSION, KIND
from qwen_operator.render import HASH_ANNOTATION, render_step

T0, T1, T2 = "2026-07-01T12:00:00Z", "2026-07-01T12:01:00Z", "2026-07-01T12:02:00Z"
UID = "u-1"

RESOURCE = {
    "apiVersion": API_VERSION, "kind": KIND,
    "metadata": {"name": "j", "namespace": "ns", "uid": UID, "generation": 1, "resourceVersion": "5"},
    "spec": {"stage": "convert", "model": {"family": "qwen2.5", "size": "0.5B"},
             "checkpoint": {"source": {"path": "/data/hf"}, "output": {"path": "/data/mcore"}},
             "resources": {"nodes": 1, "gpusPerNode": 1}},
}
PIPELINE_SPEC = {
    "model": {"family": "qwen2.5", "size": "0.5B"}, "resources": {"nodes": 1, "gpusPerNode": 1},
    "pipeline": [
        {"name": "convert", "stage": "convert",
         "checkpoint": {"source": {"path": "/data/hf"}, "output": {"path": "/data/mcore"}}},
        {"name": "export", "stage": "export",
         "checkpoint": {"source": {"path": "/data/mcore"}, "output": {"path": "/data/out"}}},
    ],
}


def resource(status: dict[str, Any] | None = None, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    res = copy.deepcopy(RESOURCE)
    if spec is not None:
        res["spec"] = copy.deepcopy(spec)
    if status is not None:
        res["status"] = copy.deepcopy(status)
    return res


def rendered(res: dict[str, Any], index: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    _, (cm, job) = render_step(res, index)
    return cm, job


def unowned(obj: dict[str, Any]) -> dict[str, Any]:
    obj = copy.deepcopy(obj)
    obj["metadata"].pop("ownerReferences", None)
    return obj


def owned(obj: dict[str, Any], uid: str = UID, kind: str = KIND) -> dict[str, Any]:
    obj = copy.deepcopy(obj)
    obj["metadata"]["ownerReferences"] = [{"apiVersion": API_VERSION, "kind": kind, "name": "j", "uid": uid,
                                           "controller": True}]
    return obj


def cond(type_: str, status: str = "True", reason: str = "", message: str = "") -> dict[str, Any]:
    return {"type": type_, "status": status, "reason": reason or type_, "message": message,
            "lastTransitionTime": T0}


# --------------------------------------------------------------------------------------- reconcile


def test_a_created_child_is_in_sync_and_announced():
    cm, job = rendered(resource())
    seen = [rc.judge_child(cm, cm, True, UID), rc.judge_child(job, job, True, UID)]
    assert [c.created for c in seen] == [True, True]
    assert rc.children_synced(seen) == (rc.IN_SYNC, [])
    assert rc.created_event([c.label for c in seen]) == ("Normal", "Created", "ConfigMap j-spec, PyTorchJob j")
    assert rc.created_event(["ConfigMap j-spec"]) is None  # only a child job's creation is an Event


def test_a_live_child_of_ours_that_matches_is_adopted_silently():
    cm, job = rendered(resource())
    seen = rc.judge_child(job, owned(job), False, UID)
    assert not seen.created and seen.drift is None and not seen.conflict and not seen.leftover
    assert rc.children_synced([rc.judge_child(cm, owned(cm), False, UID), seen]) == (rc.IN_SYNC, [])


def test_a_child_of_an_earlier_resource_of_the_same_name_is_tried_again():
    _, job = rendered(resource())
    seen = rc.judge_child(job, owned(job, uid="u-0"), False, UID)
    assert seen.leftover == f"PyTorchJob j still belongs to an earlier {KIND} u-0"


def test_a_foreign_child_is_a_name_conflict_and_stops_there():
    cm, job = rendered(resource())
    foreign = rc.judge_child(cm, unowned(cm), False, UID)  # no owner reference at all
    assert foreign.conflict == f"ConfigMap j-spec exists and is not owned by this {KIND}; it is left alone"
    synced, problems = rc.children_synced([foreign, rc.judge_child(job, job, True, UID)])
    assert synced == ("False", cnd.NAME_CONFLICT, foreign.conflict)
    assert problems == [(cnd.NAME_CONFLICT, foreign.conflict)]


def test_drift_hand_edits_and_other_renderings():
    _, job = rendered(resource())
    edited = owned(job)
    edited["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = 3
    reason, message = rc.drift_state(job, edited)
    assert reason == cnd.CHILD_MODIFIED and "changed by hand" in message
    assert "spec.pytorchReplicaSpecs.Master.replicas" in message
    other = owned(job)
    other["metadata"]["annotations"][HASH_ANNOTATION] = "something-else"
    assert rc.drift_state(job, other)[0] == cnd.SPEC_CHANGE_IGNORED
    # The first drift names the Synced condition; each one is a Warning.
    cm, _ = rendered(resource())
    cm_other = owned(cm)
    cm_other["metadata"]["annotations"][HASH_ANNOTATION] = "x"
    synced, problems = rc.children_synced([rc.judge_child(cm, cm_other, False, UID),
                                           rc.judge_child(job, edited, False, UID)])
    assert synced[:2] == ("False", cnd.SPEC_CHANGE_IGNORED) and [p[0] for p in problems] == [cnd.SPEC_CHANGE_IGNORED]


def test_reconciled_status_names_the_children_and_starts_the_step():
    res = resource()
    records = rc.step_records(res)
    status = rc.reconciled_status(res, T1, records=records, index=0, child="j", config_map="j-spec",
                                  derived={"worldSize": 1}, synced=rc.IN_SYNC, memory=("True", "Fits", "ok"),
                                  queue=None)
    assert status["pytorchJob"] == "j" and status["configMap"] == "j-spec" and status["phase"] == "Pending"
    assert status["stages"] == [{"name": "convert", "stage": "convert", "phase": "Created", "attempt": 0,
                                 "pytorchJob": "j", "startTime": T1}]
    assert cnd.get_condition(status, cnd.SYNCED)["reason"] == cnd.IN_SYNC
    assert cnd.get_condition(status, cnd.QUEUED) is None
    queued = rc.reconciled_status(res, T1, records=records, index=0, child="j", config_map="j-spec", derived={},
                                  synced=rc.IN_SYNC, memory=("True", "Fits", "ok"),
                                  queue=kueue_status.queue_pending("PyTorchJob", "j", "lq", "spec.scheduling.queueName"))
    assert cnd.get_condition(queued, cnd.QUEUED)["status"] == "True"


def test_warnings_are_said_once():
    missing = ("False", "Exceeds", "needs 90 GiB")
    assert rc.memory_problem({}, missing) == ("Exceeds", "needs 90 GiB")
    assert rc.memory_problem({"conditions": [cond(cnd.MEMORY_FITS, "False")]}, missing) is None
    assert rc.memory_problem({}, ("True", "Fits", "")) is None
    no_kueue = kueue_status.kueue_not_installed("PyTorchJob", "j", "lq", "spec.scheduling.queueName")
    assert rc.queue_problem({}, no_kueue) == (kueue_status.KUEUE_NOT_INSTALLED, no_kueue[2])
    assert rc.queue_problem({"conditions": [cond(cnd.QUEUED, reason=kueue_status.KUEUE_NOT_INSTALLED)]}, no_kueue) is None
    assert rc.queue_problem({}, None) is None
    assert rc.refusal_is_new({}, cnd.RUNTIME_NOT_FOUND)
    assert not rc.refusal_is_new({"conditions": [cond("Created", "False", cnd.RUNTIME_NOT_FOUND)]},
                                 cnd.RUNTIME_NOT_FOUND)


def test_queue_condition_says_whether_kueue_is_there():
    res = resource(spec={**RESOURCE["spec"], "scheduling": {"queueName": "lq"}})
    _, job = rendered(res)
    source = rc.queue_source(res, render_step(res, 0)[0], 0)
    assert source is not None and source[0] == "lq"
    assert rc.queue_condition(job, source, True)[1] == kueue_status.QUEUE_PENDING
    assert rc.queue_condition(job, source, False)[1] == kueue_status.KUEUE_NOT_INSTALLED
    assert rc.queue_source(resource(), render_step(resource(), 0)[0], 0) is None


@pytest.mark.parametrize("retry,delay", [(0, 10), (1, 20), (4, 160), (5, 300), (30, 300), (-1, 10)])
def test_refused_children_are_tried_again_later_and_later(retry, delay):
    assert rc.refusal_delay(retry) == delay


def test_only_spec_fields_other_than_suspend_count_as_changes():
    diff = [("change", ("spec", "suspend"), False, True), ("change", ("spec", "training", "lr"), 1, 2),
            ("change", ("metadata", "labels", "x"), None, "y"), ("add", ("spec", "stage"), None, "export")]
    assert rc.changed_spec_fields(diff) == ["spec.stage", "spec.training.lr"]
    assert rc.spec_change_ignored(["spec.stage"]).endswith("ignored changes to spec.stage")


def test_owner_of_reads_only_our_controller_reference():
    _, job = rendered(resource())
    assert rc.owner_of(owned(job))["uid"] == UID
    assert rc.owner_of(owned(job, kind="Deployment")) is None
    assert rc.owner_of(unowned(job)) is None
    assert rc.ref_of(resource()) == {"apiVersion": API_VERSION, "kind": KIND,
                                     "metadata": {"name": "j", "namespace": "ns", "uid": UID}}


# ------------------------------------------------------------------------------------------ mirror


def child_job(conditions: list[dict[str, Any]], generation: int = 1, name: str = "j") -> dict[str, Any]:
    _, job = rendered(resource())
    job = owned(job)
    job["metadata"].update(name=name, generation=generation)
    job["status"] = {"conditions": conditions}
    return job


def created_status() -> dict[str, Any]:
    res = resource()
    return rc.reconciled_status(res, T0, records=rc.step_records(res), index=0, child="j", config_map="j-spec",
                                derived={}, synced=rc.IN_SYNC, memory=("True", "Fits", ""), queue=None)


def test_a_child_not_acted_on_yet_is_not_mirrored():
    assert mirror.nothing_to_mirror({"metadata": {"generation": 1}})
    assert mirror.nothing_to_mirror({"metadata": {}, "status": {}})
    assert not mirror.nothing_to_mirror({"metadata": {"generation": 1}, "status": {"conditions": [cond("Created")]}})
    assert not mirror.nothing_to_mirror({"metadata": {"generation": 2}})


def test_running_then_succeeded_are_one_event_each():
    res = resource(created_status())
    running = mirror.child_changed_decision(res, UID, child_job([cond("Created"), cond("Running")]), T1)
    assert running.status["phase"] == "Running" and not running.advance
    assert running.events == (("Normal", "Running", "PyTorchJob j is running"),)
    again = mirror.child_changed_decision(resource(running.status), UID,
                                          child_job([cond("Created"), cond("Running")]), T1)
    assert again.events == ()  # no phase change, nothing to say
    done = mirror.child_changed_decision(resource(running.status), UID, child_job(
        [cond("Created"), cond("Running", "False"), cond("Succeeded")]), T2)
    assert done.status["phase"] == "Succeeded" and done.status["stages"][0]["phase"] == "Succeeded"
    assert [e[:2] for e in done.events] == [("Normal", "Succeeded")] and done.events[0][2].startswith(
        "PyTorchJob j succeeded")


def test_a_failed_child_is_one_warning_with_the_message():
    res = resource(created_status())
    failed = mirror.child_changed_decision(res, UID, child_job(
        [cond("Created"), cond("Running", "False"), cond("Failed", message="pod j-master-0 failed")]), T1)
    assert failed.status["phase"] == "Failed"
    assert [e[:2] for e in failed.events] == [("Warning", "Failed")] and "j-master-0" in failed.events[0][2]


def test_a_step_that_succeeds_with_another_to_follow_advances_quietly():
    res = resource(spec=PIPELINE_SPEC)
    status = rc.reconciled_status(res, T0, records=rc.step_records(res), index=0, child="j-convert",
                                  config_map="j-convert-spec", derived={}, synced=rc.IN_SYNC,
                                  memory=("True", "Fits", ""), queue=None)
    _, job = rendered(res, 0)
    job = owned(job)
    job["status"] = {"conditions": [cond("Created"), cond("Running", "False"), cond("Succeeded")]}
    decision = mirror.child_changed_decision(resource(status, spec=PIPELINE_SPEC), UID, job, T1)
    assert decision.advance and decision.events == ()
    assert decision.status["phase"] == "Pending" and decision.status["currentStage"] == "export"
    assert decision.status["stages"][0]["phase"] == "Succeeded" and "pytorchJob" not in decision.status


def test_other_resources_and_earlier_children_change_nothing():
    res = resource(created_status())
    job = child_job([cond("Created"), cond("Running")])
    assert mirror.child_changed_decision(res, "someone-else", job, T1) is mirror.NOTHING
    assert mirror.child_changed_decision(res, UID, child_job([cond("Created")], name="j-old"), T1) is mirror.NOTHING
    gone = resource(created_status())
    gone["metadata"]["deletionTimestamp"] = T1
    assert mirror.child_changed_decision(gone, UID, job, T1) is mirror.NOTHING


def test_a_hand_edited_child_is_reported_once_and_cleared_when_undone():
    res = resource(created_status())
    edited = child_job([cond("Created"), cond("Running")], generation=2)
    edited["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = 3
    first = mirror.child_changed_decision(res, UID, edited, T1)
    assert cnd.get_condition(first.status, cnd.SYNCED)["reason"] == cnd.CHILD_MODIFIED
    assert ("Warning", cnd.CHILD_MODIFIED) in [e[:2] for e in first.events]
    second = mirror.child_changed_decision(resource(first.status), UID, edited, T2)
    assert cnd.CHILD_MODIFIED not in [e[1] for e in second.events]  # said once
    undone = child_job([cond("Created"), cond("Running")], generation=3)
    cleared = mirror.child_changed_decision(resource(first.status), UID, undone, T2)
    assert cnd.get_condition(cleared.status, cnd.SYNCED)["reason"] == cnd.IN_SYNC


def test_a_deleted_child_fails_an_unfinished_resource():
    res = resource(created_status())
    job = child_job([cond("Created")])
    decision = mirror.child_deleted_decision(res, UID, job, T1)
    assert decision.status["phase"] == "Failed"
    assert decision.events == (("Warning", cnd.CHILD_DELETED, "PyTorchJob j was deleted before it finished"),)
    assert mirror.child_deleted_decision(res, UID, child_job([], name="j-old"), T1) is mirror.NOTHING


def test_phase_event_words():
    assert mirror.phase_event("TrainJob", "t", {"phase": "Running"}) == ("Normal", "Running", "TrainJob t is running")
    assert mirror.phase_event("TrainJob", "t", {"phase": "Succeeded", "duration": "5s"})[2] == \
        "TrainJob t succeeded in 5s"
    assert mirror.phase_event("TrainJob", "t", {"phase": "Pending"}) is None


def pod(phase: str = "Failed", code: int | None = 1, uid: str = "p1", restarts: int = 0) -> dict[str, Any]:
    state = {"terminated": {"exitCode": code, "reason": "Error", "message": "boom", "finishedAt": T1}} \
        if code is not None else {"running": {"startedAt": T1}}
    return {"metadata": {"name": "j-master-0", "uid": uid,
                         "labels": {pods.JOB_NAME_LABEL: "j", pods.REPLICA_TYPE_LABEL: "master"}},
            "spec": {"containers": [{"name": "pytorch", "env": [{"name": mirror.STATUS_ENV, "value": "ns/j"}]}]},
            "status": {"phase": phase, "containerStatuses": [{"name": "pytorch", "restartCount": restarts,
                                                              "state": state}]}}


def test_a_failed_pod_is_recorded_and_one_warning_then_its_replacement_is_restarted():
    assert mirror.resource_of_pod(pod()) == ("ns", "j")
    assert mirror.resource_of_pod({"spec": {"containers": [{"env": []}]}}) is None
    running = resource(mirror.child_changed_decision(resource(created_status()), UID, child_job(
        [cond("Created"), cond("Running")]), T1).status)
    failure = pods.pod_failure(pod())
    failed = mirror.pod_decision(running, pod(), failure, T1)
    assert failed.status["failures"][0]["pod"] == "j-master-0"
    assert [e[:2] for e in failed.events] == [("Warning", cnd.POD_FAILED)] and "exited with code 1" in failed.events[0][2]
    assert mirror.pod_decision(resource(failed.status), pod(), failure, T1) is mirror.NOTHING  # counted once
    restarting = resource(failed.status)
    replacement = pod("Running", None, uid="p2")
    assert cnd.pending_restart(failed.status)  # OnFailure, backoff limit 3: a replacement follows
    assert mirror.pod_worth_reading(replacement, None, restarting)
    again = mirror.pod_decision(restarting, replacement, None, T2)
    assert [e[:2] for e in again.events] == [("Normal", "Restarted")]
    assert not mirror.pod_worth_reading(replacement, None, resource(again.status))
    assert not mirror.pod_worth_reading(replacement, None, None)
    assert mirror.pod_worth_reading(pod(), failure, None)
    assert mirror.pod_decision(resource({"pytorchJob": "other"}), pod(), failure, T1) is mirror.NOTHING


def workload(*conditions: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": "pytorchjob-j-1", "namespace": "ns"},
            "spec": {"queueName": "lq"}, "status": {"conditions": list(conditions)}}


def test_a_workload_moves_queued_and_speaks_on_changes_only():
    res = resource({**created_status(), "phase": "Suspended"})
    pending = mirror.workload_decision(res, UID, "j", workload(
        cond("QuotaReserved", "False", "Pending", "insufficient unused quota for nvidia.com/gpu")), T1)
    q = cnd.get_condition(pending.status, cnd.QUEUED)
    assert q["status"] == "True" and q["reason"] == kueue_status.WAITING_FOR_QUOTA
    assert pending.events == (("Normal", cnd.QUEUED, q["message"]),)
    admitted = mirror.workload_decision(resource(pending.status), UID, "j", workload(
        cond("QuotaReserved"), cond("Admitted")), T2)
    assert [e[:2] for e in admitted.events] == [("Normal", kueue_status.ADMITTED)]
    assert mirror.workload_decision(res, "someone-else", "j", workload(), T1) is mirror.NOTHING
    # An earlier child's Workload; a child not recorded yet may be the next step's, whose name is not written yet.
    assert mirror.workload_decision(resource({"pytorchJob": "j"}), UID, "j-old", workload(), T1) is mirror.NOTHING
    earlier = resource({"pytorchJob": "j", "stages": [{"name": "a", "pytorchJob": "j-old"}, {"name": "b"}]})
    assert mirror.workload_decision(earlier, UID, "j-old", workload(), T1) is mirror.NOTHING


def test_queued_events():
    assert mirror.queued_events({"status": "True"}, {"status": "False", "message": "m"}) == \
        (("Normal", kueue_status.ADMITTED, "m"),)
    assert mirror.queued_events({}, {"status": "True", "reason": kueue_status.INADMISSIBLE, "message": "m"}) == \
        (("Warning", kueue_status.INADMISSIBLE, "m"),)
    assert mirror.queued_events({}, {"status": "True", "reason": kueue_status.PREEMPTED, "message": "m"}) == \
        (("Warning", kueue_status.PREEMPTED, "m"),)
    held = {"status": "True", "reason": kueue_status.WAITING_FOR_QUOTA, "message": "m"}
    assert mirror.queued_events({}, held) == (("Normal", cnd.QUEUED, "m"),)
    assert mirror.queued_events(held, held) == ()
    assert mirror.queued_events({}, {"status": "True", "reason": kueue_status.WAITING_FOR_CHECKS}) == ()
