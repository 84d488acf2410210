"""The generated CRD in a real kube-apiserver: accepted, examples pass server-side dry-run, and the schema
and CEL rules refuse broken specs at `kubectl apply` time, naming the field."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.spec_cases import CASES, EXAMPLES

CRD = Path(__file__).resolve().parents[2] / "manifests" / "crd" / "qwentrainingjobs.training.qwen.dev.yaml"
SERVER_CASES = [c for c in CASES if c.server]


def kubectl(cluster, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        ["kubectl", f"--kubeconfig={cluster.kubeconfig}", *args],
        input=stdin, capture_output=True, text=True, timeout=60,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr}")
    return result


@pytest.fixture(scope="module")
def crd(cluster):
    kubectl(cluster, "apply", "--server-side", "--force-conflicts", "-f", str(CRD))
    kubectl(cluster, "wait", "--for=condition=Established", "--timeout=30s", "crd/qwentrainingjobs.training.qwen.dev")
    deadline = time.monotonic() + 30
    while kubectl(cluster, "get", "qwentrainingjobs", "-A", check=False).returncode != 0:
        assert time.monotonic() < deadline, "the QwenTrainingJob API never became served"
        time.sleep(0.2)
    return cluster


def test_crd_is_served_with_explain(crd):
    # The OpenAPI document that explain reads is published a moment after the API is served.
    deadline = time.monotonic() + 60
    while (explained := kubectl(crd, "explain", "qwentrainingjob.spec.parallelism", check=False)).returncode != 0:
        assert time.monotonic() < deadline, explained.stderr
        time.sleep(0.5)
    out = explained.stdout
    assert "Tensor-parallel size" in out and "sequenceParallel" in out


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_examples_pass_server_side_dry_run(crd, namespace, path):
    kubectl(crd, "apply", "--dry-run=server", "-n", namespace, "-f", str(path))


@pytest.mark.parametrize("case", SERVER_CASES, ids=lambda c: c.id)
def test_server_rejects_broken_spec_naming_the_field(crd, namespace, case):
    result = kubectl(crd, "apply", "--dry-run=server", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(case.resource()), check=False)
    assert result.returncode != 0, f"{case.id} was accepted by the API server"
    assert case.path in result.stderr, result.stderr
    for fragment in case.numbers:  # the CEL messageExpression puts the spec's own values into the message
        assert fragment in result.stderr, result.stderr


def test_defaults_are_applied_by_the_server(crd, namespace):
    doc = yaml.safe_load((EXAMPLES / "cpu-pretrain.yaml").read_text())
    out = kubectl(crd, "apply", "--dry-run=server", "-n", namespace, "-o", "json", "-f", "-", stdin=yaml.safe_dump(doc)).stdout
    spec = json.loads(out)["spec"]
    assert spec["training"]["adamBeta2"] == 0.95
    assert spec["runPolicy"]["backoffLimit"] == 3
    assert spec["checkpoint"]["resume"] == "auto"


def test_only_suspend_may_change(crd, namespace):
    doc = yaml.safe_load((EXAMPLES / "cpu-pretrain.yaml").read_text())
    kubectl(crd, "apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(doc))
    name = doc["metadata"]["name"]
    denied = kubectl(crd, "patch", "-n", namespace, "qwentrainingjob", name, "--type=merge",
                     "-p", '{"spec": {"training": {"lr": 0.5}}}', check=False)
    assert denied.returncode != 0 and "spec.training is immutable" in denied.stderr, denied.stderr
    kubectl(crd, "patch", "-n", namespace, "qwentrainingjob", name, "--type=merge", "-p", '{"spec": {"suspend": true}}')
    got = json.loads(kubectl(crd, "get", "-n", namespace, "qwentrainingjob", name, "-o", "json").stdout)
    assert got["spec"]["suspend"] is True


def test_a_failed_job_may_be_fixed(crd, namespace):
    doc = yaml.safe_load((EXAMPLES / "cpu-convert.yaml").read_text())
    kubectl(crd, "apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(doc))
    name = doc["metadata"]["name"]
    kubectl(crd, "patch", "-n", namespace, "qwentrainingjob", name, "--subresource=status", "--type=merge",
            "-p", '{"status": {"phase": "Failed"}}')
    kubectl(crd, "patch", "-n", namespace, "qwentrainingjob", name, "--type=merge",
            "-p", '{"spec": {"checkpoint": {"source": {"path": "/data/fixed-hf"}}}}')
    got = json.loads(kubectl(crd, "get", "-n", namespace, "qwentrainingjob", name, "-o", "json").stdout)
    assert got["spec"]["checkpoint"]["source"]["path"] == "/data/fixed-hf"


def test_pipeline_form_and_exclusivity(crd, namespace):
    doc = yaml.safe_load((EXAMPLES / "cpu-pipeline.yaml").read_text())
    kubectl(crd, "apply", "--dry-run=server", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(doc))
    doc["spec"]["stage"] = "pretrain"
    both = kubectl(crd, "apply", "--dry-run=server", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(doc), check=False)
    assert both.returncode != 0 and "set exactly one of spec.stage and spec.pipeline" in both.stderr
