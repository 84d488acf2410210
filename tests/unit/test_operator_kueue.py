"""The Queued condition from Kueue's Workload of a child, the child refusals (API not served, TrainJob runtime
missing, other admission refusals) and the handlers that write them (pure functions; the shells on a fake Kube).

The Workload documents are in the form Kueue v0.17.0 writes them (kueue.x-k8s.io/v1beta2), as seen on the
dev cluster: a pending one carries QuotaReserved False (reason Pending, the flavor assigner's message), an
admitted one QuotaReserved and Admitted True with status.admission.clusterQueue.
"""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace
from typing import Any

import pytest

from qwen_operator import handlers
from qwen_operator import render as r
from qwen_operator import conditions as cnd
from qwen_operator import kueue_status
from qwen_operator.api import GROUP, KIND, VERSION

from .test_operator_render import resource

NOW = "2026-07-01T12:00:00Z"
T0 = "2026-07-01T11:59:00Z"
NO_QUOTA = ("couldn't assign flavors to pod set node: insufficient unused quota for nvidia.com/gpu in flavor "
            "default, 8 more needed")


def workload(*conditions: dict[str, Any], cq: str = "", kind: str = "TrainJob", child: str = "second",
             queue: str = "lq") -> dict[str, Any]:
    status: dict[str, Any] = {"conditions": list(conditions)}
    if cq:
        status["admission"] = {"clusterQueue": cq, "podSetAssignments": [{"name": "node", "count": 1}]}
    return {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "Workload",
            "metadata": {"name": f"{kind.lower()}-{child}-62154", "namespace": "team-a",
                         "labels": {"kueue.x-k8s.io/job-uid": "c-uid"},
                         "ownerReferences": [{"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": kind,
                                              "name": child, "uid": "c-uid", "controller": True}]},
            "spec": {"queueName": queue}, "status": status}


def cond(type_: str, status: str, reason: str, message: str = "") -> dict[str, Any]:
    return {"type": type_, "status": status, "reason": reason, "message": message, "lastTransitionTime": T0}


PENDING = cond("QuotaReserved", "False", "Pending", NO_QUOTA)
INADMISSIBLE = cond("QuotaReserved", "False", "Inadmissible", "LocalQueue lq doesn't exist")
RESERVED = cond("QuotaReserved", "True", "QuotaReserved", "Quota reserved in ClusterQueue cq")
ADMITTED = cond("Admitted", "True", "Admitted", "The workload is admitted")
NOT_ADMITTED = cond("Admitted", "False", "NoReservation", "waiting for the provisioning request")
BY_HIGH = ("Preempted to accommodate a workload (UID: 0f3c2a1e-aaaa-bbbb-cccc-000000000001, JobUID: "
           "9d1e5c7a-aaaa-bbbb-cccc-000000000002) due to prioritization in the ClusterQueue; preemptor path: /cq; "
           "preemptee path: /cq")
EVICTED = cond("Evicted", "True", "Preempted", BY_HIGH)
PREEMPTED = cond("Preempted", "True", "InClusterQueue", BY_HIGH)
TIMED_OUT = cond("Evicted", "True", "PodsReadyTimeout", "Exceeded the PodsReady timeout default/low")
FINISHED = cond("Finished", "True", "Succeeded", "jobset completed successfully")


