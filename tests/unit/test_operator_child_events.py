"""The PyTorchJob watch handler writes the resource's status only when the child has something to mirror."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

from qwen_operator import handlers
from qwen_operator.api import GROUP, KIND, VERSION


class FakeKube:
    def __init__(self, resource: dict[str, Any]):
        self.resource = resource
        self.computed: list[dict[str, Any]] = []

    def update_status(self, namespace, name, compute, **_: Any):
        new = compute(self.resource)
        if new is not None:
            self.computed.append(new)
        return new


def child(status: dict[str, Any] | None, generation: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
        "metadata": {"name": "j-convert", "namespace": "ns", "generation": generation,
                     "ownerReferences": [{"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "name": "j",
                                          "uid": "u1", "controller": True}]},
        **({"status": status} if status is not None else {}),
    }


def resource() -> dict[str, Any]:
    return {"metadata": {"name": "j", "namespace": "ns", "uid": "u1", "generation": 1, "resourceVersion": "5"},
            "spec": {}, "status": {}}


def run(body: dict[str, Any]) -> FakeKube:
    kube = FakeKube(resource())
    handlers.pytorchjob_event(event={"type": "ADDED", "object": body}, body=body, memo=SimpleNamespace(kube=kube),
                              logger=logging.getLogger("test"))
    return kube


def test_a_child_without_status_writes_nothing():
    # The reconcile that created it writes the status next; a write here would only race that one.
    assert run(child(None)).computed == []
    assert run(child({})).computed == []


def test_a_child_with_conditions_is_mirrored():
    created = {"conditions": [{"type": "Created", "status": "True", "reason": "PyTorchJobCreated",
                               "message": "created", "lastTransitionTime": "2025-01-01T00:00:00Z"}]}
    [status] = run(child(created)).computed
    assert status["phase"] == "Created" and status["pytorchJob"] == "j-convert"
