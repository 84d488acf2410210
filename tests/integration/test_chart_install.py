"""The Helm chart against the real control plane: `helm install`, then the operator runs as a local process with
the chart's ServiceAccount credentials (a TokenRequest token in a kubeconfig of its own) and takes a job through
its whole lifecycle; what the chart does not grant is refused.

kwok runs the chart's Deployment pod as a fake (nothing executes in it); the operator that does the work is the
local subprocess, started with the exact flags the chart renders into the Deployment.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

kubernetes = pytest.importorskip("kubernetes")
from kubernetes import client as k  # noqa: E402
from kubernetes.client.exceptions import ApiException  # noqa: E402

from tests.integration.conftest import TRAINJOB_EXTRAS, need_extras  # noqa: E402
from tests.integration.operator_support import (  # noqa: E402
    CHILD_APIS, EXAMPLES, Jobs, OperatorProcess, ensure_pvcs, example, wait_for,
)
from tests.unit.test_chart import CHART, HELM, require_helm  # noqa: E402

RELEASE = "qto"
SA = f"{RELEASE}-qwen-training-operator"
TRAINER_SA = "qwen-trainer"


# ---------------------------------------------------------------------------------------------- helpers

def run_helm(cluster, tmp: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ, HELM_CACHE_HOME=str(tmp / "helm-cache"), HELM_CONFIG_HOME=str(tmp / "helm-config"),
               HELM_DATA_HOME=str(tmp / "helm-data"), KUBECONFIG=str(cluster.kubeconfig))
    proc = subprocess.run([require_helm(), *args], capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, f"helm {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def token_kubeconfig(cluster, kube_client, namespace: str, sa: str, path: Path) -> Path:
    """A kubeconfig that authenticates as the ServiceAccount, with a token from the TokenRequest API."""
    req = k.CoreV1Api(kube_client).create_namespaced_service_account_token(
        sa, namespace, k.AuthenticationV1TokenRequest(spec=k.V1TokenRequestSpec(audiences=[],
                                                                                 expiration_seconds=3600)))
    ca = base64.b64encode(Path(cluster.ca_file).read_bytes()).decode()
    user = f"system:serviceaccount:{namespace}:{sa}"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "sa",
        "clusters": [{"name": "local", "cluster": {"server": cluster.server, "certificate-authority-data": ca}}],
        "users": [{"name": user, "user": {"token": req.status.token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "local", "user": user, "namespace": namespace}}],
    }))
    return path


def can_i(api: Any, verb: str, resource: str, namespace: str | None, group: str = "",
          subresource: str | None = None, name: str | None = None) -> bool:
    """`kubectl auth can-i`, as whoever `api` is logged in as (SelfSubjectAccessReview)."""
    attrs = k.V1ResourceAttributes(verb=verb, resource=resource, group=group, namespace=namespace,
                                   subresource=subresource, name=name)
    review = k.AuthorizationV1Api(api).create_self_subject_access_review(
        k.V1SelfSubjectAccessReview(spec=k.V1SelfSubjectAccessReviewSpec(resource_attributes=attrs)))
    return bool(review.status.allowed)


def forbidden(call) -> bool:
    try:
        call()
    except ApiException as e:
        return e.status == 403
    return False


def deployment_args(manifest: str) -> list[str]:
    (dep,) = [d for d in yaml.safe_load_all(manifest) if d and d["kind"] == "Deployment"]
    return dep["spec"]["template"]["spec"]["containers"][0]["args"]


# ---------------------------------------------------------------------------------------------- fixtures

@pytest.fixture
def other_namespace(kube_client):
    """A second namespace the release does not watch (removed afterwards)."""
    import uuid

    core = k.CoreV1Api(kube_client)
    name = f"t-other-{uuid.uuid4().hex[:6]}"
    core.create_namespace(k.V1Namespace(metadata=k.V1ObjectMeta(name=name)))
    yield name
    core.delete_namespace(name)


SCOPES = {
    # the least privileged install: one namespace, one replica
    "namespace": {"watch.scope": "namespace"},
    # whole cluster with two replicas: ClusterRole, scanning, ClusterKopfPeering
    "cluster-ha": {"watch.scope": "cluster", "replicas": "2"},
    # one namespace, Kubeflow Trainer v2: the chart's ClusterTrainingRuntime, TrainJob RBAC (Trainer v2 + JobSet)
    "namespace-trainjob": {"watch.scope": "namespace", "jobApi": "trainjob"},
}


def hold_runtime_pods(kube_client, runtime: str) -> None:
    """kwok completes every pod a batch Job owns at once; the chart runtime's pods are held Running instead
    (`qwen.test/outcome: run`), as the trainjob tests' runtimes are, so the lifecycle below has a Running phase."""
    co = k.CustomObjectsApi(kube_client)
    rt = co.get_cluster_custom_object("trainer.kubeflow.org", "v1alpha1", "clustertrainingruntimes", runtime)
    jobs = rt["spec"]["template"]["spec"]["replicatedJobs"]
    for job in jobs:
        pod = job["template"]["spec"]["template"]
        pod.setdefault("metadata", {}).setdefault("annotations", {})["qwen.test/outcome"] = "run"
    co.patch_cluster_custom_object("trainer.kubeflow.org", "v1alpha1", "clustertrainingruntimes", runtime,
                                   {"spec": {"template": {"spec": {"replicatedJobs": jobs}}}})


