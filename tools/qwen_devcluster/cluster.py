"""Start, inspect and stop the local control plane (see the package docstring for the conventions)."""

from __future__ import annotations

import base64
import ctypes
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from . import binaries, extras as extras_mod, pki

HOST = "127.0.0.1"
NAME = "qwen-dev"  # the kwokctl cluster: <state dir>/clusters/qwen-dev (KWOK_WORKDIR is the state dir)
STATE_FILE = "state.json"
# The training-operator's cert-controller insists on this path (it is hard-coded upstream).
WEBHOOK_CERT_DIR = Path("/tmp/k8s-webhook-server/serving-certs")
OPERATOR_NAMESPACE = "kubeflow"

OUTCOME_ANNOTATION = "qwen.test/outcome"
DELAY_ANNOTATION = "qwen.test/delay"
EXIT_CODE_ANNOTATION = "qwen.test/exit-code"
REASON_ANNOTATION = "qwen.test/reason"  # the container's termination reason (default Error)
MESSAGE_ANNOTATION = "qwen.test/message"  # its termination message (what the trainer writes to /dev/termination-log)
NODE_LABEL = "qwen.test/fake-node"


class ClusterStartError(RuntimeError):
    """A component did not come up. ``component`` names it; the message ends with its log tail."""

    def __init__(self, component: str, reason: str, log: Path | None = None):
        self.component = component
        self.reason = reason
        self.log = log
        msg = f"{component} failed to start: {reason}"
        if log:
            msg += f"\n--- last lines of {log} ---\n{_tail(log)}"
        super().__init__(msg)


def _tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_bytes()[-16384:].decode(errors="replace").splitlines()[-lines:])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _proc_starttime(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else int(fields[19])


def _proc_mem_kib(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS) in KiB from /proc; (0, 0) when the process is gone."""
    rss = hwm = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    except OSError:
        pass
    return rss, hwm


def _other_training_operators(ours: list["Proc"]) -> bool:
    """Whether a training-operator of another cluster on this machine may still use the shared cert dirs."""
    mine = {p.pid for p in ours}
    names = (b"/training-operator.v1", *(b"/" + b.encode() for b in extras_mod.EXTRAS.values()))
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) in mine:
            continue
        try:
            argv0 = (d / "cmdline").read_bytes().split(b"\0", 1)[0]
        except OSError:
            continue
        if argv0.endswith(names):
            return True
    return False


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _http_ok(url: str) -> bool | str:
    """A health endpoint answers 200 (TLS not verified: the components serve self-signed certificates)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=2) as resp:
            return True if resp.status == 200 else f"HTTP {resp.status}"
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}"


@dataclass
class Proc:
    """A process the harness runs itself (the training-operator and the extras; kwokctl runs the rest)."""

    name: str
    argv: list[str]
    log: Path
    pid: int = 0
    starttime: int | None = None
    started_at: float = 0.0
    ready_s: float | None = None
    popen: subprocess.Popen | None = field(default=None, repr=False)

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return self.pid > 0 and _proc_starttime(self.pid) == self.starttime

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "argv": self.argv, "log": str(self.log), "pid": self.pid,
                "starttime": self.starttime, "ready_s": self.ready_s}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Proc":
        return cls(d["name"], d["argv"], Path(d["log"]), d["pid"], d["starttime"], 0.0, d.get("ready_s"))

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL, to the process group it leads."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            if not self.alive():
                break
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while self.alive() and time.monotonic() < deadline:
                time.sleep(0.05)
        if self.popen is not None:
            self.popen.wait()