@pytest.mark.parametrize("doc,expected", [
    (workload(), ("True", kueue_status.QUEUE_PENDING, "waiting in LocalQueue lq for Kueue to admit it")),
    (workload(PENDING), ("True", kueue_status.WAITING_FOR_QUOTA, "waiting for quota in LocalQueue lq: " + NO_QUOTA)),
    (workload(INADMISSIBLE), ("True", kueue_status.INADMISSIBLE, "not admissible in LocalQueue lq: LocalQueue lq doesn't exist")),
    (workload(RESERVED, NOT_ADMITTED, cq="cq"), ("True", kueue_status.WAITING_FOR_CHECKS,
                                                 "quota reserved in ClusterQueue cq; waiting for the provisioning")),
    (workload(RESERVED, ADMITTED, cq="cq"), ("False", kueue_status.ADMITTED, "admitted by ClusterQueue cq")),
    (workload(RESERVED, ADMITTED, FINISHED, cq="cq"), ("False", kueue_status.ADMITTED, "admitted by ClusterQueue cq")),
    (workload(cond("QuotaReserved", "False", "Pending", "Preempted"), EVICTED, PREEMPTED),
     ("True", kueue_status.PREEMPTED, "Kueue preempted workload trainjob-second-62154: Preempted to accommodate a workload")),
    # Being preempted: Evicted is set before Kueue suspends the job and releases the quota.
    (workload(RESERVED, ADMITTED, EVICTED, PREEMPTED, cq="cq"),
     ("True", kueue_status.PREEMPTED, "Kueue preempted workload trainjob-second-62154: Preempted to accommodate a workload")),
    # Preempted, and the scheduler's later attempts find no quota: still Preempted until admitted again.
    (workload(PENDING, EVICTED, PREEMPTED), ("True", kueue_status.PREEMPTED, "Kueue preempted workload trainjob-second-62154")),
    # Admitted again: Kueue turned Evicted and Preempted False.
    (workload(RESERVED, ADMITTED, cond("Evicted", "False", "QuotaReserved", "Previously: " + BY_HIGH),
              cond("Preempted", "False", "QuotaReserved", "Previously: " + BY_HIGH), cq="cq"),
     ("False", kueue_status.ADMITTED, "admitted by ClusterQueue cq")),
    (workload(cond("QuotaReserved", "False", "Pending", "Evicted"), TIMED_OUT),
     ("True", kueue_status.EVICTED, "Kueue evicted workload trainjob-second-62154 (PodsReadyTimeout): Exceeded the PodsReady")),
], ids=["no-report-yet", "waiting-for-quota", "inadmissible", "admission-checks", "admitted", "finished", "preempted",
        "being-preempted", "preempted-still-no-quota", "admitted-again", "evicted-other-reason"])
def test_workload_maps_to_queued(doc, expected):
    status, reason, message = kueue_status.workload_queued(doc)
    assert (status, reason) == expected[:2]
    assert message.startswith(expected[2]), message
    assert "trainjob-second-62154" in message  # the Workload to `kubectl describe`


def test_preempted_names_the_preemptor_where_known_and_keeps_the_kueue_words():
    doc = workload(RESERVED, ADMITTED, EVICTED, PREEMPTED, cq="cq")
    assert kueue_status.preemptor_job_uid(doc) == "9d1e5c7a-aaaa-bbbb-cccc-000000000002"
    status, reason, message = kueue_status.workload_queued(doc, preemptor="high")
    assert (status, reason) == ("True", kueue_status.PREEMPTED)
    assert message.startswith("Kueue preempted workload trainjob-second-62154 to admit QwenTrainingJob high: " + BY_HIGH)
    assert message.endswith("the job is suspended and waits in LocalQueue lq to be admitted again")
    assert kueue_status.preemptor_job_uid(workload(PENDING)) is None
    assert kueue_status.preemptor_job_uid(workload(RESERVED, ADMITTED, cond("Evicted", "False", "QuotaReserved",
                                                                   "Previously: " + BY_HIGH), cq="cq")) is None
    before = cnd.from_workload(cnd.reconciled(None, 1, T0, pytorch_job="second"), workload(RESERVED, ADMITTED, cq="cq"),
                              1, T0)
    s = cnd.from_workload(before, doc, 1, NOW, preemptor="high")
    assert s["phase"] == "Queued" and cnd.get_condition(s, cnd.QUEUED)["lastTransitionTime"] == NOW
    summary = cnd.get_condition(s, "Succeeded")
    assert summary["status"] == "Unknown" and "to admit QwenTrainingJob high" in summary["message"]