@pytest.fixture(params=sorted(SCOPES))
def release(request, cluster, kube_client, namespace, tmp_path):
    if not HELM:
        require_helm()
    scope = request.param
    job_api = SCOPES[scope].get("jobApi", "pytorchjob")
    if job_api == "trainjob":
        need_extras(cluster, *TRAINJOB_EXTRAS)
    sets = [f"{key}={value}" for key, value in SCOPES[scope].items()]
    name = f"{RELEASE}-{scope}"
    # Unique cluster-scoped names per install (ClusterRole, ClusterKopfPeering, ClusterTrainingRuntime), so installs
    # never collide.
    sets += [f"fullnameOverride={SA}-{namespace}", f"trainJob.runtime.name=qwen-torch-{namespace}"]
    args = ["install", name, str(CHART), "--namespace", namespace,
            "--set", "image.repository=registry.invalid/qwen-k8s/operator",
            # kwok finishes the `helm test` pod as Succeeded (tools/qwen_devcluster's outcome annotation).
            "--set-string", "tests.podAnnotations.qwen\\.test/outcome=succeed"]
    for s in sets:
        args += ["--set", s]
    run_helm(cluster, tmp_path, *args)
    manifest = run_helm(cluster, tmp_path, "get", "manifest", name, "--namespace", namespace).stdout
    if job_api == "trainjob":
        hold_runtime_pods(kube_client, f"qwen-torch-{namespace}")
    info = {"scope": scope, "name": name, "namespace": namespace, "sa": f"{SA}-{namespace}",
            "manifest": manifest, "tmp": tmp_path, "job_api": job_api}
    try:
        yield info
    finally:
        subprocess.run([HELM, "uninstall", name, "--namespace", namespace, "--wait", "--timeout", "60s"],
                       capture_output=True, env=dict(os.environ, KUBECONFIG=str(cluster.kubeconfig),
                                                     HELM_CACHE_HOME=str(tmp_path / "helm-cache"),
                                                     HELM_CONFIG_HOME=str(tmp_path / "helm-config"),
                                                     HELM_DATA_HOME=str(tmp_path / "helm-data")), timeout=120)


# ---------------------------------------------------------------------------------------------- the test

