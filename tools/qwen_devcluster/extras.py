"""Opt-in controllers for the dev cluster: Kubeflow Trainer v2, JobSet and Kueue.

Built only on request (``tools/build-controlplane.sh --with-extras`` or ``--only jobset`` ...) into
the same bin dir as the default components, with their CRDs in ``crds/<extra>/`` and their webhook
manifests in ``webhooks/<extra>.yaml`` (both copied from the module zips).

Each runs out of cluster like the training-operator: the admin kubeconfig, leader election off,
metrics off, a free health-probe port (``/readyz``) and a free webhook port on 127.0.0.1, with the
upstream internal cert management (which wants a Service and a Secret in cluster) turned off.
Webhooks stay ON, as in production, but served with the harness's self-signed certificate for
127.0.0.1 (the shared ``/tmp/k8s-webhook-server/serving-certs`` that controller-runtime reads by
default) and registered by the harness as Mutating/ValidatingWebhookConfigurations whose
``clientConfig`` is a ``url`` (https://127.0.0.1:<port><path>) with that certificate as
``caBundle`` instead of the in-cluster Service. Kueue's webhooks are limited to its own kinds and
the enabled integrations (batch/job, JobSet, TrainJob, and PyTorchJob where the training-operator runs), and the pod webhooks to the pods those
controllers own, so a stopped extra never blocks the rest of the cluster's pods.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:  # pragma: no cover
    from .cluster import Cluster

HOST = "127.0.0.1"
# Kueue reads its metrics serving certificate from this fixed path whenever its internal cert
# management is off, even with metrics disabled (kueue v0.17.0 cmd/kueue/main.go), and exits
# without it. The harness writes a self-signed pair there (removed by the last cluster to stop).
KUEUE_METRICS_CERT_DIR = Path("/etc/kueue/metrics/certs")

# start order: JobSet first (Trainer v2 creates JobSets, Kueue integrates with both).
EXTRAS: dict[str, str] = {
    "jobset": "jobset-controller-manager",
    "trainer-v2": "trainer-controller-manager",
    "kueue": "kueue-controller-manager",
}
NAMESPACES = {"jobset": "jobset-system", "trainer-v2": "kubeflow-system", "kueue": "kueue-system"}
KUEUE_FRAMEWORKS = ["batch/job", "jobset.x-k8s.io/jobset", "trainer.kubeflow.org/trainjob"]
# Also enabled where the training-operator runs (its PyTorchJob CRD is installed before the extras start).
KUEUE_PYTORCHJOB = "kubeflow.org/pytorchjob"
# Kueue webhook paths kept: its own kinds and the enabled integrations.
_KUEUE_PATH_KEEP = ("kueue-x-k8s-io", "batch-v1-job", "jobset-x-k8s-io", "trainer-kubeflow-org")
_KUEUE_PYTORCHJOB_PATH = "kubeflow-org-v1-pytorchjob"
_POD_SELECTORS = {
    "jobset": {"matchExpressions": [{"key": "jobset.sigs.k8s.io/jobset-name", "operator": "Exists"}]},
}


def order(extras: list[str] | tuple[str, ...]) -> list[str]:
    unknown = [e for e in extras if e not in EXTRAS]
    if unknown:
        raise ValueError(f"unknown extra controller(s) {unknown}; known: {', '.join(EXTRAS)}")
    return [e for e in EXTRAS if e in extras]


def missing(assets: Path, extras: list[str]) -> list[str]:
    out = []
    for e in extras:
        b = assets / "bin" / EXTRAS[e]
        if not b.is_file():
            out.append(f"bin/{EXTRAS[e]}")
        if not list((assets / "crds" / e).glob("*.yaml")):
            out.append(f"crds/{e}/*.yaml")
        if not (assets / "webhooks" / f"{e}.yaml").is_file():
            out.append(f"webhooks/{e}.yaml")
    return out


def crd_docs(assets: Path, extra: str) -> list[dict[str, Any]]:
    docs = []
    for f in sorted((assets / "crds" / extra).glob("*.yaml")):
        for d in yaml.safe_load_all(f.read_text()):
            if d and d.get("kind") == "CustomResourceDefinition":
                d.get("metadata", {}).pop("creationTimestamp", None)
                docs.append(d)
    return docs


def config(extra: str, probe_port: int, webhook_port: int, status_port: int, namespace: str,
           pytorchjob: bool = False) -> dict[str, Any]:
    """The controller's Configuration file (leader election and internal cert management off); `pytorchjob`
    turns on Kueue's PyTorchJob integration."""
    if extra == "jobset":
        return {"apiVersion": "config.jobset.x-k8s.io/v1alpha1", "kind": "Configuration",
                "leaderElection": {"leaderElect": False},
                "internalCertManagement": {"enable": False},
                "health": {"healthProbeBindAddress": f"{HOST}:{probe_port}"},
                "metrics": {"bindAddress": "0"},
                "webhook": {"port": webhook_port, "host": HOST}}
    if extra == "trainer-v2":
        return {"apiVersion": "config.trainer.kubeflow.org/v1alpha1", "kind": "Configuration",
                "health": {"healthProbeBindAddress": f"{HOST}:{probe_port}", "readinessEndpointName": "readyz",
                           "livenessEndpointName": "healthz"},
                "metrics": {"bindAddress": "0", "secureServing": False},
                "webhook": {"port": webhook_port, "host": HOST},
                "leaderElection": {"leaderElect": False, "resourceName": "trainer.kubeflow.org",
                                   "resourceNamespace": namespace},
                "certManagement": {"enable": False},
                "statusServer": {"port": status_port},
                "clientConnection": {"qps": 50, "burst": 100}}
    if extra == "kueue":
        return {"apiVersion": "config.kueue.x-k8s.io/v1beta2", "kind": "Configuration",
                "namespace": namespace,
                "health": {"healthProbeBindAddress": f"{HOST}:{probe_port}"},
                "metrics": {"bindAddress": "0"},
                "webhook": {"port": webhook_port, "host": HOST},
                "leaderElection": {"leaderElect": False},
                "internalCertManagement": {"enable": False},
                "clientConnection": {"qps": 50, "burst": 100},
                "integrations": {"frameworks": KUEUE_FRAMEWORKS + ([KUEUE_PYTORCHJOB] if pytorchjob else [])},
                # The on-demand visibility API is an aggregated API server wanting its own
                # certificate at a fixed path (/visibility); admission does not need it.
                "featureGates": {"VisibilityOnDemand": False}}
    raise ValueError(extra)


