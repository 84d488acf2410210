"""charts/qwen-training-operator: lint, render over a matrix of values, schema refusals, generated files.

Needs helm (built by tools/build-controlplane.sh; `HELM` overrides). Without it these tests are skipped,
unless QWEN_REQUIRE_CLUSTER is set (CI), where a missing helm fails them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterable

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "qwen-training-operator"
RELEASE, NAMESPACE = "qto", "qwen-system"


def find_helm() -> str | None:
    if os.environ.get("HELM"):
        return os.environ["HELM"]
    try:
        out = subprocess.run([str(ROOT / "tools" / "build-controlplane.sh"), "--print-bin-dir"],
                             capture_output=True, text=True, timeout=30)
        candidate = Path(out.stdout.strip().splitlines()[-1]) / "helm" if out.returncode == 0 else None
    except (OSError, IndexError, subprocess.TimeoutExpired):
        candidate = None
    if candidate is not None and candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which("helm")


HELM = find_helm()


def require_helm() -> str:
    if HELM:
        return HELM
    if os.environ.get("QWEN_REQUIRE_CLUSTER", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail("helm is required (QWEN_REQUIRE_CLUSTER is set) but was not found; "
                    "run tools/build-controlplane.sh --only helm")
    pytest.skip("helm is not built yet: run tools/build-controlplane.sh --only helm (or set HELM)")


def set_args(values: dict[str, Any]) -> list[str]:
    args = []
    for key, value in values.items():
        if isinstance(value, str):
            args += ["--set-string", f"{key}={value}"]
        else:
            args += ["--set-json", f"{key}={json.dumps(value)}"]
    return args


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([require_helm(), *args], capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stderr}")
    return proc


def render(values: dict[str, Any] | None = None, *extra: str, namespace: str = NAMESPACE) -> list[dict]:
    proc = helm("template", RELEASE, str(CHART), "--namespace", namespace, *set_args(values or {}), *extra)
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def of_kind(docs: Iterable[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: Iterable[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in of_kind(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


def rules_of(role: dict) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


# What the operator does (docs/operator.md; qwen_operator.kube and .handlers): kopf lists, watches and patches
# the jobs (annotations) and patches their status; the handlers read a job, write its status, create and read
# the ConfigMap and the PyTorchJob, patch the PyTorchJob's suspend flag, watch PyTorchJobs, post Events.
OPERATOR_RULES = {
    ("training.qwen.dev", "qwentrainingjobs"): {"get", "list", "watch", "patch"},
    ("training.qwen.dev", "qwentrainingjobs/status"): {"patch"},
    ("kubeflow.org", "pytorchjobs"): {"get", "list", "watch", "create", "patch"},
    ("", "configmaps"): {"get", "create"},
    ("", "pods"): {"get", "list", "watch"},
    ("", "serviceaccounts"): {"get"},
    ("", "events"): {"create"},
    ("kueue.x-k8s.io", "workloads"): {"get", "list", "watch"},
}
# With jobApi: trainjob the PyTorchJob rule gives way to TrainJobs and a read of the JobSet behind one.
TRAINJOB_RULES = {k: v for k, v in OPERATOR_RULES.items() if k != ("kubeflow.org", "pytorchjobs")} | {
    ("trainer.kubeflow.org", "trainjobs"): {"get", "list", "watch", "create", "patch"},
    ("jobset.x-k8s.io", "jobsets"): {"get"},
}
# All-namespaces kopf follows CRDs (scanning); exact namespaces turn scanning off.
SCANNING_RULES = {("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"}}
CLUSTER_PEERING_RULES = {("kopf.dev", "clusterkopfpeerings"): {"list", "watch", "patch"}}
NAMESPACED_PEERING_RULES = {("kopf.dev", "kopfpeerings"): {"list", "watch", "patch"}}
TRAINER_RULES = {("training.qwen.dev", "qwentrainingjobs/status"): {"get", "patch"}}

# The kubernetes-client calls the operator makes, and the (resource, verb) each needs. A call not listed here
# fails test_operator_client_calls_are_granted: add it to the table and to the chart's rules together.
CLIENT_CALLS = {
    "get_namespaced_custom_object": [("training.qwen.dev", "qwentrainingjobs", "get"),
                                     ("kubeflow.org", "pytorchjobs", "get"),
                                     ("trainer.kubeflow.org", "trainjobs", "get"),
                                     ("jobset.x-k8s.io", "jobsets", "get")],
    "create_namespaced_custom_object": [("kubeflow.org", "pytorchjobs", "create"),
                                        ("trainer.kubeflow.org", "trainjobs", "create")],
    "patch_namespaced_custom_object": [("kubeflow.org", "pytorchjobs", "patch"),
                                       ("trainer.kubeflow.org", "trainjobs", "patch")],
    "patch_namespaced_custom_object_status": [("training.qwen.dev", "qwentrainingjobs/status", "patch")],
    # the preempting resource, found from its child job's UID (kube.owner_of_child_uid)
    "list_namespaced_custom_object": [("kubeflow.org", "pytorchjobs", "list"),
                                      ("trainer.kubeflow.org", "trainjobs", "list")],
    "read_namespaced_config_map": [("", "configmaps", "get")],
    "create_namespaced_config_map": [("", "configmaps", "create")],
    "read_namespaced_service_account": [("", "serviceaccounts", "get")],
    "get_api_resources": [],  # discovery (is the Kueue or child API served?): open to every authenticated user
}


def deployment(docs: list[dict]) -> dict:
    return one(docs, "Deployment")


def container(docs: list[dict]) -> dict:
    (c,) = deployment(docs)["spec"]["template"]["spec"]["containers"]
    return c


def operator_role_docs(docs: list[dict]) -> list[dict]:
    """Roles/ClusterRoles bound to the operator's ServiceAccount."""
    sa = deployment(docs)["spec"]["template"]["spec"]["serviceAccountName"]
    bound = set()
    for b in of_kind(docs, "RoleBinding") + of_kind(docs, "ClusterRoleBinding"):
        if any(s["kind"] == "ServiceAccount" and s["name"] == sa and s["namespace"] == NAMESPACE for s in b["subjects"]):
            bound.add((b["roleRef"]["kind"], b["metadata"].get("namespace"), b["roleRef"]["name"]))
    out = []
    for kind, ns, name in bound:
        (role,) = [r for r in of_kind(docs, kind) if r["metadata"]["name"] == name
                   and (kind == "ClusterRole" or r["metadata"]["namespace"] == ns)]
        out.append(role)
    return out