def test_waiting_for_quota_is_the_phase_and_the_summary():
    before = cnd.reconciled(None, 1, T0, pytorch_job="second", config_map="second-spec")
    before = cnd.from_trainjob({"metadata": {"name": "second", "creationTimestamp": T0},
                               "spec": {"suspend": True},
                               "status": {"conditions": [cond("Suspended", "True", "Suspended", "TrainJob is suspended")]}},
                              before, 1, T0)
    assert before["phase"] == "Suspended"
    s = cnd.from_workload(before, workload(PENDING), 1, NOW)
    q = cnd.get_condition(s, cnd.QUEUED)
    assert s["phase"] == "Queued" and q["status"] == "True" and q["reason"] == kueue_status.WAITING_FOR_QUOTA
    assert q["lastTransitionTime"] == NOW and q["observedGeneration"] == 1
    summary = cnd.get_condition(s, "Succeeded")
    assert summary["status"] == "Unknown" and summary["reason"] == "Queued" and NO_QUOTA in summary["message"]
    # The child's own Suspended stays mirrored; Queued says why.
    assert cnd.get_condition(s, "Suspended")["status"] == "True"
    assert [c["type"] for c in s["conditions"]][:2] == ["Created", "Queued"]
    # The same report again writes nothing.
    assert cnd.from_workload(s, workload(PENDING), 1, NOW) is None

    # Admitted: Queued False, the phase follows the child again, the transition time moves.
    admitted = cnd.from_workload(s, workload(RESERVED, ADMITTED, cq="cq"), 1, "2026-07-01T12:05:00Z")
    q = cnd.get_condition(admitted, cnd.QUEUED)
    assert q["status"] == "False" and q["reason"] == kueue_status.ADMITTED and q["lastTransitionTime"] == "2026-07-01T12:05:00Z"
    assert admitted["phase"] == "Suspended"  # until the Trainer resumes the TrainJob
    running = cnd.from_trainjob({"metadata": {"name": "second", "creationTimestamp": T0}, "spec": {"suspend": False},
                                "status": {"conditions": [cond("Suspended", "False", "Resumed", "resumed")],
                                           "jobsStatus": [{"name": "node", "active": 1, "ready": 1}]}},
                               admitted, 1, NOW)
    assert running["phase"] == "Running" and cnd.get_condition(running, cnd.QUEUED)["status"] == "False"


def test_pytorchjob_child_mirroring_keeps_the_queued_condition():
    s = cnd.from_workload(cnd.reconciled(None, 1, T0, pytorch_job="second"), workload(PENDING, kind="PyTorchJob"), 1, NOW)
    pj = {"conditions": [cond("Created", "True", "PyTorchJobCreated", "created"),
                         cond("Suspended", "True", "PyTorchJobSuspended", "PyTorchJob second is suspended.")]}
    mirrored = cnd.from_child(pj, s, 1, NOW)
    assert mirrored["phase"] == "Queued" and cnd.get_condition(mirrored, cnd.QUEUED)["reason"] == kueue_status.WAITING_FOR_QUOTA


def test_terminal_resources_do_not_change_on_workload_reports():
    done = {"phase": "Succeeded", "conditions": [cond("Succeeded", "True", "AllJobsCompleted")]}
    assert cnd.from_workload(done, workload(PENDING), 1, NOW) is None


def test_the_guess_at_creation_never_replaces_a_workload_report():
    reported = cnd.from_workload(cnd.reconciled(None, 1, T0), workload(PENDING), 1, T0)
    guess = kueue_status.queue_pending("TrainJob", "second", "lq", "spec.scheduling.queueName")
    assert cnd.queued(reported, guess, 1, NOW, initial=True) is None
    fresh = cnd.queued(cnd.reconciled(None, 1, T0), guess, 1, NOW, initial=True)
    q = cnd.get_condition(fresh, cnd.QUEUED)
    assert q["reason"] == kueue_status.QUEUE_PENDING and "spec.scheduling.queueName" in q["message"]
    assert "integration for TrainJob may be off" in q["message"]


