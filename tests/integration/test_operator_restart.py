"""Killing the operator at any point and starting it again converges: no duplicate or orphaned children,
correct final state. Every case runs with both job APIs (PyTorchJob, TrainJob)."""

from __future__ import annotations

import time

import pytest

from tests.integration.operator_support import (  # noqa: F401  (crds, jobs are fixtures)
    OperatorProcess, both_apis, crds, jobs, operator_args, tiny_job, wait_for,
)

pytestmark = both_apis


@pytest.fixture
def start(request, cluster, crds, namespace, tmp_path, job_api):
    procs = []

    def _start(name="operator", env=None, wait=True):
        op = OperatorProcess(cluster.kubeconfig, tmp_path, "--namespace", namespace, "--standalone",
                             *operator_args(job_api, request), name=name, env=env)
        procs.append(op.start())
        if wait:
            op.wait_ready()
        return op

    yield _start
    for op in procs:
        op.stop()


def assert_single_children(jobs, names):
    pjs = jobs.children()
    cms = jobs.configmaps()
    assert sorted(p["metadata"]["name"] for p in pjs) == sorted(names)
    assert sorted(c.metadata.name for c in cms) == sorted(f"{n}-spec" for n in names)
    for name in names:
        uid = jobs.get(name)["metadata"]["uid"]
        pj = next(p for p in pjs if p["metadata"]["name"] == name)
        cm = next(c for c in cms if c.metadata.name == f"{name}-spec")
        assert [r["uid"] for r in pj["metadata"]["ownerReferences"]] == [uid]
        assert [r.uid for r in cm.metadata.owner_references] == [uid]


def test_killed_between_configmap_and_child(cluster, jobs, namespace, start):
    crashing = start("crashing", env={"QWEN_OPERATOR_FAILPOINT": "after-configmap"})
    jobs.create(tiny_job("half", namespace))
    wait_for(lambda: not crashing.alive(), 30, what="operator to crash at the failpoint")
    assert crashing.proc.returncode == 70
    assert [c.metadata.name for c in jobs.configmaps()] == ["half-spec"]
    assert jobs.children() == []

    start("restarted")
    jobs.wait_phase("half", "Running", 60)
    assert_single_children(jobs, ["half"])
    cluster.set_pod_outcome(namespace, "training.qwen.dev/job=half", "succeed", delay="1s")
    jobs.wait_phase("half", "Succeeded", 60)


def test_killed_after_child_before_status(cluster, jobs, namespace, start):
    crashing = start("crashing", env={"QWEN_OPERATOR_FAILPOINT": f"after-{jobs.child_api.kind.lower()}"})
    jobs.create(tiny_job("nostatus", namespace))
    wait_for(lambda: not crashing.alive(), 30, what="operator to crash at the failpoint")
    assert len(jobs.children()) == 1 and not (jobs.get("nostatus").get("status") or {}).get("pytorchJob")

    start("restarted")
    jobs.wait_phase("nostatus", "Running", 60)
    assert jobs.get("nostatus")["status"]["pytorchJob"] == "nostatus"
    # The child's events can report Running before the restarted create handler has looked at the child; the
    # handler then adopts it and marks the resource Synced.
    wait_for(lambda: jobs.condition("nostatus", "Synced").get("status") == "True", 30,
             what="the existing child to be adopted (Synced=True)")
    assert_single_children(jobs, ["nostatus"])


def test_sigkill_during_a_burst_then_restart_converges(cluster, jobs, namespace, start):
    first = start("first")
    names = [f"burst-{i}" for i in range(20)]
    for name in names:
        jobs.create(tiny_job(name, namespace))
    time.sleep(0.5)
    first.kill()
    start("second")
    for name in names:
        jobs.wait_phase(name, "Running", 90)
    assert_single_children(jobs, names)


def test_changes_while_down_are_applied_on_restart(cluster, jobs, namespace, start):
    op = start("first")
    jobs.create(tiny_job("later", namespace))
    jobs.wait_phase("later", "Running", 60)
    op.stop()
    jobs.patch("later", {"spec": {"suspend": True}})
    start("second")
    wait_for(lambda: jobs.child_suspended("later") is True, 30, what="suspend applied")
    jobs.wait_phase("later", "Suspended", 60)
    assert_single_children(jobs, ["later"])