class Cluster:
    """A running local control plane: kwokctl's cluster ``qwen-dev`` under ``state_dir``, plus the harness's processes.

    ``kubeconfig`` is kwokctl's admin kubeconfig (client certificate); ``server`` its URL.
    """

    def __init__(self, state_dir: Path, bin_dir: Path, owns_state_dir: bool):
        self.state_dir = state_dir
        self.bin_dir = bin_dir
        self.owns_state_dir = owns_state_dir
        self.workdir = state_dir / "clusters" / NAME
        self.logs_dir = self.workdir / "logs"
        self.kubeconfig = self.workdir / "kubeconfig.yaml"
        self.ca_file = self.workdir / "pki" / "ca.crt"
        self.ports: dict[str, int] = {}
        self.procs: list[Proc] = []
        self.server = ""
        self.startup_s: float | None = None
        self.created_webhook_cert_dir = False
        self.created_extra_dirs: list[str] = []  # fixed-path cert dirs made for the extras (see extras.py)
        self.nodes: list[str] = []
        self._client: Any = None
        self._watchdog: subprocess.Popen | None = None

    # ----------------------------------------------------------------- persistence
    def save(self) -> None:
        state = {"state_dir": str(self.state_dir), "bin_dir": str(self.bin_dir), "owns_state_dir": self.owns_state_dir,
                 "server": self.server, "ports": self.ports, "procs": [p.to_json() for p in self.procs],
                 "startup_s": self.startup_s, "created_webhook_cert_dir": self.created_webhook_cert_dir,
                 "nodes": self.nodes, "created_extra_dirs": self.created_extra_dirs}
        tmp = self.state_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_dir / STATE_FILE)

    @classmethod
    def load(cls, state_dir: Path) -> "Cluster":
        state = json.loads((Path(state_dir) / STATE_FILE).read_text())
        c = cls(Path(state["state_dir"]), Path(state["bin_dir"]), state["owns_state_dir"])
        c.server, c.ports, c.startup_s = state["server"], state["ports"], state["startup_s"]
        c.procs = [Proc.from_json(p) for p in state["procs"]]
        c.created_webhook_cert_dir = state["created_webhook_cert_dir"]
        c.nodes, c.created_extra_dirs = state["nodes"], state["created_extra_dirs"]
        return c

    # ----------------------------------------------------------------- kwokctl and the API
    def kwokctl(self, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
        """Run kwokctl on this cluster (its workdir is the state dir); output goes to <state dir>/kwokctl.log."""
        env = dict(os.environ, KWOK_WORKDIR=str(self.state_dir))
        env.pop("KUBECONFIG", None)
        with open(self.state_dir / "kwokctl.log", "ab") as log:
            return subprocess.run([str(self.bin_dir / "kwokctl"), *args], env=env, stdin=subprocess.DEVNULL,
                                  stdout=log, stderr=subprocess.STDOUT, timeout=timeout)

    def _delete_args(self) -> list[str]:
        return [str(self.bin_dir / "kwokctl"), "delete", "cluster", "--name", NAME,
                "--kubeconfig", str(self.kubeconfig)]

    def client(self) -> Any:
        """A ``kubernetes.client.ApiClient`` logged in as admin (shared; the caller must not close it)."""
        if self._client is None:
            from kubernetes import config

            self._client = config.new_client_from_config(config_file=str(self.kubeconfig))
        return self._client

    def _kwokctl_pids(self) -> dict[str, int]:
        """kwokctl's components (etcd, kube-apiserver, ..., kwok-controller) and their pids, from its pid files."""
        out = {}
        for f in sorted((self.workdir / "pids").glob("*.pid")):
            try:
                out[f.stem] = int(f.read_text().strip())
            except (OSError, ValueError):
                pass
        return out

    def _alive(self, name: str) -> bool:
        for p in self.procs:
            if p.name == name:
                return p.alive()
        pid = self._kwokctl_pids().get(name)
        return pid is not None and _proc_starttime(pid) is not None

    def _log(self, name: str) -> Path:
        return self.logs_dir / f"{name}.log"

    def _wait(self, name: str, check: Callable[[], bool | str], timeout: float, what: str) -> None:
        """Poll ``check`` until it returns True; fail fast if the component ``name`` dies."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        deadline, delay, last = time.monotonic() + timeout, 0.05, ""
        proc = next((p for p in self.procs if p.name == name), None)
        while True:
            if not self._alive(name):
                raise ClusterStartError(name, f"exited while waiting for {what}", self._log(name))
            try:
                res = check()
                if res is True:
                    if proc is not None:
                        proc.ready_s = round(time.monotonic() - proc.started_at, 3)
                    return
                last = str(res or "")
            except (OSError, ssl.SSLError, ValueError, ApiException, HTTPError) as e:  # not serving yet
                last = f"{type(e).__name__}: {str(e)[:300]}"
            if time.monotonic() > deadline:
                raise ClusterStartError(name, f"not ready after {timeout:.0f}s waiting for {what} ({last})",
                                        self._log(name))
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def _spawn(self, name: str, argv: list[str], env: dict[str, str], die_with_parent: bool) -> Proc:
        log = self._log(name)
        full_env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
        full_env.update(env, KUBECONFIG=str(self.kubeconfig), TMPDIR="/tmp")
        with open(log, "ab") as fh:
            fh.write(f"# {' '.join(argv)}\n".encode())
            fh.flush()
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT, env=full_env,
                                     cwd=self.state_dir, start_new_session=True,
                                     preexec_fn=_die_with_parent if die_with_parent else None)
        p = Proc(name, argv, log, popen.pid, _proc_starttime(popen.pid), time.monotonic(), None, popen)
        self.procs.append(p)
        return p

    def install_crds(self, crds: list[dict[str, Any]], timeout: float) -> None:
        """Create the CRDs (an existing one is kept) and wait until the API server serves them all."""
        from kubernetes import client as k

        ext = k.ApiextensionsV1Api(self.client())
        for crd in crds:
            crd.get("metadata", {}).pop("creationTimestamp", None)
            create(lambda: ext.create_custom_resource_definition(crd, _preload_content=False))

        waiting = [crd["metadata"]["name"] for crd in crds]

        def established() -> bool | str:  # read as JSON: a CRD's schema is slow to turn into client models
            while waiting:
                live = json.loads(ext.read_custom_resource_definition(waiting[0], _preload_content=False).data)
                if not any(c["type"] == "Established" and c["status"] == "True"
                           for c in live.get("status", {}).get("conditions") or []):
                    return f"{waiting[0]} not Established"
                waiting.pop(0)
            return True

        self._wait("kube-apiserver", established, timeout, "the CRDs to be Established")

    # ----------------------------------------------------------------- measurements
    def measure(self) -> dict[str, Any]:
        """Start-up time and memory of every component (RSS now and peak, from /proc)."""
        comps = {}
        pids = [(n, pid, None) for n, pid in self._kwokctl_pids().items()]
        for name, pid, ready in pids + [(p.name, p.pid, p.ready_s) for p in self.procs]:
            alive = self._alive(name)
            rss, hwm = _proc_mem_kib(pid) if alive else (0, 0)
            comps[name] = {"pid": pid, "alive": alive, "ready_s": ready,
                           "rss_mib": round(rss / 1024, 1), "peak_rss_mib": round(hwm / 1024, 1)}
        return {"server": self.server, "kubeconfig": str(self.kubeconfig), "state_dir": str(self.state_dir),
                "startup_s": self.startup_s, "components": comps,
                "total_rss_mib": round(sum(c["rss_mib"] for c in comps.values()), 1),
                "total_peak_rss_mib": round(sum(c["peak_rss_mib"] for c in comps.values()), 1)}

    status = measure

    # ----------------------------------------------------------------- teardown
    # Everything the harness writes into a state dir; nothing else is ever deleted from it.
    _CREATED = ("clusters", "logs", "kwokctl.yaml", "kwokctl.log", STATE_FILE, STATE_FILE + ".tmp",
                *(f"{e}-config.yaml" for e in extras_mod.EXTRAS))

    def stop(self, keep_logs: bool = False) -> None:
        """Stop the harness's processes, then kwokctl's cluster, and remove what was created."""
        for p in reversed(self.procs):
            p.stop()
        if self._watchdog is not None:
            self._watchdog.kill()
            self._watchdog.wait()
            self._watchdog = None
        if self._client is not None:
            self._client.close()
            self._client = None
        if keep_logs and self.logs_dir.is_dir():
            shutil.copytree(self.logs_dir, self.state_dir / "logs", dirs_exist_ok=True)
        if self.workdir.exists():
            self.kwokctl(*self._delete_args()[1:], timeout=60)
        if not _other_training_operators(self.procs):
            if self.created_webhook_cert_dir:
                shutil.rmtree(WEBHOOK_CERT_DIR.parent, ignore_errors=True)
            for d in self.created_extra_dirs:
                shutil.rmtree(d, ignore_errors=True)
            self.created_webhook_cert_dir, self.created_extra_dirs = False, []
        for name in self._CREATED:
            path = self.state_dir / name
            if keep_logs and name in ("logs", "kwokctl.log"):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        try:
            self.state_dir.rmdir()  # only if nothing else is in it
        except OSError:
            pass

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ----------------------------------------------------------------- test helpers
    def set_pod_outcome(self, namespace: str, label_selector: str, outcome: str, delay: str | None = None,
                        exit_code: int | None = None, reason: str | None = None,
                        message: str | None = None) -> list[str]:
        """Annotate running pods so kwok finishes them (``succeed`` or ``fail``); returns the pod names."""
        from kubernetes import client as k

        ann = {OUTCOME_ANNOTATION: outcome, DELAY_ANNOTATION: delay, REASON_ANNOTATION: reason,
               EXIT_CODE_ANNOTATION: None if exit_code is None else str(exit_code), MESSAGE_ANNOTATION: message}
        patch = {"metadata": {"annotations": {a: v for a, v in ann.items() if v is not None}}}
        core = k.CoreV1Api(self.client())
        names = [p.metadata.name for p in core.list_namespaced_pod(namespace, label_selector=label_selector).items]
        for name in names:
            core.patch_namespaced_pod(name, namespace, patch)
        return names


def create(fn: Callable[[], Any]) -> Any:
    """Call a kubernetes client create; an object that already exists (409) is fine."""
    from kubernetes.client.exceptions import ApiException

    try:
        return fn()
    except ApiException as e:
        if e.status != 409:
            raise
        return None


# --------------------------------------------------------------------- configuration

def kwokctl_config(bins: Path, ports: dict[str, int], pki_dir: Path) -> dict[str, Any]:
    """kwokctl's binary runtime on the binaries built here, with the flags the tests rely on."""
    def args(**kv: str) -> list[dict[str, Any]]:
        return [{"key": k.replace("_", "-"), "value": v} for k, v in kv.items()]

    ca = str(pki_dir / "ca.crt")
    return {
        "apiVersion": "config.kwok.x-k8s.io/v1alpha1",
        "kind": "KwokctlConfiguration",
        "options": {
            "runtime": "binary", "bindAddress": HOST, "kubeAuthorization": True, "kubeAdmission": True,
            "nodeLeaseDurationSeconds": 40,
            "etcdBinary": str(bins / "etcd"), "kubeApiserverBinary": str(bins / "kube-apiserver"),
            "kubeControllerManagerBinary": str(bins / "kube-controller-manager"),
            "kubeSchedulerBinary": str(bins / "kube-scheduler"), "kwokControllerBinary": str(bins / "kwok"),
            "etcdPort": ports["etcd"], "etcdPeerPort": ports["etcd-peer"],
            "kubeApiserverPort": ports["kube-apiserver"],
            "kubeControllerManagerPort": ports["kube-controller-manager"],
            "kubeSchedulerPort": ports["kube-scheduler"], "kwokControllerPort": ports["kwok-controller"],
        },
        "componentsPatches": [
            {"name": "etcd", "extraArgs": args(unsafe_no_fsync="true", log_level="warn")},
            {"name": "kube-apiserver", "extraArgs": args(
                # Nodes would be created with a not-ready:NoSchedule taint that only the node lifecycle
                # controller lifts; that controller is off (kwok's heartbeats are not worth evictions under
                # CPU pressure).
                disable_admission_plugins="TaintNodesByCondition",
                service_cluster_ip_range="10.96.0.0/16", endpoint_reconciler_type="none",
                enable_priority_and_fairness="false", profiling="false",
                # Published for the delegated authentication of kcm and the scheduler (else they log the
                # missing bundle in a loop).
                requestheader_client_ca_file=ca, requestheader_username_headers="X-Remote-User",
                requestheader_group_headers="X-Remote-Group", requestheader_extra_headers_prefix="X-Remote-Extra-")},
            {"name": "kube-controller-manager", "extraArgs": args(
                controllers="*,-node-lifecycle-controller,-service-lb-controller,-node-route-controller,"
                            "-cloud-node-lifecycle-controller",
                leader_elect="false", profiling="false", cluster_signing_cert_file=ca,
                cluster_signing_key_file=str(pki_dir / "ca.key"))},
            {"name": "kube-scheduler", "extraArgs": args(leader_elect="false", profiling="false")},
            {"name": "kwok-controller", "extraArgs": args(cidr="10.244.0.0/16") + [
                {"key": "node-ip", "value": "10.0.0.1", "override": True}]},
        ],
    }


def kwok_config(stages_dir: Path) -> list[dict[str, Any]]:
    """kwok's stages: the stock node/pod stages and the test-driven outcome stages."""
    docs = [yaml.safe_load((stages_dir / name).read_text())
            for name in ("node-initialize.yaml", "node-heartbeat-with-lease.yaml", "pod-ready.yaml", "pod-delete.yaml")]

    # Stock "complete" for pods owned by a batch Job, unless the test chose an outcome.
    complete = yaml.safe_load((stages_dir / "pod-complete.yaml").read_text())
    complete["spec"]["selector"]["matchExpressions"].append(
        {"key": f'.metadata.annotations["{OUTCOME_ANNOTATION}"]', "operator": "DoesNotExist"})
    docs.append(complete)

    def outcome_stage(outcome: str, phase: str, reason: str, exit_code: str, message: str = "") -> dict[str, Any]:
        return {
            "apiVersion": "kwok.x-k8s.io/v1alpha1",
            "kind": "Stage",
            "metadata": {"name": f"qwen-pod-{outcome}"},
            "spec": {
                "resourceRef": {"apiGroup": "v1", "kind": "Pod"},
                "selector": {"matchExpressions": [
                    {"key": ".metadata.deletionTimestamp", "operator": "DoesNotExist"},
                    {"key": ".status.phase", "operator": "In", "values": ["Running"]},
                    {"key": f'.metadata.annotations["{OUTCOME_ANNOTATION}"]', "operator": "In", "values": [outcome]},
                ]},
                "delay": {"durationMilliseconds": 1000,
                          "durationFrom": {"expressionFrom": f'.metadata.annotations["{DELAY_ANNOTATION}"]'}},
                "next": {"statusTemplate": (
                    "{{ $now := Now }}\n"
                    "{{ $root := . }}\n"
                    "conditions:\n"
                    "- lastTransitionTime: {{ $now | Quote }}\n  status: \"False\"\n  type: Ready\n"
                    "  reason: PodCompleted\n"
                    "- lastTransitionTime: {{ $now | Quote }}\n  status: \"False\"\n  type: ContainersReady\n"
                    "  reason: PodCompleted\n"
                    "containerStatuses:\n"
                    "{{ range .spec.containers }}\n"
                    "- image: {{ .image | Quote }}\n"
                    "  name: {{ .name | Quote }}\n"
                    "  ready: false\n"
                    "  restartCount: 0\n"
                    "  started: false\n"
                    "  state:\n"
                    "    terminated:\n"
                    f"      exitCode: {exit_code}\n"
                    "      finishedAt: {{ $now | Quote }}\n"
                    f"      reason: {reason}\n"
                    + (f"      message: {message}\n" if message else "") +
                    "      startedAt: {{ $root.status.startTime | Quote }}\n"
                    "{{ end }}\n"
                    f"phase: {phase}\n"
                )},
            },
        }

    docs.append(outcome_stage("succeed", "Succeeded", "Completed", "0"))
    docs.append(outcome_stage(
        "fail", "Failed", f'{{{{ or (index $root.metadata.annotations "{REASON_ANNOTATION}") "Error" }}}}',
        f'{{{{ or (index $root.metadata.annotations "{EXIT_CODE_ANNOTATION}") "1" }}}}',
        f'{{{{ or (index $root.metadata.annotations "{MESSAGE_ANNOTATION}") "" | Quote }}}}'))
    return docs


def gpu_node(name: str, gpus: int, cpu: str, memory: str) -> dict[str, Any]:
    resources = {"cpu": cpu, "memory": memory, "pods": "110", "nvidia.com/gpu": str(gpus),
                 "ephemeral-storage": "1Ti"}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                       "kubernetes.io/role": "agent", "type": "kwok", NODE_LABEL: "true",
                       "nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
                       "nvidia.com/gpu.count": str(gpus)},
        },
        "spec": {"providerID": f"kwok://{name}"},
        "status": {"capacity": resources, "allocatable": dict(resources),
                   "nodeInfo": {"architecture": "amd64", "operatingSystem": "linux", "kubeletVersion": "fake",
                                "kubeProxyVersion": "fake", "containerRuntimeVersion": "kwok",
                                **dict.fromkeys(("bootID", "kernelVersion", "machineID", "osImage", "systemUUID"), "")}},
    }