def test_kueue_not_installed_names_the_field_and_replaces_any_guess():
    missing = kueue_status.kueue_not_installed("PyTorchJob", "j", "lq", "metadata.labels[kueue.x-k8s.io/queue-name]")
    assert missing[:2] == ("True", kueue_status.KUEUE_NOT_INSTALLED)
    assert missing[2].startswith("metadata.labels[kueue.x-k8s.io/queue-name] names the Kueue queue 'lq' but Kueue "
                                 "is not installed")
    assert "PyTorchJob j stays suspended" in missing[2]
    pending = cnd.queued(cnd.reconciled(None, 1, T0), kueue_status.queue_pending("PyTorchJob", "j", "lq", "x"), 1, T0)
    s = cnd.queued(pending, missing, 1, NOW, initial=True)
    assert s["phase"] == "Queued" and cnd.get_condition(s, "Succeeded")["message"] == missing[2]
    # Kueue installed later (the operator restarted): the creation guess replaces the complaint.
    again = cnd.queued(s, kueue_status.queue_pending("PyTorchJob", "j", "lq", "x"), 1, NOW, initial=True)
    assert cnd.get_condition(again, cnd.QUEUED)["reason"] == kueue_status.QUEUE_PENDING


@pytest.mark.parametrize("labels,spec,field", [
    ({}, {"queueName": "lq"}, "spec.scheduling.queueName"),
    ({r.KUEUE_QUEUE_LABEL: "lq"}, {}, "metadata.labels[kueue.x-k8s.io/queue-name]"),
])
def test_queue_of_names_the_field_that_set_it(labels, spec, field):
    res = resource(scheduling=spec) if spec else resource()
    res["metadata"]["labels"] = labels
    parsed, _ = r.render_step(res, 0, 0)
    assert r.queue_of(res, parsed) == ("lq", field)
    assert r.queue_of(resource(), r.render_step(resource(), 0, 0)[0]) is None


# ------------------------------------------------------------------------------------- child refused
# The refusal of Trainer v2.3.0's TrainJob webhook, as the dev cluster's API server returns it.

RUNTIME_REFUSAL = json.dumps({
    "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403,
    "message": 'admission webhook "validator.trainjob.trainer.kubeflow.org" denied the request: spec.RuntimeRef: '
               'Invalid value: {"name":"nope","apiGroup":"trainer.kubeflow.org","kind":"ClusterTrainingRuntime"}: '
               'ClusterTrainingRuntime.trainer.kubeflow.org "nope" not found: '
               "specified clusterTrainingRuntime must be created before the TrainJob is created"})
NOT_FOUND = json.dumps({"kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404,
                        "message": "the server could not find the requested resource"})


def test_trainjob_api_not_served():
    reason, message = cnd.child_refused("TrainJob", "j", 404, NOT_FOUND, api_served=False, job_api_setting="trainjob")
    assert reason == cnd.JOB_API_NOT_INSTALLED
    assert "does not serve trainjobs.trainer.kubeflow.org/v1alpha1 (Kubeflow Trainer v2)" in message
    assert "--job-api pytorchjob" in message and "jobApi" in message
    reason, message = cnd.child_refused("PyTorchJob", "j", 404, NOT_FOUND, api_served=False)
    assert reason == cnd.JOB_API_NOT_INSTALLED and "pytorchjobs.kubeflow.org/v1" in message
    # A 404 while the API is served is not about the child (e.g. the namespace is going away): retried as is.
    assert cnd.child_refused("TrainJob", "j", 404, NOT_FOUND, api_served=True) is None


