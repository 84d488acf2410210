"""The cluster an e2e run is pointed at has what the operator needs."""

from __future__ import annotations

import pytest

k = pytest.importorskip("kubernetes.client")


def test_pytorchjob_crd_is_established(kube_client):
    crd = k.ApiextensionsV1Api(kube_client).read_custom_resource_definition("pytorchjobs.kubeflow.org")
    assert any(c.type == "Established" and c.status == "True" for c in crd.status.conditions)


def test_training_operator_is_available(kube_client):
    dep = k.AppsV1Api(kube_client).read_namespaced_deployment("training-operator", "kubeflow")
    assert (dep.status.available_replicas or 0) >= 1


def test_qwen_operator_is_available(kube_client, chart_namespace):
    deps = k.AppsV1Api(kube_client).list_namespaced_deployment(chart_namespace).items
    assert deps, f"no Deployment in {chart_namespace}; was the chart installed?"
    for d in deps:
        assert (d.status.available_replicas or 0) >= 1, d.metadata.name