def assert_restricted(pod_spec: dict) -> None:
    """The `restricted` Pod Security Standard, field by field."""
    psc = pod_spec["securityContext"]
    assert psc["runAsNonRoot"] is True
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert psc.get("runAsUser", 1) != 0
    for c in pod_spec["containers"] + pod_spec.get("initContainers", []):
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc.get("privileged", False) is False
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    for v in pod_spec.get("volumes", []):
        assert "hostPath" not in v


# ---------------------------------------------------------------------------------------------- lint

MATRIX = {
    "cluster": {},
    "namespace": {"watch.scope": "namespace"},
    "namespaces": {"watch.scope": "namespaces", "watch.namespaces": ["team-a", "team-b"]},
    "cluster-ha": {"replicas": 2},
    "namespaces-ha": {"watch.scope": "namespaces", "watch.namespaces": ["team-a", "team-b"], "replicas": 2},
    "servicemonitor": {"metrics.serviceMonitor.enabled": True, "metrics.serviceMonitor.labels": {"release": "prom"}},
    "custom-image": {"image.repository": "registry.example.com:5000/qwen/op", "image.tag": "dev-1",
                     "imagePullSecrets": [{"name": "regcred"}]},
    "trainjob": {"jobApi": "trainjob"},
    "trainjob-namespaces": {"jobApi": "trainjob", "watch.scope": "namespaces", "watch.namespaces": ["team-a"]},
    "no-rbac": {"rbac.create": False, "serviceAccount.create": False, "serviceAccount.name": "mine",
                "trainer.serviceAccount.create": False},
}