def test_trainjob_runtime_missing_names_the_setting_and_quotes_the_server():
    reason, message = cnd.child_refused("TrainJob", "j", 403, RUNTIME_REFUSAL, api_served=True, runtime="nope")
    assert reason == cnd.RUNTIME_NOT_FOUND
    assert message.startswith("TrainJob j was refused: its ClusterTrainingRuntime 'nope' (operator setting "
                              "--trainjob-runtime, chart value trainJob.runtime.name) does not exist")
    assert 'ClusterTrainingRuntime.trainer.kubeflow.org "nope" not found' in message
    assert "Traceback" not in message and '"kind":"Status"' not in message  # the server's words, not its envelope


def test_trainjob_runtime_missing_in_kueues_words():
    body = json.dumps({"kind": "Status", "status": "Failure", "reason": "Forbidden", "code": 403,
                       "message": 'admission webhook "vtrainjob.kb.io" denied the request: runtime \'nope\' not found'})
    reason, message = cnd.child_refused("TrainJob", "j", 403, body, api_served=True, runtime="nope")
    assert reason == cnd.RUNTIME_NOT_FOUND and message.endswith("runtime 'nope' not found")
    # Another runtime's absence is not this one's.
    assert cnd.child_refused("TrainJob", "j", 403, body, api_served=True, runtime="other")[0] == cnd.CHILD_REJECTED


def test_other_refusals_and_server_errors():
    body = json.dumps({"kind": "Status", "message": 'admission webhook "x" denied the request: no'})
    assert cnd.child_refused("PyTorchJob", "j", 422, body, api_served=True) == (
        cnd.CHILD_REJECTED, 'PyTorchJob j was refused by the API server: admission webhook "x" denied the request: no')
    assert cnd.child_refused("PyTorchJob", "j", 500, "boom", api_served=True) is None
    assert cnd.child_refused("PyTorchJob", "j", 409, "exists", api_served=True) is None


def test_not_created_then_created():
    s = cnd.not_created(cnd.reconciled(None, 1, T0), cnd.RUNTIME_NOT_FOUND, "no runtime", 1, NOW)
    created = cnd.get_condition(s, "Created")
    assert s["phase"] == "Pending" and created["status"] == "False" and created["reason"] == cnd.RUNTIME_NOT_FOUND
    assert cnd.get_condition(s, "Succeeded")["message"] == "no runtime"
    # The child exists after a later attempt: the refusal is gone, the child's watch reports from here on.
    after = cnd.reconciled(s, 1, NOW, pytorch_job="j", config_map="j-spec")
    assert cnd.get_condition(after, "Created")["reason"] == "NotCreated"
    assert cnd.get_condition(after, "Succeeded")["message"] == ""


# ------------------------------------------------------------------------------------------- shells

class FakeKube:
    """What the handlers call, answering from memory (no API server)."""

    def __init__(self, status: dict[str, Any] | None = None, served: bool = True, owner: tuple | None = ("j", "u1")):
        self.resource = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
                         "metadata": {"name": "j", "namespace": "team-a", "uid": "u1", "generation": 1,
                                      "resourceVersion": "5"}, "spec": {}, "status": status or {}}
        self.served, self.owner = served, owner
        self.owners: dict[str, Any] = {}
        self.computed: list[dict[str, Any]] = []
        self.cache: dict = {}

    def update_status(self, namespace, name, compute, **_: Any):
        new = compute(self.resource)
        if new is not None:
            self.computed.append(new)
            self.resource["status"] = new
        return new

    def owner_of_child(self, kind, namespace, name, uid):
        return self.owner

    def owner_of_child_uid(self, kind, namespace, uid):
        return self.owners.get(uid)

    def api_served(self, *a: Any, **kw: Any) -> bool:
        return self.served


@pytest.fixture
def posted(monkeypatch):
    out: list[tuple[str, str, str]] = []
    monkeypatch.setattr(handlers.kopf, "event", lambda obj, type, reason, message: out.append((type, reason, message)))
    monkeypatch.setattr(handlers.kopf, "warn", lambda obj, reason, message: out.append(("Warning", reason, message)))
    return out