# --------------------------------------------------------------------- start-up

def start_cluster(state_dir: str | Path | None = None, bin_dir: str | Path | None = None, *,
                  gpu_nodes: int = 4, gpus_per_node: int = 8, node_cpu: str = "96", node_memory: str = "1024Gi",
                  training_operator: bool = True, die_with_parent: bool = True, timeout: float = 90.0,
                  extras: list[str] | tuple[str, ...] = ()) -> Cluster:
    """kwokctl creates etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok; the harness adds
    the fake GPU nodes, the training-operator and the ``extras`` (``jobset``, ``trainer-v2``, ``kueue``; see
    ``extras.py``; built by ``tools/build-controlplane.sh --with-extras``).

    ``die_with_parent`` takes the whole cluster down when the calling process exits (right for pytest; the
    CLI's ``up`` turns it off so the cluster outlives the command).
    """
    t0 = time.monotonic()
    bins = Path(bin_dir) if bin_dir else binaries.bin_dir()
    gone = binaries.missing(bins)
    if gone:
        raise binaries.BinariesMissing(f"missing in {bins}: {', '.join(gone)} (run tools/build-controlplane.sh)")
    assets = binaries.assets_dir(bins)
    extras = extras_mod.order(list(extras))
    gone = extras_mod.missing(assets, extras)
    if gone:
        raise binaries.BinariesMissing(f"missing in {assets}: {', '.join(gone)} "
                                       "(run tools/build-controlplane.sh --with-extras)")
    if shutil.which("kubectl") is None:  # kwokctl asks kubectl whether the API server serves (or downloads one)
        raise binaries.BinariesMissing("kwokctl needs kubectl on PATH")

    owns = state_dir is None
    sd = Path(tempfile.mkdtemp(prefix="qwen-devcluster-")) if owns else Path(state_dir).resolve()
    if not owns:
        if (sd / STATE_FILE).exists():
            old = Cluster.load(sd)
            if any(old._alive(n) for n in [*old._kwokctl_pids(), *(p.name for p in old.procs)]):
                raise ClusterStartError("devcluster", f"a cluster is already running with state dir {sd}; stop it first")
            old.stop()
        sd.mkdir(parents=True, exist_ok=True)
    c = Cluster(sd, bins, owns)
    try:
        _start(c, assets, gpu_nodes, gpus_per_node, node_cpu, node_memory, training_operator, die_with_parent, timeout,
               extras)
    except BaseException as e:
        c.stop(keep_logs=not owns)
        from kubernetes.client.exceptions import ApiException

        if isinstance(e, ApiException):
            raise ClusterStartError("kube-apiserver", f"HTTP {e.status} {e.reason}: {str(e.body)[:500]}") from e
        raise
    c.startup_s = round(time.monotonic() - t0, 3)
    c.save()
    return c


