"""Fixtures for tests that need the local control plane (``qwen_devcluster``).

The ``cluster`` fixture starts etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
kwok and the Kubeflow training-operator once per session. Binaries come from
``tools/build-controlplane.sh``'s cache (``QWEN_K8S_BIN_DIR`` overrides). If they are missing:

* with ``QWEN_REQUIRE_CLUSTER`` set (CI), the build script is run and any failure fails the tests;
* otherwise the tests are skipped, saying how to build them.

The opt-in controllers (JobSet, Kubeflow Trainer v2, Kueue) start with it too: those named in
``QWEN_CONTROLPLANE_EXTRAS`` (``make test`` names all three), else every one that is built. Tests
that need one (the ``trainjob`` job API, Kueue) skip without it, except that with
``QWEN_REQUIRE_CLUSTER`` set an extra named in ``QWEN_CONTROLPLANE_EXTRAS`` is built here and its
absence fails, as the control plane's does.

``job_api`` is ``pytorchjob`` unless a test is parametrised over ``JOB_APIS`` (indirectly); for
``trainjob`` it needs the JobSet and Trainer v2 controllers and installs the test runtimes.
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
from qwen_devcluster import extras as extras_mod  # noqa: E402

JOB_APIS = ("pytorchjob", "trainjob")
TRAINJOB_EXTRAS = ("jobset", "trainer-v2")  # Trainer v2 runs each TrainJob as a JobSet


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


def _required() -> bool:
    return os.environ.get("QWEN_REQUIRE_CLUSTER", "").strip().lower() not in ("", "0", "false", "no")


def requested_extras() -> list[str]:
    """The extras named in QWEN_CONTROLPLANE_EXTRAS (what `make test` asks for and builds)."""
    named = os.environ.get("QWEN_CONTROLPLANE_EXTRAS", "").replace(",", " ").split()
    return extras_mod.order([e for e in named if e])


def built_extras(bins: Path) -> list[str]:
    assets = qwen_devcluster.binaries.assets_dir(bins)
    return [e for e in extras_mod.EXTRAS if not extras_mod.missing(assets, [e])]


def need_extras(c, *names: str) -> None:
    """Skip (or, where they were asked for under QWEN_REQUIRE_CLUSTER, fail) unless the cluster runs these extras."""
    gone = [e for e in names if e not in getattr(c, "extras", [])]
    if not gone:
        return
    if _required() and set(gone) & set(requested_extras()):
        pytest.fail(f"QWEN_CONTROLPLANE_EXTRAS asks for {', '.join(gone)} but the cluster does not run them")
    pytest.skip(f"extra controller(s) not built: {', '.join(gone)} (run tools/build-controlplane.sh --with-extras)")


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
    requested = requested_extras()
    if requested and _required() and [e for e in requested if e not in built_extras(bins)]:
        try:
            bins = qwen_devcluster.ensure_built()  # the build script builds what QWEN_CONTROLPLANE_EXTRAS names
        except BinariesMissing as e:
            pytest.fail(f"QWEN_REQUIRE_CLUSTER is set and building the extras {requested} failed: {e}")
        gone = [e for e in requested if e not in built_extras(bins)]
        if gone:
            pytest.fail(f"QWEN_CONTROLPLANE_EXTRAS asks for {', '.join(gone)}, still missing after the build")
    extras = [e for e in (requested or list(extras_mod.EXTRAS)) if e in built_extras(bins)]
    if "jobset" not in extras:
        extras = [e for e in extras if e != "trainer-v2"]
    state_dir = os.environ.get("QWEN_DEVCLUSTER_STATE_DIR") or None
    c = qwen_devcluster.start_cluster(state_dir, bins, extras=extras, timeout=180 if extras else 90)
    c.extras = extras
    m = c.measure()
    print(f"\nqwen_devcluster: up in {m['startup_s']}s, {m['total_rss_mib']} MiB RSS, extras {extras or 'none'}, "
          f"logs in {c.logs_dir}")
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


@pytest.fixture
def job_api(request, cluster):
    """The child job API a test runs with: `pytorchjob`, or the parameter of a test parametrised (indirectly)
    over JOB_APIS. `trainjob` needs the JobSet and Trainer v2 controllers and the test runtimes."""
    api = getattr(request, "param", "pytorchjob")
    if api == "trainjob":
        need_extras(cluster, *TRAINJOB_EXTRAS)
        request.getfixturevalue("trainjob_runtimes")
    return api


@pytest.fixture(scope="session")
def trainjob_runtimes(cluster, kube_client):
    """The chart's ClusterTrainingRuntime, installed under the test names (see operator_support.test_runtimes)."""
    from tests.integration.operator_support import install_test_runtimes

    return install_test_runtimes(kube_client)