def send(kube: FakeKube, doc: dict[str, Any], job_api: str = "trainjob", monkeypatch=None, kind="ADDED") -> None:
    handlers.workload_event(event={"type": kind, "object": doc}, body=doc, memo=SimpleNamespace(kube=kube),
                            logger=logging.getLogger("test"))


def test_workload_watch_writes_queued_and_posts_events(monkeypatch, posted):
    monkeypatch.setattr(handlers.CONFIG, "job_api", "trainjob")
    kube = FakeKube({"pytorchJob": "second", "phase": "Suspended"})
    send(kube, workload(PENDING))
    assert kube.resource["status"]["phase"] == "Queued"
    assert posted == [("Normal", "Queued", cnd.get_condition(kube.resource["status"], cnd.QUEUED)["message"])]
    send(kube, workload(PENDING))  # unchanged: nothing written, nothing posted
    assert len(kube.computed) == 1 and len(posted) == 1
    send(kube, workload(RESERVED, ADMITTED, cq="cq"))
    assert posted[-1][:2] == ("Normal", "Admitted") and "ClusterQueue cq" in posted[-1][2]


def test_a_preempted_workload_is_one_warning_naming_the_preemptor_then_admitted_again(monkeypatch, posted):
    monkeypatch.setattr(handlers.CONFIG, "job_api", "trainjob")
    kube = FakeKube({"pytorchJob": "second", "phase": "Running"})
    send(kube, workload(RESERVED, ADMITTED, cq="cq"))
    kube.owners["9d1e5c7a-aaaa-bbbb-cccc-000000000002"] = ("high", "u2")  # the preemptor's child -> resource
    send(kube, workload(RESERVED, ADMITTED, EVICTED, PREEMPTED, cq="cq"))
    q = cnd.get_condition(kube.resource["status"], cnd.QUEUED)
    assert (q["status"], q["reason"]) == ("True", kueue_status.PREEMPTED) and "to admit QwenTrainingJob high" in q["message"]
    assert posted[-1] == ("Warning", kueue_status.PREEMPTED, q["message"])
    n = len(posted)
    send(kube, workload(cond("QuotaReserved", "False", "Pending", "Preempted"), EVICTED, PREEMPTED))
    send(kube, workload(PENDING, EVICTED, PREEMPTED))  # still waiting: no second event
    assert len(posted) == n and kube.resource["status"]["phase"] == "Queued"
    send(kube, workload(RESERVED, ADMITTED, cond("Evicted", "False", "QuotaReserved", "Previously: " + BY_HIGH),
                        cq="cq"))
    assert posted[-1][:2] == ("Normal", "Admitted") and len(posted) == n + 1


def test_workload_watch_ignores_other_kinds_old_steps_and_deleted_workloads(monkeypatch, posted):
    monkeypatch.setattr(handlers.CONFIG, "job_api", "trainjob")
    kube = FakeKube({"pytorchJob": "j-export", "stages": [{"name": "convert", "pytorchJob": "second"}]})
    send(kube, workload(PENDING))  # the workload of a finished step's child
    assert kube.computed == []
    send(FakeKube(), workload(PENDING, kind="PyTorchJob"))  # not the chosen API's child
    assert posted == []
    kube = FakeKube({"pytorchJob": "second"}, owner=None)  # a child that is not ours
    send(kube, workload(PENDING))
    assert kube.computed == []
    kube = FakeKube({"pytorchJob": "second"})
    kube.owners["c-uid"] = ("j", "u1")
    send(kube, workload(PENDING), kind="DELETED")
    assert kube.owners == {} and kube.computed == []
    # An inadmissible workload (e.g. the LocalQueue does not exist) is a Warning.
    kube = FakeKube({"pytorchJob": "second"})
    send(kube, workload(INADMISSIBLE))
    assert posted[-1][:2] == ("Warning", kueue_status.INADMISSIBLE)