def _start(c: Cluster, assets: Path, gpu_nodes: int, gpus_per_node: int, node_cpu: str, node_memory: str,
           training_operator: bool, die_with_parent: bool, timeout: float, extras: list[str]) -> None:
    from kubernetes import client as k

    for name in ("etcd", "etcd-peer", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok-controller",
                 "operator-probe", "operator-webhook"):
        c.ports[name] = free_port()
    c.server = f"https://{HOST}:{c.ports['kube-apiserver']}"
    config = c.state_dir / "kwokctl.yaml"
    docs = [kwokctl_config(c.bin_dir, c.ports, c.workdir / "pki"), *kwok_config(assets / "kwok-stages")]
    config.write_text("---\n".join(yaml.safe_dump(d, sort_keys=False) for d in docs))
    if die_with_parent:
        # Whatever way this process ends, its side of the pipe closes and kwokctl deletes the cluster.
        env = dict(os.environ, KWOK_WORKDIR=str(c.state_dir))
        c._watchdog = subprocess.Popen(["sh", "-c", 'read _; exec "$@" >/dev/null 2>&1', "watchdog",
                                        *c._delete_args()], stdin=subprocess.PIPE, env=env, start_new_session=True)
    c.save()

    # 1. kwokctl: PKI, kubeconfig, etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok
    done = c.kwokctl("--config", str(config), "create", "cluster", "--name", NAME, "--kubeconfig", "",
                     "--timeout", f"{int(timeout)}s", timeout=timeout + 30)
    if done.returncode != 0:
        raise ClusterStartError("kwokctl", f"create cluster exited with {done.returncode}", c.state_dir / "kwokctl.log")
    api = c.client()
    core = k.CoreV1Api(api)

    def readyz() -> bool | str:
        resp = api.call_api("GET", c.server + "/readyz", _request_timeout=5)
        resp.read()
        return True if resp.status == 200 else f"HTTP {resp.status}"

    c._wait("kube-apiserver", readyz, timeout, "/readyz")

    # 2. the fake GPU nodes (kwok makes them Ready), and the training-operator once its CRD is served
    for i in range(gpu_nodes):
        c.nodes.append(f"gpu-node-{i}")
        create(lambda: core.create_node(gpu_node(c.nodes[-1], gpus_per_node, node_cpu, node_memory)))
    if training_operator:
        create(lambda: core.create_namespace({"metadata": {"name": OPERATOR_NAMESPACE}}))
        # The cert-controller fills this Secret itself but refuses to create it.
        create(lambda: core.create_namespaced_secret(OPERATOR_NAMESPACE,
                                                     {"metadata": {"name": "training-operator-webhook-cert"}}))
        # Out of cluster nobody mounts the Secret; it only waits for a file to exist at a fixed path.
        _webhook_cert(c)
        # controller-runtime refuses to watch a kind the apiserver does not serve yet.
        c.install_crds([yaml.safe_load((assets / binaries.PYTORCHJOB_CRD).read_text())], timeout)
        c._spawn("training-operator", [
            str(c.bin_dir / "training-operator.v1"), f"--kubeconfig={c.kubeconfig}", "--enable-scheme=pytorchjob",
            "--metrics-bind-address=0", f"--health-probe-bind-address={HOST}:{c.ports['operator-probe']}",
            f"--webhook-server-port={c.ports['operator-webhook']}", "--leader-elect=false",
        ], {"MY_POD_NAMESPACE": OPERATOR_NAMESPACE}, die_with_parent)
    c.save()

    # 3. wait for each: the serviceaccount controller's work, the scheduler, kwok's nodes, the operator
    def default_sa() -> bool:
        core.read_namespaced_service_account("default", "default")
        return True

    c._wait("kube-controller-manager", default_sa, timeout, "the default ServiceAccount")
    c._wait("kube-scheduler", lambda: _http_ok(f"https://{HOST}:{c.ports['kube-scheduler']}/healthz"), timeout,
            "/healthz")

    def nodes_ready() -> bool | str:
        ready = [n for n in core.list_node(label_selector=f"{NODE_LABEL}=true").items
                 if any(cd.type == "Ready" and cd.status == "True" for cd in n.status.conditions or [])]
        return True if len(ready) == gpu_nodes else f"{len(ready)}/{gpu_nodes} nodes Ready"

    c._wait("kwok-controller", nodes_ready, timeout, f"{gpu_nodes} fake nodes to become Ready")
    if training_operator:
        c._wait("training-operator", lambda: _http_ok(f"http://{HOST}:{c.ports['operator-probe']}/readyz"), timeout,
                "/readyz")
    c.save()

    if extras:
        # The extras read the same controller-runtime default cert dir; the self-signed serving
        # certificate is also the caBundle of their webhook configurations.
        _webhook_cert(c)
        ca_b64 = base64.b64encode((WEBHOOK_CERT_DIR / "tls.crt").read_bytes()).decode()
        extras_mod.start(c, assets, extras, ca_b64, timeout, die_with_parent)


def _webhook_cert(c: Cluster) -> None:
    """The self-signed pair in the shared fixed dir (whichever cluster stops last removes it; see Cluster.stop)."""
    c.created_webhook_cert_dir = True
    if not (WEBHOOK_CERT_DIR / "tls.crt").exists():
        WEBHOOK_CERT_DIR.mkdir(parents=True, exist_ok=True)
        pki.self_signed(WEBHOOK_CERT_DIR / "tls.crt", WEBHOOK_CERT_DIR / "tls.key", "training-operator",
                        [f"IP:{HOST}", "DNS:localhost"])
