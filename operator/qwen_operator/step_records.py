"""Stage bookkeeping in the status: which step runs, what each step did, moving on, and rerunning after a fix.

Every job is a list of steps (one for a single-stage job). `status.stages` records each step's phase, its
PyTorchJob, its attempt and times; `status.currentStage` names the step whose PyTorchJob the job-level
conditions mirror. Pure functions over the wire form.

- When the current step's PyTorchJob succeeds and steps remain, the step is recorded as Succeeded and the
  job-level conditions start afresh for the next step (phase Pending until its PyTorchJob exists).
- When a step fails, the job fails, and the message names the step: a failed step stops the chain.
- When a failed (or refused) job is fixed and re-applied, the first step that has not succeeded runs again
  under a new attempt number, so steps that succeeded are not repeated.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

from . import conditions as cnd


def init_stages(previous: Optional[list[dict[str, Any]]], steps: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """One entry per step, keeping what is known of steps whose name and stage are unchanged."""
    known = {(s.get("name"), s.get("stage")): s for s in (previous or [])}
    return [copy.deepcopy(known.get((name, stage)) or {"name": name, "stage": stage, "phase": "Pending", "attempt": 0})
            for name, stage in steps]


def current_index(stages: list[dict[str, Any]]) -> Optional[int]:
    for i, s in enumerate(stages):
        if s.get("phase") != "Succeeded":
            return i
    return None


def label(stages: list[dict[str, Any]], index: int) -> str:
    if len(stages) == 1:
        return stages[index]["stage"]
    return f"stage {stages[index]['name']} ({index + 1}/{len(stages)})"


def started(status: dict[str, Any], stages: list[dict[str, Any]], index: int, pytorch_job: Optional[str],
            now: str) -> dict[str, Any]:
    """The status once step `index`'s children exist."""
    status = copy.deepcopy(status)
    stages = copy.deepcopy(stages)
    step = stages[index]
    if pytorch_job and step.get("pytorchJob") != pytorch_job:
        step["pytorchJob"] = pytorch_job
        step["startTime"] = now
    if step.get("phase") in (None, "Pending"):
        step["phase"] = "Created"
    status["stages"] = stages
    status["currentStage"] = step["name"]
    return status


def observed(status: dict[str, Any], index: int, now: str) -> tuple[dict[str, Any], bool]:
    """Fold the job-level phase (mirrored from step `index`'s PyTorchJob) into the step's record.

    Returns (status, advanced): advanced is True when the step succeeded and another step must be started."""
    status = copy.deepcopy(status)
    stages = status.get("stages") or []
    if index >= len(stages):
        return status, False
    step = stages[index]
    phase = status.get("phase")
    if phase in ("Created", "Running", "Restarting", "Suspended"):
        step["phase"] = phase
        return status, False
    if phase == "Failed":
        step["phase"] = "Failed"
        step.setdefault("completionTime", now)
        failed = cnd.get_condition(status, "Failed") or {}
        step["message"] = failed.get("message", "")
        if len(stages) > 1:
            _prefix_messages(status, f"{label(stages, index)} failed: ")
        return status, False
    if phase != "Succeeded":
        return status, False
    step["phase"] = "Succeeded"
    step.setdefault("completionTime", now)
    if index + 1 >= len(stages):
        if len(stages) > 1:
            _prefix_messages(status, f"all {len(stages)} stages succeeded; last: ")
        return status, False
    # The next step starts from a clean slate: the job is no longer done.
    status["conditions"] = [c for c in status.get("conditions") or [] if c["type"] == cnd.SYNCED]
    status["phase"] = "Pending"
    status.pop("pytorchJob", None)
    status.pop("configMap", None)
    status.pop("completionTime", None)
    status.pop("replicas", None)
    status["currentStage"] = stages[index + 1]["name"]
    return status, True


def _prefix_messages(status: dict[str, Any], prefix: str) -> None:
    for c in status.get("conditions") or []:
        if c["type"] in ("Failed", cnd.SUMMARY) and c.get("status") in ("True", "False") and \
                not (c.get("message") or "").startswith(prefix):
            c["message"] = (prefix + (c.get("message") or ""))[:32768]


def rerun(status: dict[str, Any], stages: list[dict[str, Any]], generation: Optional[int]) -> dict[str, Any]:
    """A failed or refused job whose spec was fixed: clear the terminal state and give the first unfinished step
    a new attempt (a new PyTorchJob name), keeping steps that succeeded."""
    status = copy.deepcopy(status)
    stages = copy.deepcopy(stages)
    index = current_index(stages)
    if index is not None:
        step = stages[index]
        if step.get("pytorchJob"):
            step["attempt"] = int(step.get("attempt") or 0) + 1
        for key in ("pytorchJob", "startTime", "completionTime", "message"):
            step.pop(key, None)
        step["phase"] = "Pending"
        status["currentStage"] = step["name"]
    status["stages"] = stages
    status["conditions"] = []
    status["phase"] = "Pending"
    for key in ("pytorchJob", "configMap", "completionTime", "replicas", "startTime"):
        status.pop(key, None)
    if generation is not None:
        status["observedGeneration"] = generation
    return status


def is_fixable(status: Optional[dict[str, Any]]) -> bool:
    return bool(status) and status.get("phase") in ("Failed", "Invalid")
