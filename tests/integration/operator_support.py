"""Helpers for the operator's integration tests: the operator as a real subprocess, CRD installation, PVCs the
examples mount, and polling."""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Optional

import yaml
from kubernetes import client as k
from kubernetes.client.exceptions import ApiException

from qwen_operator.api import GROUP, PLURAL, VERSION
from qwen_operator.api.crd import build_crd
from qwen_operator.peering import peering_crds

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "manifests" / "examples"
CHART = ROOT / "charts" / "qwen-training-operator"
JOB_APIS = ("pytorchjob", "trainjob")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check: Callable[[], Any], timeout: float = 30.0, interval: float = 0.2, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = check()
        except ApiException as e:
            if e.status != 404:
                raise
            last = None
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last value: {last!r}")
        time.sleep(interval)


def _apply_crd(api: k.ApiClient, crd: dict[str, Any]) -> None:
    ext = k.ApiextensionsV1Api(api)
    try:
        ext.create_custom_resource_definition(crd)
    except ApiException as e:
        if e.status != 409:
            raise
        live = ext.read_custom_resource_definition(crd["metadata"]["name"])
        body = copy.deepcopy(crd)
        body["metadata"]["resourceVersion"] = live.metadata.resource_version
        ext.replace_custom_resource_definition(crd["metadata"]["name"], body)

    def established() -> bool:
        live = ext.read_custom_resource_definition(crd["metadata"]["name"])
        return any(c.type == "Established" and c.status == "True" for c in (live.status.conditions or []))

    wait_for(established, 30, what=f"CRD {crd['metadata']['name']} Established")


def install_crds(api: k.ApiClient) -> None:
    """The QwenTrainingJob CRD (built from the models, as the generated manifest is) and kopf's peering CRDs."""
    for crd in [build_crd(), *peering_crds()]:
        _apply_crd(api, crd)
    custom = k.CustomObjectsApi(api)
    wait_for(lambda: custom.list_cluster_custom_object(GROUP, VERSION, PLURAL) is not None, 30, what="API served")


def ensure_pvcs(api: k.ApiClient, namespace: str, claims: set[str]) -> None:
    """Bound PVCs for the claims the examples mount (the scheduler refuses pods with missing or unbound claims)."""
    core = k.CoreV1Api(api)
    for claim in sorted(claims):
        pv_name = f"pv-{namespace}-{claim}"[:63]
        pv = {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv_name},
              "spec": {"capacity": {"storage": "1Ti"}, "accessModes": ["ReadWriteMany"],
                       "persistentVolumeReclaimPolicy": "Delete", "storageClassName": "",
                       "hostPath": {"path": f"/tmp/{pv_name}"},
                       "claimRef": {"namespace": namespace, "name": claim}}}
        pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim},
               "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "", "volumeName": pv_name,
                        "resources": {"requests": {"storage": "1Ti"}}}}
        for create in (lambda: core.create_persistent_volume(pv),
                       lambda: core.create_namespaced_persistent_volume_claim(namespace, pvc)):
            try:
                create()
            except ApiException as e:
                if e.status != 409:
                    raise
    wait_for(lambda: all(core.read_namespaced_persistent_volume_claim(c, namespace).status.phase == "Bound"
                         for c in claims), 30, what="PVCs bound")


def example(path: Path, namespace: str, name: Optional[str] = None) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text())
    doc["metadata"]["namespace"] = namespace
    if name:
        doc["metadata"]["name"] = name
    return doc


def tiny_job(name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    """A small valid QwenTrainingJob (no volumes), with spec overrides."""
    body: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "QwenTrainingJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"stage": "convert", "model": {"family": "qwen2.5", "size": "0.5B"},
                 "checkpoint": {"source": {"path": "/data/hf"}, "output": {"path": "/data/mcore"}},
                 "image": {"name": "ghcr.io/qwen-k8s/trainer-cpu:0.1.0"},
                 "training": {"globalBatchSize": 8},
                 "resources": {"nodes": 1, "gpusPerNode": 0, "processesPerNode": 2, "sharedMemory": "1Gi"}},
    }
    body["spec"].update(spec)
    return body


# ------------------------------------------------------------------------------------------- job APIs


