"""Mapping the PyTorchJob's status onto the QwenTrainingJob's status (pure, table-driven)."""

from __future__ import annotations

import pytest

from qwen_operator import status as st

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
    new = st.from_child(child, None, 3, T1)
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
    c = conds(st.from_child({"conditions": child_conditions}, None, 1, T1))
    for type_, status in expected.items():
        assert c[type_]["status"] == status, type_


def test_failure_reason_and_message_are_copied():
    c = conds(st.from_child({"conditions": FAILED}, None, 1, T1))
    assert c["Failed"]["reason"] == "BackoffLimitExceeded"
    assert "backoff limit" in c["Failed"]["message"]
    assert c["Succeeded"]["message"] == c["Failed"]["message"]


def test_last_transition_time_moves_only_on_flips():
    first = st.from_child({"conditions": CREATED}, None, 1, T1)
    # Same statuses later, new message: times stay.
    again = st.from_child({"conditions": [cond("Created", message="still", when=T2)]}, first, 1, T2)
    assert conds(again)["Created"]["lastTransitionTime"] == conds(first)["Created"]["lastTransitionTime"]
    assert conds(again)["Created"]["message"] == "still"
    assert conds(again)["Running"]["lastTransitionTime"] == conds(first)["Running"]["lastTransitionTime"]
    # Running flips to True: its time moves (to the child's transition time), Created's does not.
    running = st.from_child({"conditions": [cond("Created"), cond("Running", when=T2)]}, again, 1, T2)
    assert conds(running)["Running"]["lastTransitionTime"] == T2
    assert conds(running)["Created"]["lastTransitionTime"] == conds(first)["Created"]["lastTransitionTime"]


def test_unreported_type_is_false_with_now():
    c = conds(st.from_child({"conditions": CREATED}, None, 1, T1))
    assert c["Running"] == {"type": "Running", "status": "False", "reason": "NotRunning", "message": "",
                            "lastTransitionTime": T1, "observedGeneration": 1}


def test_restart_drops_running():
    running = st.from_child({"conditions": RUNNING}, None, 1, T1)
    restarting = st.from_child({"conditions": RESTARTING}, running, 1, T2)
    c = conds(restarting)
    assert c["Running"]["status"] == "False" and c["Running"]["lastTransitionTime"] == T2
    assert restarting["phase"] == "Restarting"


@pytest.mark.parametrize("terminal", [SUCCEEDED, FAILED])
def test_terminal_states_stay_terminal(terminal):
    done = st.from_child({"conditions": terminal}, None, 1, T1)
    later = st.from_child({"conditions": RUNNING, "replicaStatuses": {"Master": {"active": 1}}}, done, 1, T2)
    assert later["phase"] == done["phase"]
    assert later["conditions"] == done["conditions"]
    assert later["replicas"] == {"Master": {"active": 1, "succeeded": 0, "failed": 0}}


def test_replicas_and_times():
    child = {"conditions": RUNNING, "startTime": T0, "completionTime": None,
             "replicaStatuses": {"Master": {"active": 1}, "Worker": {"active": 2, "failed": 1, "selector": "x"}}}
    new = st.from_child(child, None, 1, T1)
    assert new["replicas"] == {"Master": {"active": 1, "succeeded": 0, "failed": 0},
                               "Worker": {"active": 2, "succeeded": 0, "failed": 1}}
    assert new["startTime"] == T0 and "completionTime" not in new
    done = st.from_child({"conditions": SUCCEEDED, "completionTime": T2}, new, 1, T2)
    assert done["completionTime"] == T2 and done["startTime"] == T0


def test_other_status_fields_are_kept():
    previous = {"pytorchJob": "x", "configMap": "x-spec", "derived": {"trainIters": 3}, "progress": {"iteration": 2},
                "conditions": [{"type": "Synced", "status": "True", "reason": "ChildrenInSync", "message": "",
                                "lastTransitionTime": T0}]}
    new = st.from_child({"conditions": RUNNING}, previous, 1, T1)
    for key in ("pytorchJob", "configMap", "derived", "progress"):
        assert new[key] == previous[key]
    assert conds(new)["Synced"] == previous["conditions"][0]
    assert [c["type"] for c in new["conditions"]][-1] == "Synced"


def test_reconciled_initialises_every_condition():
    new = st.reconciled(None, 1, T0, pytorch_job="x", config_map="x-spec", derived={"a": 1})
    c = conds(new)
    assert set(c) == {"Created", "Running", "Restarting", "Suspended", "Succeeded", "Failed", "Synced"}
    assert c["Synced"]["status"] == "True" and c["Synced"]["reason"] == st.IN_SYNC
    assert c["Succeeded"]["status"] == "Unknown"
    assert new["phase"] == "Pending" and new["pytorchJob"] == "x" and new["configMap"] == "x-spec"


def test_reconciled_keeps_child_conditions():
    running = st.from_child({"conditions": RUNNING}, None, 1, T1)
    new = st.reconciled(running, 1, T2, pytorch_job="x")
    assert conds(new)["Running"] == conds(running)["Running"]
    assert new["phase"] == "Running"


def test_reconciled_synced_false_then_true_flips_time():
    bad = st.reconciled(None, 1, T0, synced=("False", st.CHILD_MODIFIED, "spec.x changed"))
    assert conds(bad)["Synced"]["reason"] == "ChildModified"
    good = st.reconciled(bad, 1, T1)
    assert conds(good)["Synced"]["status"] == "True" and conds(good)["Synced"]["lastTransitionTime"] == T1


def test_invalid_spec_is_terminal():
    new = st.invalid(None, ["spec.stage: bad", "spec.model: missing"], 1, T0)
    c = conds(new)
    assert new["phase"] == "Invalid"
    assert c["Failed"]["status"] == "True" and c["Failed"]["reason"] == "InvalidSpec"
    assert "spec.stage: bad" in c["Failed"]["message"] and "spec.model: missing" in c["Failed"]["message"]
    assert c["Succeeded"]["status"] == "False" and c["Synced"]["reason"] == "InvalidSpec"
    assert st.from_child({"conditions": RUNNING}, new, 1, T1)["conditions"] == new["conditions"]


def test_child_deleted_before_finishing_fails():
    running = st.from_child({"conditions": RUNNING}, None, 1, T0)
    gone = st.child_deleted(running, 1, T1, "x")
    assert gone["phase"] == "Failed"
    assert conds(gone)["Failed"]["reason"] == "ChildDeleted"


def test_child_deleted_after_finishing_changes_nothing():
    done = st.from_child({"conditions": SUCCEEDED}, None, 1, T0)
    assert st.child_deleted(done, 1, T1, "x") == done


def test_from_child_does_not_mutate_previous():
    previous = st.from_child({"conditions": CREATED}, None, 1, T0)
    snapshot = repr(previous)
    st.from_child({"conditions": FAILED}, previous, 2, T1)
    assert repr(previous) == snapshot