def webhook_configs(assets: Path, extra: str, port: int, ca_bundle_b64: str,
                    pytorchjob: bool = False) -> list[dict[str, Any]]:
    """The upstream webhook configurations pointed at https://127.0.0.1:<port> with our caBundle."""
    keep = _KUEUE_PATH_KEEP + ((_KUEUE_PYTORCHJOB_PATH,) if pytorchjob else ())
    out = []
    for d in yaml.safe_load_all((assets / "webhooks" / f"{extra}.yaml").read_text()):
        if not d or d.get("kind") not in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"):
            continue
        d = copy.deepcopy(d)
        short = "mutating" if d["kind"].startswith("Mutating") else "validating"
        d["metadata"] = {"name": f"qwen-dev-{extra}-{short}", "labels": {"qwen.test/devcluster-extra": extra}}
        hooks = []
        for w in d.get("webhooks") or []:
            path = ((w.get("clientConfig") or {}).get("service") or {}).get("path", "/")
            if extra == "kueue" and not any(k in path for k in keep):
                continue
            if path.endswith("--v1-pod"):
                if extra not in _POD_SELECTORS:
                    continue
                w["objectSelector"] = _POD_SELECTORS[extra]
            w["clientConfig"] = {"url": f"https://{HOST}:{port}{path}", "caBundle": ca_bundle_b64}
            hooks.append(w)
        if hooks:
            d["webhooks"] = hooks
            out.append(d)
    return out


def start(c: "Cluster", assets: Path, extras: list[str], ca_bundle_b64: str, timeout: float,
          die_with_parent: bool) -> None:
    """Install CRDs, start each extra, wait for /readyz, then register its webhooks."""
    from kubernetes import client as k

    from .cluster import ClusterStartError, _http_ok, create, free_port

    core, adm = k.CoreV1Api(c.client()), k.AdmissionregistrationV1Api(c.client())
    pytorchjob = any(p.name == "training-operator" for p in c.procs)
    for e in order(extras):
        c.install_crds(crd_docs(assets, e), timeout)
        ns = NAMESPACES[e]
        create(lambda: core.create_namespace({"metadata": {"name": ns}}))
        for port in ("probe", "webhook", "status"):
            c.ports[f"{e}-{port}"] = free_port()
        cfg_path = c.state_dir / f"{e}-config.yaml"
        cfg_path.write_text(yaml.safe_dump(config(e, c.ports[f"{e}-probe"], c.ports[f"{e}-webhook"],
                                                  c.ports[f"{e}-status"], ns, pytorchjob), sort_keys=False))
        if e == "kueue" and not (KUEUE_METRICS_CERT_DIR / "tls.crt").exists():
            from . import pki
            try:
                KUEUE_METRICS_CERT_DIR.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise ClusterStartError(e, f"kueue needs a certificate at {KUEUE_METRICS_CERT_DIR} "
                                           f"(hard-coded upstream) and it cannot be created: {err}")
            pki.self_signed(KUEUE_METRICS_CERT_DIR / "tls.crt", KUEUE_METRICS_CERT_DIR / "tls.key",
                            "kueue-metrics", [f"IP:{HOST}", "DNS:localhost"])
            c.created_extra_dirs.append(str(KUEUE_METRICS_CERT_DIR.parent.parent))
        proc = c._spawn(e, [str(c.bin_dir / EXTRAS[e]), f"--config={cfg_path}", f"--kubeconfig={c.kubeconfig}"],
                        {"POD_NAMESPACE": ns}, die_with_parent)
        c.save()
        c._wait(e, lambda: _http_ok(f"http://{HOST}:{c.ports[f'{e}-probe']}/readyz"), timeout, "/readyz")
        for wh in webhook_configs(assets, e, c.ports[f"{e}-webhook"], ca_bundle_b64, pytorchjob):
            kind = "mutating" if wh["kind"].startswith("Mutating") else "validating"
            name = wh["metadata"]["name"]
            try:
                if create(lambda: getattr(adm, f"create_{kind}_webhook_configuration")(wh)) is None:
                    getattr(adm, f"replace_{kind}_webhook_configuration")(name, wh)
            except k.ApiException as err:
                raise ClusterStartError(e, f"registering {name} -> HTTP {err.status}: {str(err.body)[:300]}",
                                        proc.log)
        c.save()
