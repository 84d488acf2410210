"""Fixtures for tests that need the local control plane (``qwen_devcluster``).

The ``cluster`` fixture starts etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
kwok and the Kubeflow training-operator once per session. Binaries come from
``tools/build-controlplane.sh``'s cache (``QWEN_K8S_BIN_DIR`` overrides). If they are missing:

* with ``QWEN_REQUIRE_CLUSTER`` set (CI), the build script is run and any failure fails the tests;
* otherwise the tests are skipped, saying how to build them.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path

import pytest

_TOOLS = Path(__file__).resolve().parents[2] / "tools"
if str(_TOOLS) not in sys.path:
    sys.path.insert(0, str(_TOOLS))

import qwen_devcluster  # noqa: E402
from qwen_devcluster import BinariesMissing  # noqa: E402


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


def _required() -> bool:
    return os.environ.get("QWEN_REQUIRE_CLUSTER", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="session")
def cluster():
    try:
        bins = qwen_devcluster.bin_dir()
        gone = qwen_devcluster.missing(bins)
    except BinariesMissing as e:
        if _required():
            pytest.fail(f"QWEN_REQUIRE_CLUSTER is set but the control plane cannot be located: {e}")
        pytest.skip(f"control plane not available: {e}")
    if gone:
        if not _required():
            pytest.skip(f"control-plane binaries not built (missing in {bins}: {', '.join(gone)}); "
                        "run tools/build-controlplane.sh, or set QWEN_REQUIRE_CLUSTER=1 to build them here")
        try:
            bins = qwen_devcluster.ensure_built()
        except BinariesMissing as e:
            pytest.fail(f"QWEN_REQUIRE_CLUSTER is set and building the control plane failed: {e}")
    state_dir = os.environ.get("QWEN_DEVCLUSTER_STATE_DIR") or None
    c = qwen_devcluster.start_cluster(state_dir, bins)
    m = c.measure()
    print(f"\nqwen_devcluster: up in {m['startup_s']}s, {m['total_rss_mib']} MiB RSS, logs in {c.logs_dir}")
    try:
        yield c
    finally:
        c.stop(keep_logs=bool(os.environ.get("QWEN_DEVCLUSTER_KEEP_LOGS")))


@pytest.fixture(scope="session")
def kube_client(cluster):
    """A ``kubernetes.client.ApiClient`` logged in as admin."""
    kubernetes = pytest.importorskip("kubernetes")
    client = kubernetes.config.new_client_from_config(config_file=str(cluster.kubeconfig))
    yield client
    client.close()


@pytest.fixture
def namespace(kube_client):
    """A fresh namespace (with its default ServiceAccount), deleted afterwards."""
    from kubernetes import client as k

    core = k.CoreV1Api(kube_client)
    name = f"t-{uuid.uuid4().hex[:8]}"
    core.create_namespace(k.V1Namespace(metadata=k.V1ObjectMeta(name=name)))
    deadline = time.monotonic() + 30
    while True:
        try:
            core.read_namespaced_service_account("default", name)
            break
        except k.ApiException as e:
            if e.status != 404 or time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    yield name
    core.delete_namespace(name)