def test_chart_install_rbac_is_sufficient_and_minimal(cluster, kube_client, release, other_namespace, tmp_path):
    ns = release["namespace"]
    ext = k.ApiextensionsV1Api(kube_client)

    # crds/ was installed (or was there already) and is served.
    def established(name: str) -> bool:
        crd = ext.read_custom_resource_definition(name)
        return any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or [])

    for crd in ("qwentrainingjobs.training.qwen.dev", "kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev"):
        wait_for(lambda: established(crd), 30, what=f"CRD {crd}")

    # `helm test`: the hook pod exists and (finished by kwok) succeeds.
    run_helm(cluster, release["tmp"], "test", release["name"], "--namespace", ns, "--timeout", "90s")

    # ---- the operator, as the chart's ServiceAccount, with the chart's flags
    sa_kubeconfig = token_kubeconfig(cluster, kube_client, ns, release["sa"], tmp_path / "operator.kubeconfig")
    chart_args = [a for a in deployment_args(release["manifest"])
                  if not a.startswith(("--liveness=", "--metrics-port="))]
    if release["scope"].startswith("namespace"):
        assert f"--namespace={ns}" in chart_args and "--standalone" in chart_args
    else:
        assert "--all-namespaces" in chart_args and any(a.startswith("--peering=") for a in chart_args)
    op = OperatorProcess(sa_kubeconfig, tmp_path, *chart_args, "--log-format", "plain", "--verbose",
                         env={"KUBERNETES_SERVICE_HOST": ""})
    sa_api = k.ApiClient()
    try:
        op.start().wait_ready(90)
        if not release["scope"].startswith("namespace"):
            # The keep-alive went through: the replica wrote itself into the chart's ClusterKopfPeering.
            peering = next(a.split("=", 1)[1] for a in chart_args if a.startswith("--peering="))
            wait_for(lambda: (k.CustomObjectsApi(kube_client).get_cluster_custom_object(
                "kopf.dev", "v1", "clusterkopfpeerings", peering).get("status") or {}), 30,
                what="peering keep-alive in the ClusterKopfPeering status")

        # ---- a full job lifecycle on the tiny CPU example
        job_api = release["job_api"]
        child_api = CHILD_APIS[job_api]
        if job_api == "trainjob":
            assert "--job-api=trainjob" in chart_args and f"--trainjob-runtime=qwen-torch-{ns}" in chart_args
        jobs = Jobs(kube_client, ns, job_api)
        doc = example(EXAMPLES / "cpu-pretrain.yaml", ns)
        doc["spec"]["serviceAccountName"] = TRAINER_SA
        name = doc["metadata"]["name"]
        ensure_pvcs(kube_client, ns, {v["claimName"] for v in doc["spec"].get("volumes", [])})
        jobs.create(doc)
        wait_for(lambda: jobs.child(name), 60, what=f"{child_api.kind} created by the operator")
        wait_for(lambda: jobs.pods(name) and all(p.status.phase == "Running" for p in jobs.pods(name)), 60,
                 what="trainer pods Running")
        assert all(p.spec.service_account_name == TRAINER_SA for p in jobs.pods(name))
        jobs.wait_phase(name, "Running", 60)

        # The trainer's ServiceAccount may report progress into the status, and nothing else.
        trainer_cfg = token_kubeconfig(cluster, kube_client, ns, TRAINER_SA, tmp_path / "trainer.kubeconfig")
        trainer_api = kubernetes.config.new_client_from_config(config_file=str(trainer_cfg))
        tco = k.CustomObjectsApi(trainer_api)
        tco.patch_namespaced_custom_object_status(
            "training.qwen.dev", "v1alpha1", ns, "qwentrainingjobs", name,
            {"status": {"progress": {"iteration": 20, "trainIters": 40, "engine": "cpu"}}})
        assert tco.get_namespaced_custom_object_status("training.qwen.dev", "v1alpha1", ns, "qwentrainingjobs",
                                                       name)["status"]["progress"]["iteration"] == 20
        assert forbidden(lambda: tco.patch_namespaced_custom_object(
            "training.qwen.dev", "v1alpha1", ns, "qwentrainingjobs", name, {"metadata": {"labels": {"x": "y"}}}))
        assert forbidden(lambda: k.CoreV1Api(trainer_api).list_namespaced_pod(ns))
        assert not can_i(trainer_api, "create", "pods", ns)
        assert not can_i(trainer_api, "delete", "qwentrainingjobs", ns, "training.qwen.dev")

        cluster.set_pod_outcome(ns, f"training.qwen.dev/job={name}", "succeed", delay="1s")
        done = jobs.wait_phase(name, "Succeeded", 90)
        assert {c["type"]: c["status"] for c in done["status"]["conditions"]}["Succeeded"] == "True"
        assert done["status"]["progress"]["iteration"] == 20  # the operator kept the trainer's field
        assert op.alive()
        log = op.output()
        # RBAC refusals read 'User "system:serviceaccount:..." cannot <verb> resource ...'; kopf says "Not enough
        # permissions" when it cannot watch something it wants.
        refusals = re.findall(r'User \\?"system:serviceaccount:[^"\\]+\\?" cannot [^\n]{0,160}', log)
        assert not refusals and "Not enough permissions" not in log, "\n".join(refusals) or log[-4000:]

        # ---- what the operator's ServiceAccount may and may not do
        sa_api = kubernetes.config.new_client_from_config(config_file=str(sa_kubeconfig))
        child, group_ = child_api.plural, child_api.group
        other = CHILD_APIS["trainjob" if job_api == "pytorchjob" else "pytorchjob"]
        allowed = [("create", child, group_, None), ("patch", child, group_, None),
                   ("watch", child, group_, None), ("create", "configmaps", "", None),
                   ("create", "events", "", None), ("patch", "qwentrainingjobs", "training.qwen.dev", "status"),
                   ("list", "qwentrainingjobs", "training.qwen.dev", None),
                   ("watch", "workloads", "kueue.x-k8s.io", None)]
        if job_api == "trainjob":
            allowed.append(("get", "jobsets", "jobset.x-k8s.io", None))
        for verb, resource, group, sub in allowed:
            assert can_i(sa_api, verb, resource, ns, group, sub), (verb, resource, sub)
        refused = [("delete", child, group_), ("update", child, group_),
                   ("create", other.plural, other.group), ("list", other.plural, other.group),
                   ("create", "jobsets", "jobset.x-k8s.io"), ("delete", "workloads", "kueue.x-k8s.io"),
                   ("patch", "workloads", "kueue.x-k8s.io"),
                   ("create", "clustertrainingruntimes", "trainer.kubeflow.org"),
                   ("delete", "configmaps", ""), ("patch", "configmaps", ""), ("list", "configmaps", ""),
                   ("create", "qwentrainingjobs", "training.qwen.dev"),
                   ("delete", "qwentrainingjobs", "training.qwen.dev"),
                   ("get", "secrets", ""), ("create", "secrets", ""), ("create", "pods", ""),
                   ("create", "deployments", "apps"), ("create", "roles", "rbac.authorization.k8s.io"),
                   ("create", "leases", "coordination.k8s.io")]
        for verb, resource, group in refused:
            assert not can_i(sa_api, verb, resource, ns, group), (verb, resource)
        assert not can_i(sa_api, "delete", "nodes", None)
        assert not can_i(sa_api, "create", "customresourcedefinitions", None, "apiextensions.k8s.io")
        if release["scope"].startswith("namespace"):
            assert not can_i(sa_api, "list", child, other_namespace, group_)
            assert not can_i(sa_api, "list", "qwentrainingjobs", None, "training.qwen.dev")  # cluster-wide
            assert not can_i(sa_api, "list", "customresourcedefinitions", None, "apiextensions.k8s.io")
        else:
            assert can_i(sa_api, "list", "qwentrainingjobs", other_namespace, "training.qwen.dev")
            assert can_i(sa_api, "patch", "clusterkopfpeerings", None, "kopf.dev")
            assert not can_i(sa_api, "delete", "clusterkopfpeerings", None, "kopf.dev")

        # ... and real calls are refused by the apiserver, not only by the review.
        core, apps = k.CoreV1Api(sa_api), k.AppsV1Api(sa_api)
        node = cluster.nodes[0] if cluster.nodes else "gpu-node-0"
        assert forbidden(lambda: core.delete_node(node))
        assert forbidden(lambda: core.create_namespaced_secret(ns, {"metadata": {"name": "stolen"},
                                                                    "stringData": {"a": "b"}}))
        assert forbidden(lambda: core.list_namespaced_secret(ns))
        assert forbidden(lambda: apps.create_namespaced_deployment(ns, {
            "metadata": {"name": "x"}, "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {
                "metadata": {"labels": {"a": "b"}}, "spec": {"containers": [{"name": "c", "image": "x"}]}}}}))
        assert forbidden(lambda: k.CustomObjectsApi(sa_api).delete_namespaced_custom_object(
            "training.qwen.dev", "v1alpha1", ns, "qwentrainingjobs", name))
        if release["scope"].startswith("namespace"):
            assert forbidden(lambda: k.CustomObjectsApi(sa_api).list_namespaced_custom_object(
                group_, child_api.version, other_namespace, child))
    finally:
        op.stop()
        sa_api.close()
        print(op.output()[-3000:])
