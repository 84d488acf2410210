"""The kind cluster the tests in this folder run real pods on (tools/qwen_kind): Docker (started if none
runs), every image built on this machine, one control-plane node and two workers, the training-operator and
the project's chart. Started once per session and deleted at its end, also on failure.

QWEN_KIND_ATTACH=DIR runs them on a cluster `python tools/qwen_kind up --work DIR` left running.
With QWEN_KIND_TRAINJOB=1 the cluster also runs JobSet, Kubeflow Trainer v2 and a second release of the chart
with jobApi trainjob watching TRAINJOB_NAMESPACE (`up --trainjob NS`); the TrainJob test skips where they are not
installed.
Without Docker the tests are skipped, unless QWEN_REQUIRE_CLUSTER is set (CI, `make test`): then they fail.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "tools") not in sys.path:
    sys.path.insert(0, str(ROOT / "tools"))

from qwen_kind import cluster as kind_cluster  # noqa: E402
from qwen_kind.errors import KindSetupError  # noqa: E402

# Where the tests' resources live; the chart creates the trainer ServiceAccount there.
NAMESPACE = "qwen-kind"
# Where the TrainJob test's resources live: the trainjob release of the chart watches only this one.
TRAINJOB_NAMESPACE = "qwen-kind-trainjob"


# How long each part of the cluster's setup took, for the run's summary (CI logs show where the minutes went).
SETUP_TIMINGS: dict[str, float] = {}


def pytest_terminal_summary(terminalreporter):
    if SETUP_TIMINGS:
        terminalreporter.write_sep("-", "kind cluster setup")
        for part, seconds in SETUP_TIMINGS.items():
            terminalreporter.write_line(f"{seconds:8.1f} s  {part}")


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.kind)


def _required() -> bool:
    return os.environ.get("QWEN_REQUIRE_CLUSTER", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture(scope="session")
def kind(tmp_path_factory):
    attached = os.environ.get("QWEN_KIND_ATTACH")
    if attached:  # a cluster from `python tools/qwen_kind up --work DIR`, left running afterwards
        yield kind_cluster.attach("qwen-e2e", Path(attached))
        return
    try:
        trainjob = os.environ.get("QWEN_KIND_TRAINJOB", "").strip().lower() not in ("", "0", "false", "no")
        cluster = kind_cluster.up("qwen-e2e", workers=2, work=tmp_path_factory.mktemp("kind"), namespaces=(NAMESPACE,),
                                  trainjob_namespace=TRAINJOB_NAMESPACE if trainjob else None)
    except KindSetupError as err:
        if _required():
            pytest.fail(f"the kind cluster could not be set up: {err}", pytrace=False)
        pytest.skip(f"no kind cluster here: {err}")
    SETUP_TIMINGS.update(cluster.timings)
    try:
        yield cluster
    finally:
        kind_cluster.down(cluster)