class ChildApi:
    """What the tests need to know about one child job API: where its objects live, how its pods are labelled,
    and its replica and container names."""

    def __init__(self, name: str, group: str, version: str, plural: str, kind: str, replica: str, container: str,
                 pod_label: str):
        self.name, self.group, self.version, self.plural, self.kind = name, group, version, plural, kind
        self.replica, self.container, self.pod_label = replica, container, pod_label

    def pod_selector(self, child: str) -> str:
        """Label selector of the pods a child job runs (PyTorchJob: its job-name label; TrainJob: its JobSet's)."""
        return f"{self.pod_label}={child}"

    def suspended(self, child: dict[str, Any]) -> Optional[bool]:
        spec = child.get("spec") or {}
        return (spec.get("runPolicy") or {}).get("suspend") if self.kind == "PyTorchJob" else spec.get("suspend")

    def hand_edit(self, child: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """A merge patch someone might make to a live child by hand, and the field it changes. A PyTorchJob's image;
        a TrainJob's `trainer` and its pods' containers and volumes are immutable, and its runtime patches may change
        only while it is suspended: a pod label of our runtime patch."""
        spec = copy.deepcopy(child["spec"])
        if self.kind == "TrainJob":
            # (Kueue's webhook adds a patch of its own, empty unless it admits the job onto a flavor.)
            (ours,) = [p for p in spec["runtimePatches"] if p["manager"] == "training.qwen.dev/qwen-operator"]
            pod = ours["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
            pod["metadata"]["labels"]["training.qwen.dev/stage"] = "someone-else"
            return {"spec": {"runtimePatches": spec["runtimePatches"]}}, "labels"
        spec["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["image"] = "someone/else:1"
        return {"spec": {"pytorchReplicaSpecs": spec["pytorchReplicaSpecs"]}}, "image"

    def __repr__(self) -> str:
        return self.name


CHILD_APIS = {
    "pytorchjob": ChildApi("pytorchjob", "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob", "Master", "pytorch",
                           "training.kubeflow.org/job-name"),
    "trainjob": ChildApi("trainjob", "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob", "Node", "node",
                         "jobset.sigs.k8s.io/jobset-name"),
}

# The ClusterTrainingRuntimes the trainjob tests run on: the chart's own runtime (helm template), whose pods kwok
# keeps Running until a test chooses their outcome (`qwen.test/outcome: run`; without it kwok completes any pod a
# batch Job owns at once). RUNTIME restarts a failed job's nodes as the chart's default does (maxRestarts 3);
# RUNTIME_NO_RESTARTS fails at the first failed pod, which is what a PyTorchJob's runPolicy {restartPolicy: Never,
# backoffLimit: 0} says per job (a TrainJob's restarts are its runtime's).
RUNTIME = "qwen-test-torch"
RUNTIME_NO_RESTARTS = "qwen-test-torch-no-restarts"


def chart_runtime() -> dict[str, Any]:
    """The chart's ClusterTrainingRuntime, rendered by helm with jobApi=trainjob."""
    from tests.unit.test_chart import require_helm

    out = subprocess.run([require_helm(), "template", "qwen", str(CHART), "--set", "jobApi=trainjob",
                          "--show-only", "templates/trainingruntime.yaml"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    (doc,) = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert doc["kind"] == "ClusterTrainingRuntime"
    return doc


def install_test_runtimes(api: k.ApiClient) -> dict[str, dict[str, Any]]:
    custom = k.CustomObjectsApi(api)
    out = {}
    for name, restarts in ((RUNTIME, None), (RUNTIME_NO_RESTARTS, 0)):
        doc = chart_runtime()
        doc["metadata"] = {"name": name, "labels": doc["metadata"]["labels"]}
        spec = doc["spec"]["template"]["spec"]
        if restarts is not None:
            spec["failurePolicy"]["maxRestarts"] = restarts
        (node,) = spec["replicatedJobs"]
        pod = node["template"]["spec"]["template"]
        pod.setdefault("metadata", {}).setdefault("annotations", {})["qwen.test/outcome"] = "run"
        try:
            custom.create_cluster_custom_object("trainer.kubeflow.org", "v1alpha1", "clustertrainingruntimes", doc)
        except ApiException as e:
            if e.status != 409:
                raise
        out[name] = doc
    return out


def operator_args(job_api: str, request: Any = None) -> list[str]:
    """The operator's job-API flags for a test: `trainjob` runs on RUNTIME, or on RUNTIME_NO_RESTARTS for a test
    marked `no_restarts` (whose spec says runPolicy {restartPolicy: Never, backoffLimit: 0})."""
    if job_api != "trainjob":
        return ["--job-api", job_api]
    no_restarts = request is not None and request.node.get_closest_marker("no_restarts") is not None
    return ["--job-api", "trainjob", "--trainjob-runtime", RUNTIME_NO_RESTARTS if no_restarts else RUNTIME]


def runtime_of(args: list[str]) -> str:
    return args[args.index("--trainjob-runtime") + 1] if "--trainjob-runtime" in args else RUNTIME


class Jobs:
    """QwenTrainingJob and child job (PyTorchJob or TrainJob) access for one namespace."""

    def __init__(self, api: k.ApiClient, namespace: str, job_api: str = "pytorchjob"):
        self.api, self.ns = api, namespace
        self.custom = k.CustomObjectsApi(api)
        self.core = k.CoreV1Api(api)
        self.child_api = CHILD_APIS[job_api]

    def children(self) -> list[dict[str, Any]]:
        a = self.child_api
        return self.custom.list_namespaced_custom_object(a.group, a.version, self.ns, a.plural)["items"]

    def child(self, name: str) -> dict[str, Any]:
        a = self.child_api
        return self.custom.get_namespaced_custom_object(a.group, a.version, self.ns, a.plural, name)

    def patch_child(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        a = self.child_api
        return self.custom.patch_namespaced_custom_object(a.group, a.version, self.ns, a.plural, name, body,
                                                          _content_type="application/merge-patch+json")

    def child_suspended(self, name: str) -> Optional[bool]:
        return self.child_api.suspended(self.child(name))

    def child_pods(self, child: str) -> list[Any]:
        return self.core.list_namespaced_pod(self.ns, label_selector=self.child_api.pod_selector(child)).items

    def jobsets(self) -> list[dict[str, Any]]:
        return self.custom.list_namespaced_custom_object("jobset.x-k8s.io", "v1alpha2", self.ns, "jobsets")["items"]

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, body)

    def get(self, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name)

    def patch(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name, body,
                                                          _content_type="application/merge-patch+json")

    def delete(self, name: str, propagation: str = "Background") -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name,
                                                    propagation_policy=propagation)

    def pytorchjobs(self) -> list[dict[str, Any]]:
        return self.custom.list_namespaced_custom_object("kubeflow.org", "v1", self.ns, "pytorchjobs")["items"]

    def pytorchjob(self, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object("kubeflow.org", "v1", self.ns, "pytorchjobs", name)

    def patch_pytorchjob(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.custom.patch_namespaced_custom_object("kubeflow.org", "v1", self.ns, "pytorchjobs", name, body,
                                                          _content_type="application/merge-patch+json")

    def configmaps(self, label: str = "app.kubernetes.io/managed-by=qwen-operator") -> list[Any]:
        return self.core.list_namespaced_config_map(self.ns, label_selector=label).items

    def pods(self, job: str) -> list[Any]:
        return self.core.list_namespaced_pod(self.ns, label_selector=f"training.qwen.dev/job={job}").items

    def events(self, name: str) -> list[Any]:
        return self.core.list_namespaced_event(self.ns, field_selector=f"involvedObject.name={name}").items

    def phase(self, name: str) -> Optional[str]:
        return (self.get(name).get("status") or {}).get("phase")

    def condition(self, name: str, type_: str) -> dict[str, Any]:
        for c in (self.get(name).get("status") or {}).get("conditions") or []:
            if c["type"] == type_:
                return c
        return {}

    def wait_phase(self, name: str, phase: str, timeout: float = 60) -> dict[str, Any]:
        wait_for(lambda: self.phase(name) == phase, timeout, what=f"{self.ns}/{name} phase {phase} "
                 f"(now {self._safe_phase(name)})")
        return self.get(name)

    def _safe_phase(self, name: str) -> Optional[str]:
        try:
            return self.phase(name)
        except ApiException:
            return None


class OperatorProcess:
    """`python -m qwen_operator.main ...` against the test cluster, logging to a file."""

    def __init__(self, kubeconfig: Path, log_dir: Path, *args: str, name: str = "operator",
                 env: Optional[dict[str, str]] = None):
        self.metrics_port = free_port()
        self.liveness_port = free_port()
        self.log = log_dir / f"{name}.log"
        self.argv = [sys.executable, "-m", "qwen_operator.main", "--metrics-host", "127.0.0.1",
                     "--metrics-port", str(self.metrics_port),
                     "--liveness", f"http://127.0.0.1:{self.liveness_port}/healthz", *args]
        self.env = {**os.environ, "KUBECONFIG": str(kubeconfig), **(env or {})}
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "OperatorProcess":
        self.log.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.log, "ab")
        self.proc = subprocess.Popen(self.argv, stdout=fh, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT,
                                     start_new_session=True)
        fh.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def get(self, path: str, port: Optional[int] = None) -> tuple[int, str]:
        url = f"http://127.0.0.1:{port or self.metrics_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError:
            return 0, ""

    def ready(self) -> bool:
        return self.get("/readyz")[0] == 200

    def wait_ready(self, timeout: float = 60) -> "OperatorProcess":
        def check() -> bool:
            if not self.alive():
                raise AssertionError(f"operator exited with {self.proc.returncode}:\n{self.output()[-4000:]}")
            return self.ready()
        wait_for(check, timeout, what="operator /readyz")
        return self

    def wait_serving(self, timeout: float = 60) -> "OperatorProcess":
        """Up, whether ready or paused (for HA replicas)."""
        wait_for(lambda: self.get("/readyz")[0] in (200, 503) or not self.alive(), timeout, what="operator HTTP")
        return self

    def metrics(self) -> str:
        return self.get("/metrics")[1]

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def log_records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.output().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def stop(self, timeout: float = 15) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait(10)


# ----------------------------------------------------------------------------------------- fixtures
# Imported by the operator test modules that need them.

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def crds(kube_client):
    install_crds(kube_client)
    return kube_client


@pytest.fixture
def operator(request, cluster, crds, namespace, tmp_path, job_api):
    """One standalone operator watching the test's namespace with the test's job API, as a real subprocess."""
    op = OperatorProcess(cluster.kubeconfig, tmp_path, "--namespace", namespace, "--standalone",
                         *operator_args(job_api, request)).start()
    op.wait_ready()
    yield op
    op.stop()
    print(op.output()[-3000:])


@pytest.fixture
def jobs(crds, namespace, job_api):
    return Jobs(crds, namespace, job_api)


# Parametrise a test over both job APIs: @both_apis (the `job_api` fixture takes the parameter).
both_apis = pytest.mark.parametrize("job_api", JOB_APIS, indirect=True)
