"""Pure stage bookkeeping: moving through a pipeline, stopping at a failure, rerunning after a fix."""

from __future__ import annotations

from qwen_operator import step_records as sr
from qwen_operator import conditions as cnd

NOW = "2026-11-28T00:00:00Z"
STEPS = [("convert", "convert"), ("pretrain", "pretrain"), ("export", "export")]


def _child(phase_type: str) -> dict:
    return {"conditions": [{"type": "Created", "status": "True", "reason": "PyTorchJobCreated", "message": "created"},
                           {"type": phase_type, "status": "True", "reason": f"PyTorchJob{phase_type}", "message": f"job {phase_type}"}]}


def _running_step(index: int, records=None) -> dict:
    records = records or sr.init_stages(None, STEPS)
    status = cnd.reconciled({}, 1, NOW, pytorch_job=f"job-{index}", config_map="cm")
    return sr.started(status, records, index, f"job-{index}", NOW)


def test_success_moves_to_the_next_step_and_resets_the_job_level_state():
    status = _running_step(0)
    after = cnd.from_child(_child("Succeeded"), status, 1, NOW)
    after, moved = sr.observed(after, 0, NOW)
    assert moved
    assert after["phase"] == "Pending" and after["currentStage"] == "pretrain"
    assert "pytorchJob" not in after and not cnd.is_terminal(after)
    assert [s["phase"] for s in after["stages"]] == ["Succeeded", "Pending", "Pending"]
    assert sr.current_index(after["stages"]) == 1


def test_last_step_success_is_terminal():
    records = sr.init_stages(None, STEPS)
    for r in records[:2]:
        r["phase"] = "Succeeded"
    after, moved = sr.observed(cnd.from_child(_child("Succeeded"), _running_step(2, records), 1, NOW), 2, NOW)
    assert not moved and after["phase"] == "Succeeded" and cnd.is_terminal(after)
    assert "all 3 stages succeeded" in cnd.get_condition(after, "Succeeded")["message"]


def test_failure_stops_the_chain_and_names_the_step():
    records = sr.init_stages(None, STEPS)
    records[0]["phase"] = "Succeeded"
    after, moved = sr.observed(cnd.from_child(_child("Failed"), _running_step(1, records), 1, NOW), 1, NOW)
    assert not moved and after["phase"] == "Failed"
    assert cnd.get_condition(after, "Failed")["message"].startswith("stage pretrain (2/3) failed: job Failed")
    assert [s["phase"] for s in after["stages"]] == ["Succeeded", "Failed", "Pending"]


def test_rerun_after_a_fix_keeps_succeeded_steps_and_bumps_the_attempt():
    records = sr.init_stages(None, STEPS)
    records[0]["phase"] = "Succeeded"
    failed, _ = sr.observed(cnd.from_child(_child("Failed"), _running_step(1, records), 1, NOW), 1, NOW)
    again = sr.rerun(failed, failed["stages"], 2)
    assert again["phase"] == "Pending" and again["conditions"] == [] and again["observedGeneration"] == 2
    assert [s["phase"] for s in again["stages"]] == ["Succeeded", "Pending", "Pending"]
    assert again["stages"][1]["attempt"] == 1 and again["currentStage"] == "pretrain"
    assert sr.current_index(again["stages"]) == 1


def test_init_stages_keeps_records_of_unchanged_steps_only():
    records = sr.init_stages(None, STEPS)
    records[0]["phase"] = "Succeeded"
    renamed = sr.init_stages(records, [("convert", "convert"), ("train", "pretrain")])
    assert renamed[0]["phase"] == "Succeeded" and renamed[1] == {"name": "train", "stage": "pretrain", "phase": "Pending", "attempt": 0}