@pytest.mark.parametrize("case", sorted(MATRIX))
def test_helm_lint(case):
    proc = helm("lint", "--strict", str(CHART), "--namespace", NAMESPACE, *set_args(MATRIX[case]), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("case", sorted(MATRIX))
def test_every_rendering_is_restricted_and_labelled(case):
    docs = render(MATRIX[case])
    dep = deployment(docs)
    spec = dep["spec"]["template"]["spec"]
    assert_restricted(spec)
    c = container(docs)
    assert c["command"] == ["qwen-operator"]
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/tmp"}
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"health": 8080, "metrics": 9090}
    assert "--liveness=http://0.0.0.0:8080/healthz" in c["args"] and "--metrics-port=9090" in c["args"]
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    for d in docs:
        assert d["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE, d["kind"]
        if d["kind"] not in ("ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering", "ClusterTrainingRuntime"):
            assert d["metadata"].get("namespace"), f"{d['kind']} {d['metadata']['name']} has no namespace"


# ------------------------------------------------------------------------------------------ RBAC scopes

def test_cluster_scope_uses_a_cluster_role_with_exactly_the_operators_verbs():
    docs = render()
    (role,) = operator_role_docs(docs)
    assert role["kind"] == "ClusterRole"
    assert rules_of(role) == OPERATOR_RULES | SCANNING_RULES
    assert one(docs, "ClusterRoleBinding")["roleRef"]["name"] == role["metadata"]["name"]
    assert "--all-namespaces" in container(docs)["args"] and "--standalone" in container(docs)["args"]
    assert not of_kind(docs, "ClusterKopfPeering") and not of_kind(docs, "KopfPeering")
    operator_roles = [r for r in of_kind(docs, "Role") if r["metadata"]["name"] == role["metadata"]["name"]]
    assert not operator_roles


def test_namespace_scope_uses_a_role_and_nothing_cluster_wide_for_the_operator():
    docs = render({"watch.scope": "namespace", "rbac.aggregateToDefaultRoles": False})
    (role,) = operator_role_docs(docs)
    assert role["kind"] == "Role" and role["metadata"]["namespace"] == NAMESPACE
    assert rules_of(role) == OPERATOR_RULES
    assert not of_kind(docs, "ClusterRole") and not of_kind(docs, "ClusterRoleBinding")
    assert f"--namespace={NAMESPACE}" in container(docs)["args"]
    assert "--all-namespaces" not in container(docs)["args"]


def test_namespace_list_gets_one_role_per_namespace():
    docs = render(MATRIX["namespaces"])
    roles = operator_role_docs(docs)
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert all(r["kind"] == "Role" and rules_of(r) == OPERATOR_RULES for r in roles)
    bindings = [b for b in of_kind(docs, "RoleBinding") if b["roleRef"]["name"] == roles[0]["metadata"]["name"]]
    assert {b["metadata"]["namespace"] for b in bindings} == {"team-a", "team-b"}
    args = container(docs)["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args
    # No operator ClusterRole; the aggregated user roles are the only cluster-scoped RBAC.
    assert {r["metadata"]["name"] for r in of_kind(docs, "ClusterRole")} == {f"{RELEASE}-qwen-training-operator-edit",
                                                                           f"{RELEASE}-qwen-training-operator-view"}
    assert not of_kind(docs, "ClusterRoleBinding")


def test_ha_cluster_scope_runs_peering():
    docs = render({"replicas": 2})
    dep = deployment(docs)
    assert dep["spec"]["replicas"] == 2
    args = container(docs)["args"]
    peering = one(docs, "ClusterKopfPeering")
    assert f"--peering={peering['metadata']['name']}" in args and "--standalone" not in args
    assert "--peering-lifetime=60" in args
    (role,) = operator_role_docs(docs)
    assert rules_of(role) == OPERATOR_RULES | SCANNING_RULES | CLUSTER_PEERING_RULES


def test_ha_namespaced_runs_one_peering_per_namespace():
    docs = render(MATRIX["namespaces-ha"] | {"operator.peering.name": "qwen-peers"})
    peerings = of_kind(docs, "KopfPeering")
    assert sorted((p["metadata"]["namespace"], p["metadata"]["name"]) for p in peerings) == \
        [("team-a", "qwen-peers"), ("team-b", "qwen-peers")]
    assert "--peering=qwen-peers" in container(docs)["args"]
    for role in operator_role_docs(docs):
        assert rules_of(role) == OPERATOR_RULES | NAMESPACED_PEERING_RULES


def test_trainer_service_account_and_role_in_every_job_namespace():
    for values, namespaces in (({}, {NAMESPACE}),
                               (MATRIX["namespaces"], {"team-a", "team-b"}),
                               ({"trainer.serviceAccount.namespaces": ["ml", "ml2"]}, {"ml", "ml2"}),
                               ({"trainer.serviceAccount.name": "runner"}, {NAMESPACE})):
        docs = render(values)
        name = values.get("trainer.serviceAccount.name", "qwen-trainer")
        sas = [s for s in of_kind(docs, "ServiceAccount") if s["metadata"]["name"] == name]
        assert {s["metadata"]["namespace"] for s in sas} == namespaces
        roles = [r for r in of_kind(docs, "Role") if r["metadata"]["name"] == f"{name}-status"]
        assert {r["metadata"]["namespace"] for r in roles} == namespaces
        assert all(rules_of(r) == TRAINER_RULES for r in roles)
        for b in (b for b in of_kind(docs, "RoleBinding") if b["metadata"]["name"] == f"{name}-status"):
            assert b["subjects"] == [{"kind": "ServiceAccount", "name": name, "namespace": b["metadata"]["namespace"]}]
    docs = render({"trainer.serviceAccount.create": False})
    assert not [s for s in of_kind(docs, "ServiceAccount") if s["metadata"]["name"] == "qwen-trainer"]


def test_rbac_off_renders_no_rbac_and_uses_the_given_service_account():
    docs = render(MATRIX["no-rbac"])
    assert not [d for d in docs if d["apiVersion"].startswith("rbac.authorization.k8s.io")]
    assert not of_kind(docs, "ServiceAccount")
    assert deployment(docs)["spec"]["template"]["spec"]["serviceAccountName"] == "mine"


def test_aggregated_user_roles():
    docs = render()
    edit = one(docs, "ClusterRole", f"{RELEASE}-qwen-training-operator-edit")
    view = one(docs, "ClusterRole", f"{RELEASE}-qwen-training-operator-view")
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert rules_of(view)[("training.qwen.dev", "qwentrainingjobs")] == {"get", "list", "watch"}


def test_operator_client_calls_are_granted():
    """Every kubernetes-client call in qwen_operator is known, and the chart grants what it needs."""
    source = "\n".join(p.read_text() for p in (ROOT / "operator" / "qwen_operator").rglob("*.py"))
    calls = set(re.findall(r"\.(?:custom|core|apps|batch|rbac|coordination|events)\.([a-z_]+)\(", source))
    unknown = calls - set(CLIENT_CALLS)
    assert not unknown, f"API calls the chart's RBAC does not account for yet: {sorted(unknown)}"
    # Each job API's rules grant every call on the resources that API uses (the other API's are never called).
    other = {"pytorchjob": {("trainer.kubeflow.org", "trainjobs"), ("jobset.x-k8s.io", "jobsets")},
             "trainjob": {("kubeflow.org", "pytorchjobs")}}
    granted = OPERATOR_RULES
    for api, rules in (("pytorchjob", OPERATOR_RULES), ("trainjob", TRAINJOB_RULES)):
        for call in calls:
            for group, resource, verb in CLIENT_CALLS[call]:
                if (group, resource) not in other[api]:
                    assert verb in rules.get((group, resource), set()), (api, call, group, resource, verb)
    # The child watch each job API registers (qwen_operator.handlers.watch_children).
    from qwen_operator import handlers
    for api, rules in (("pytorchjob", OPERATOR_RULES), ("trainjob", TRAINJOB_RULES)):
        (group, _, plural), _fn = handlers._CHILD_WATCHES[api]
        assert {"list", "watch"} <= rules[(group, plural)], api
    # ... and Kueue's Workloads of the children (the Queued condition), for either API; discovery of the Kueue
    # and child APIs (kube.api_served) is open to every authenticated user.
    from qwen_operator import kueue_status
    for rules in (OPERATOR_RULES, TRAINJOB_RULES):
        assert {"get", "list", "watch"} <= rules[(kueue_status.WORKLOAD_GROUP, kueue_status.WORKLOAD_PLURAL)]
    # kopf watches every resource a handler is registered for.
    for group, plural in re.findall(r"@kopf\.on\.(?:event|create|update|resume|delete|field)\(\s*"
                                    r"(GROUP|\"[a-z.]*\"),\s*(?:VERSION|\"v1\"),\s*(PLURAL|\"[a-z]+\")", source):
        key = ("training.qwen.dev", "qwentrainingjobs") if group == "GROUP" else (group.strip('"'), plural.strip('"'))
        assert {"list", "watch"} <= granted[key], key


def test_trainjob_api_grants_trainjobs_and_not_pytorchjobs():
    docs = render({"jobApi": "trainjob"})
    (role,) = operator_role_docs(docs)
    assert rules_of(role) == TRAINJOB_RULES | SCANNING_RULES
    args = container(docs)["args"]
    assert "--job-api=trainjob" in args and "--trainjob-runtime=qwen-torch-distributed" in args
    docs = render({"jobApi": "trainjob", "watch.scope": "namespaces", "watch.namespaces": ["team-a", "team-b"]})
    roles = operator_role_docs(docs)
    assert len(roles) == 2 and all(rules_of(r) == TRAINJOB_RULES for r in roles)


def test_pytorchjob_api_is_the_default_and_ships_no_runtime():
    docs = render()
    assert "--job-api=pytorchjob" in container(docs)["args"]
    assert not of_kind(docs, "ClusterTrainingRuntime")


def test_cluster_training_runtime_for_trainjob_or_on_request():
    from qwen_operator import render as r

    for values in ({"jobApi": "trainjob"}, {"trainJob.runtime.create": True}):
        runtime = one(render(values), "ClusterTrainingRuntime")
        assert runtime["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
        assert runtime["metadata"]["name"] == r.DEFAULT_RUNTIME and "namespace" not in runtime["metadata"]
        assert runtime["spec"]["mlPolicy"] == {"numNodes": 1, "torch": {}}
        (job,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
        assert job["name"] == r.TRAINJOB_NODE
        assert job["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
        (c,) = job["template"]["spec"]["template"]["spec"]["containers"]
        assert c["name"] == r.TRAINJOB_NODE and c["image"] == "ghcr.io/qwen-k8s/trainer-gpu:0.1.0"
        # The PyTorchJob's command line, with the process count the Trainer injects.
        expected = [a if not a.startswith("--nproc-per-node") else "--nproc-per-node=$(PET_NPROC_PER_NODE)"
                    for a in r.torchrun_command(8)]
        assert c["command"] == expected
        assert runtime["spec"]["template"]["spec"]["failurePolicy"] == {"maxRestarts": 3}
    runtime = one(render({"jobApi": "trainjob", "trainJob.runtime.name": "mine", "trainJob.runtime.maxRestarts": 0}),
                  "ClusterTrainingRuntime")
    assert runtime["metadata"]["name"] == "mine" and runtime["spec"]["template"]["spec"]["failurePolicy"] == \
        {"maxRestarts": 0}


def test_unknown_job_api_is_refused_by_the_schema():
    proc = helm("template", RELEASE, str(CHART), "--set", "jobApi=mpijob", check=False)
    assert proc.returncode != 0 and "jobApi" in proc.stderr


# ----------------------------------------------------------------------------------- metrics and tests

def test_metrics_service_and_optional_service_monitor():
    docs = render()
    svc = one(docs, "Service")
    assert svc["spec"]["ports"] == [{"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}]
    assert svc["spec"]["selector"] == deployment(docs)["spec"]["selector"]["matchLabels"]
    assert not of_kind(docs, "ServiceMonitor")
    docs = render(MATRIX["servicemonitor"])
    sm = one(docs, "ServiceMonitor")
    svc = one(docs, "Service")
    assert sm["metadata"]["labels"]["release"] == "prom"
    assert all(svc["metadata"]["labels"][k] == v for k, v in sm["spec"]["selector"]["matchLabels"].items())
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    proc = helm("template", RELEASE, str(CHART), *set_args({"metrics.serviceMonitor.enabled": True,
                                                            "metrics.service.enabled": False}), check=False)
    assert proc.returncode != 0 and "needs metrics.service.enabled" in proc.stderr


def test_helm_test_pod():
    docs = render()
    (pod,) = [d for d in of_kind(docs, "Pod") if d["metadata"]["annotations"].get("helm.sh/hook") == "test"]
    assert_restricted(pod["spec"])
    assert pod["spec"]["restartPolicy"] == "Never"
    script = pod["spec"]["containers"][0]["command"][-1]
    assert f"http://{RELEASE}-qwen-training-operator-metrics.{NAMESPACE}.svc:9090" in script and "/readyz" in script
    assert not [d for d in render({"tests.enabled": False}) if d["kind"] == "Pod"]


def test_custom_image_tag_and_digest():
    assert container(render(MATRIX["custom-image"]))["image"] == "registry.example.com:5000/qwen/op:dev-1"
    digest = "sha256:" + "a" * 64
    assert container(render({"image.digest": digest}))["image"] == f"ghcr.io/qwen-k8s/operator@{digest}"
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert container(render())["image"] == f"ghcr.io/qwen-k8s/operator:{chart['appVersion']}"
    spec = deployment(render(MATRIX["custom-image"]))["spec"]["template"]["spec"]
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]


def test_operator_flags_follow_values():
    c = container(render({"operator.logFormat": "plain", "operator.logLevel": "debug", "operator.workers": 4,
                          "operator.healthPort": 8081, "operator.metricsPort": 9191,
                          "operator.extraArgs": ["--verbose"]}))
    args = c["args"]
    for flag in ("--log-format=plain", "--debug", "--workers=4", "--liveness=http://0.0.0.0:8081/healthz",
                 "--metrics-port=9191", "--verbose"):
        assert flag in args
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"health": 8081, "metrics": 9191}


def test_operator_accepts_the_charts_flags():
    """The flags the chart passes parse with the operator's own parser (no kopf run)."""
    config = pytest.importorskip("qwen_operator.config")
    for values in ({}, MATRIX["namespaces-ha"], {"operator.logLevel": "debug"}):
        cfg = config.from_args(container(render(values))["args"], env={})
        if values.get("watch.scope") == "namespaces":
            assert cfg.namespaces == ["team-a", "team-b"] and cfg.peering and not cfg.standalone
        else:
            assert cfg.namespaces == [] and cfg.standalone


# ------------------------------------------------------------------------------------------ the schema

BAD_VALUES = [
    ({"replicas": -1}, "replicas"),
    ({"replicas": "two"}, "replicas"),
    ({"watch.scope": "bogus"}, "scope"),
    ({"watch.scope": "namespaces"}, "namespaces"),
    ({"watch.namespaces": ["a"]}, "namespaces"),
    ({"watch.scope": "namespaces", "watch.namespaces": ["Not_A_Namespace"]}, "namespaces"),
    ({"colour": "blue"}, "colour"),
    ({"image.pullPolicy": "Sometimes"}, "pullPolicy"),
    ({"image.digest": "md5:abc"}, "digest"),
    ({"operator.logFormat": "xml"}, "logFormat"),
    ({"operator.metricsPort": 70000}, "metricsPort"),
    ({"operator.workers": 0}, "workers"),
    ({"podSecurityContext.runAsUser": 0}, "runAsUser"),
    ({"metrics.serviceMonitor.interval": "soon"}, "interval"),
    ({"resources.limits.gpu": 1}, "gpu"),
    ({"trainer.serviceAccount.unknown": True}, "unknown"),
]


@pytest.mark.parametrize("values,field", BAD_VALUES, ids=[str(v) for v, _ in BAD_VALUES])
def test_schema_refuses_bad_values(values, field):
    proc = helm("template", RELEASE, str(CHART), *set_args(values), check=False)
    assert proc.returncode != 0, f"accepted {values}"
    assert "values don't meet the specifications of the schema" in proc.stderr, proc.stderr
    assert field in proc.stderr, proc.stderr


# -------------------------------------------------------------------------------------- generated files

def test_chart_crd_is_the_generated_crd_byte_for_byte():
    chart_crd = (CHART / "crds" / "qwentrainingjobs.training.qwen.dev.yaml").read_bytes()
    assert chart_crd == (ROOT / "manifests" / "crd" / "qwentrainingjobs.training.qwen.dev.yaml").read_bytes(), \
        "run tools/render-manifests.sh"


def test_chart_peering_crds_are_the_operators():
    peering = pytest.importorskip("qwen_operator.peering")
    docs = [d for d in yaml.safe_load_all((CHART / "crds" / "kopfpeerings.kopf.dev.yaml").read_text()) if d]
    assert docs == peering.peering_crds(), "run tools/render-manifests.sh"


def test_only_crds_in_crds_dir():
    for path in (CHART / "crds").iterdir():
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] == "CustomResourceDefinition", path


def test_plain_install_manifest_is_fresh():
    require_helm()
    proc = subprocess.run([str(ROOT / "tools" / "render-manifests.sh"), "--check"], capture_output=True, text=True,
                          env=dict(os.environ, HELM=HELM), timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_plain_install_manifest_contents():
    docs = [d for d in yaml.safe_load_all((ROOT / "manifests" / "install" / "qwen-training-operator.yaml").read_text())
            if d]
    kinds = [d["kind"] for d in docs]
    assert kinds[0] == "Namespace" and docs[0]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    crds = {d["metadata"]["name"] for d in docs if d["kind"] == "CustomResourceDefinition"}
    assert crds == {"qwentrainingjobs.training.qwen.dev", "kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev"}
    assert "Pod" not in kinds  # no helm test hook in the plain install
    assert {"Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Service"} <= set(kinds)
