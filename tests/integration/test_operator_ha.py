"""Two operator replicas against the real API server with kopf peering: only the highest priority one acts;
when it goes away the other takes over."""

from __future__ import annotations

import pytest
from kubernetes import client as k

from qwen_operator.peering import peering_object
from tests.integration.operator_support import Jobs, OperatorProcess, install_crds, tiny_job, wait_for


@pytest.fixture(scope="module")
def crds(kube_client):
    install_crds(kube_client)
    return kube_client


def test_only_the_leader_acts_and_the_follower_takes_over(cluster, crds, namespace, tmp_path):
    custom = k.CustomObjectsApi(crds)
    body = peering_object("qwen-operator", namespace)
    custom.create_namespaced_custom_object("kopf.dev", "v1", namespace, "kopfpeerings", body)
    common = ("--namespace", namespace, "--peering", "qwen-operator", "--peering-lifetime", "10")
    leader = OperatorProcess(cluster.kubeconfig, tmp_path, *common, "--priority", "200", name="leader").start()
    follower = OperatorProcess(cluster.kubeconfig, tmp_path, *common, "--priority", "100", name="follower")
    jobs = Jobs(crds, namespace)
    try:
        # Started one after the other, as a rolling Deployment does: two replicas started within the same
        # instant were once seen both resuming (kopf read the peering object before either keep-alive landed).
        leader.wait_ready()
        follower.start().wait_serving()
        wait_for(lambda: follower.get("/readyz")[0] == 503, 30, what="follower paused (not ready)")
        assert leader.ready()

        jobs.create(tiny_job("ha-one", namespace))
        jobs.wait_phase("ha-one", "Running", 60)
        assert len(jobs.pytorchjobs()) == 1
        assert "ha-one" in leader.output()
        assert "ha-one" not in follower.output()
        assert 'qwen_operator_reconciles_total{handler="reconcile",result="ok"}' not in follower.metrics()

        leader.kill()  # a crash: the follower resumes once the leader's keep-alive expires
        wait_for(follower.ready, 60, what="follower resumes")
        jobs.create(tiny_job("ha-two", namespace))
        jobs.wait_phase("ha-two", "Running", 60)
        assert "ha-two" in follower.output()
        assert sorted(p["metadata"]["name"] for p in jobs.pytorchjobs()) == ["ha-one", "ha-two"]
    finally:
        leader.stop()
        follower.stop()
        print("--- leader\n", leader.output()[-2000:], "\n--- follower\n", follower.output()[-2000:])
