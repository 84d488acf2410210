"""Fixtures for end-to-end tests against an existing cluster (kind, or any cluster you point at).

The tests use whatever ``KUBECONFIG`` they are given and never start a cluster themselves. They
are skipped unless ``QWEN_E2E`` is set, so a plain ``pytest`` run never touches a cluster by
accident. ``tools/kind-e2e.sh`` sets everything up and runs them.
"""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config, items):
    from pathlib import Path

    here = Path(__file__).parent
    skip = None
    if not os.environ.get("QWEN_E2E"):
        skip = pytest.mark.skip(reason="e2e tests run only with QWEN_E2E=1 and a KUBECONFIG (see tests/e2e/README.md)")
    for item in items:
        if here in Path(str(item.fspath)).parents and skip is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def kube_client():
    kubernetes = pytest.importorskip("kubernetes")
    client = kubernetes.config.new_client_from_config(config_file=os.environ.get("KUBECONFIG"))
    yield client
    client.close()


@pytest.fixture(scope="session")
def chart_namespace() -> str:
    return os.environ.get("QWEN_E2E_NAMESPACE", "qwen-system")
