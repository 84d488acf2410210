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
        tail = _tail(log) if log else ""
        msg = f"{component} failed to start: {reason}"
        if log:
            msg += f"\n--- last lines of {log} ---\n{tail}"
        super().__init__(msg)


def _tail(path: Path | None, lines: int = 40) -> str:
    if path is None or not path.exists():
        return "(no log)"
    data = path.read_bytes()[-16384:].decode(errors="replace").splitlines()
    return "\n".join(data[-lines:])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _proc_starttime(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


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
    """Whether a training-operator of another cluster on this machine may still use the shared cert dir."""
    mine = {p.pid for p in ours}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) in mine:
            continue
        try:
            argv0 = (d / "cmdline").read_bytes().split(b"\0", 1)[0]
        except OSError:
            continue
        if argv0.endswith(b"/training-operator.v1") or any(
                argv0.endswith(b"/" + b.encode()) for b in extras_mod.EXTRAS.values()):
            return True
    return False


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Proc:
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
        if not self.alive():
            if self.popen is not None:
                self.popen.wait()
            return
        pgid = self.pid  # every component leads its own session / process group
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if self.popen is not None:
                    if self.popen.poll() is not None:
                        break
                elif not self.alive():
                    break
                time.sleep(0.05)
            else:
                continue
            break
        # Reap anything left in the group (none of the components fork, but be thorough).
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.popen is not None:
            self.popen.wait()


class Cluster:
    """A running local control plane.

    ``kubeconfig`` is an admin kubeconfig (token auth, CA embedded); ``server`` its URL.
    """

    def __init__(self, state_dir: Path, bin_dir: Path, owns_state_dir: bool):
        self.state_dir = state_dir
        self.bin_dir = bin_dir
        self.owns_state_dir = owns_state_dir
        self.logs_dir = state_dir / "logs"
        self.kubeconfig = state_dir / "kubeconfig"
        self.ports: dict[str, int] = {}
        self.procs: list[Proc] = []
        self.server = ""
        self.token = ""
        self.ca_file = state_dir / "pki" / "ca.crt"
        self.startup_s: float | None = None
        self.created_webhook_cert_dir = False
        self.created_extra_dirs: list[str] = []  # fixed-path cert dirs made for the extras (see extras.py)
        self.nodes: list[str] = []
        self._ssl: ssl.SSLContext | None = None

    # ----------------------------------------------------------------- persistence
    def save(self) -> None:
        state = {
            "state_dir": str(self.state_dir), "bin_dir": str(self.bin_dir), "owns_state_dir": self.owns_state_dir,
            "server": self.server, "kubeconfig": str(self.kubeconfig), "ports": self.ports,
            "procs": [p.to_json() for p in self.procs], "startup_s": self.startup_s,
            "created_webhook_cert_dir": self.created_webhook_cert_dir, "nodes": self.nodes,
            "created_extra_dirs": self.created_extra_dirs,
        }
        tmp = self.state_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_dir / STATE_FILE)

    @classmethod
    def load(cls, state_dir: Path) -> "Cluster":
        state = json.loads((Path(state_dir) / STATE_FILE).read_text())
        c = cls(Path(state["state_dir"]), Path(state["bin_dir"]), state["owns_state_dir"])
        c.server = state["server"]
        c.ports = state["ports"]
        c.procs = [Proc.from_json(p) for p in state["procs"]]
        c.startup_s = state["startup_s"]
        c.created_webhook_cert_dir = state["created_webhook_cert_dir"]
        c.nodes = state.get("nodes", [])
        c.created_extra_dirs = state.get("created_extra_dirs", [])
        kc = yaml.safe_load(c.kubeconfig.read_text())
        c.token = kc["users"][0]["user"]["token"]
        return c

    # ----------------------------------------------------------------- API access
    def _ctx(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context(cafile=str(self.ca_file))
        return self._ssl

    def api(self, method: str, path: str, body: Any = None, *, token: str | None = None,
            content_type: str = "application/json", timeout: float = 30.0) -> tuple[int, Any]:
        """A raw API call (status, decoded JSON or text). Used by the harness; tests should use a real client."""
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        req = urllib.request.Request(self.server + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {token or self.token}")
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, context=self._ctx(), timeout=timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def _must(self, component: str, method: str, path: str, body: Any = None, ok: tuple[int, ...] = (200, 201),
              **kw: Any) -> Any:
        status, out = self.api(method, path, body, **kw)
        if status not in ok:
            raise ClusterStartError(component, f"{method} {path} -> HTTP {status}: {str(out)[:500]}")
        return out

    # ----------------------------------------------------------------- processes
    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None, die_with_parent: bool = True) -> Proc:
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        log = self.logs_dir / f"{name}.log"
        full_env = dict(os.environ)
        full_env.pop("KUBECONFIG", None)
        full_env.update(env or {})
        with open(log, "ab") as fh:
            fh.write(f"# {' '.join(argv)}\n".encode())
            fh.flush()
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT, env=full_env,
                                     cwd=self.state_dir, start_new_session=True,
                                     preexec_fn=_die_with_parent if die_with_parent else None)
        p = Proc(name, argv, log, popen.pid, None, time.monotonic(), None, popen)
        p.starttime = _proc_starttime(popen.pid)
        self.procs.append(p)
        return p

    def _wait(self, proc: Proc, check: Callable[[], bool | str], timeout: float, what: str,
              record: bool = True) -> None:
        """Poll ``check`` until it returns True; fail fast if the process dies."""
        deadline = time.monotonic() + timeout
        last = ""
        delay = 0.05
        while True:
            if not proc.alive():
                code = proc.popen.poll() if proc.popen else "?"
                raise ClusterStartError(proc.name, f"exited with code {code} while waiting for {what}", proc.log)
            try:
                res = check()
                if res is True:
                    if not record:
                        return
                    proc.ready_s = round(time.monotonic() - proc.started_at, 3)
                    return
                last = str(res or "")
            except (OSError, ssl.SSLError, ValueError) as e:  # not listening yet, TLS not ready, ...
                last = f"{type(e).__name__}: {e}"
            if time.monotonic() > deadline:
                raise ClusterStartError(proc.name, f"not ready after {timeout:.0f}s waiting for {what} ({last})", proc.log)
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    @staticmethod
    def _http_ok(url: str, ctx: ssl.SSLContext | None = None, headers: dict[str, str] | None = None) -> bool | str:
        req = urllib.request.Request(url, headers=headers or {})
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=2) as resp:
                return True if resp.status == 200 else f"HTTP {resp.status}"
        except urllib.error.HTTPError as e:
            return f"HTTP {e.code}: {e.read()[:200]!r}"

    # ----------------------------------------------------------------- measurements
    def measure(self) -> dict[str, Any]:
        """Start-up times and memory of every component (RSS now and peak, from /proc)."""
        comps = {}
        total_rss = total_peak = 0
        for p in self.procs:
            rss, hwm = _proc_mem_kib(p.pid) if p.alive() else (0, 0)
            total_rss += rss
            total_peak += hwm
            comps[p.name] = {"pid": p.pid, "alive": p.alive(), "ready_s": p.ready_s,
                             "rss_mib": round(rss / 1024, 1), "peak_rss_mib": round(hwm / 1024, 1)}
        return {"server": self.server, "kubeconfig": str(self.kubeconfig), "state_dir": str(self.state_dir),
                "startup_s": self.startup_s, "components": comps,
                "total_rss_mib": round(total_rss / 1024, 1), "total_peak_rss_mib": round(total_peak / 1024, 1)}

    status = measure

    # ----------------------------------------------------------------- teardown
    def stop(self, keep_logs: bool = False) -> None:
        """Stop every process (reverse start order, whole process groups) and remove what was created."""
        for p in reversed(self.procs):
            p.stop()
        if self.created_webhook_cert_dir and not _other_training_operators(self.procs):
            shutil.rmtree(WEBHOOK_CERT_DIR.parent, ignore_errors=True)
            self.created_webhook_cert_dir = False
        if self.created_extra_dirs and not _other_training_operators(self.procs):
            for d in self.created_extra_dirs:
                shutil.rmtree(d, ignore_errors=True)
            self.created_extra_dirs = []
        self._remove_files(keep_logs)

    # Everything the harness writes into a state dir; nothing else is ever deleted from it.
    _CREATED = ("etcd", "pki", "logs", "kubeconfig", "controller-manager.kubeconfig", "scheduler.kubeconfig",
                "kwok.kubeconfig", "training-operator.kubeconfig", "kwok.yaml", STATE_FILE, STATE_FILE + ".tmp",
                *(f"{u}.kubeconfig" for u in extras_mod.USERS.values()),
                *(f"{e}-config.yaml" for e in extras_mod.EXTRAS))

    def _remove_files(self, keep_logs: bool) -> None:
        if not self.state_dir.exists():
            return
        for name in self._CREATED:
            if keep_logs and name == "logs":
                continue
            path = self.state_dir / name
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
        from urllib.parse import quote

        ann = {OUTCOME_ANNOTATION: outcome}
        if delay is not None:
            ann[DELAY_ANNOTATION] = delay
        if exit_code is not None:
            ann[EXIT_CODE_ANNOTATION] = str(exit_code)
        if reason is not None:
            ann[REASON_ANNOTATION] = reason
        if message is not None:
            ann[MESSAGE_ANNOTATION] = message
        pods = self._must("kube-apiserver", "GET",
                          f"/api/v1/namespaces/{namespace}/pods?labelSelector={quote(label_selector)}")
        names = []
        for item in pods["items"]:
            name = item["metadata"]["name"]
            self._must("kube-apiserver", "PATCH", f"/api/v1/namespaces/{namespace}/pods/{name}",
                       {"metadata": {"annotations": ann}}, content_type="application/merge-patch+json")
            names.append(name)
        return names


# --------------------------------------------------------------------- kwok configuration

def kwok_config(stages_dir: Path, node_lease_seconds: int = 40) -> str:
    """KwokConfiguration plus stages: kwok's stock node/pod stages and the test-driven outcome stages."""
    docs: list[dict[str, Any]] = [{
        "apiVersion": "config.kwok.x-k8s.io/v1alpha1",
        "kind": "KwokConfiguration",
        "options": {"nodeLeaseDurationSeconds": node_lease_seconds},
    }]
    for name in ("node-initialize.yaml", "node-heartbeat-with-lease.yaml", "pod-ready.yaml", "pod-delete.yaml"):
        docs.append(yaml.safe_load((stages_dir / name).read_text()))

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
    return "---\n".join(yaml.safe_dump(d, sort_keys=False) for d in docs)


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
                                "kubeProxyVersion": "fake", "containerRuntimeVersion": "kwok"}},
    }


def _kubeconfig(server: str, ca_pem: bytes, user: str, token: str) -> str:
    return json.dumps({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "qwen-dev", "cluster": {
            "server": server, "certificate-authority-data": base64.b64encode(ca_pem).decode()}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "qwen-dev", "context": {"cluster": "qwen-dev", "user": user}}],
        "current-context": "qwen-dev",
    }, indent=2) + "\n"


# --------------------------------------------------------------------- start-up

def start_cluster(state_dir: str | Path | None = None, bin_dir: str | Path | None = None, *,
                  gpu_nodes: int = 4, gpus_per_node: int = 8, node_cpu: str = "96", node_memory: str = "1024Gi",
                  training_operator: bool = True, die_with_parent: bool = True, timeout: float = 90.0,
                  extras: list[str] | tuple[str, ...] = ()) -> Cluster:
    """Start etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok and the training-operator.

    ``extras`` adds opt-in controllers (``jobset``, ``trainer-v2``, ``kueue``; see ``extras.py``), which
    must have been built (``tools/build-controlplane.sh --with-extras``).

    ``die_with_parent`` makes every component receive SIGTERM when the calling process exits (right for
    pytest; the CLI's ``up`` turns it off so the cluster outlives the command).
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

    owns = state_dir is None
    sd = Path(tempfile.mkdtemp(prefix="qwen-devcluster-")) if owns else Path(state_dir).resolve()
    if not owns:
        if (sd / STATE_FILE).exists():
            old = Cluster.load(sd)
            if any(p.alive() for p in old.procs):
                raise ClusterStartError("devcluster", f"a cluster is already running with state dir {sd}; stop it first")
            old.stop()
        sd.mkdir(parents=True, exist_ok=True)
    c = Cluster(sd, bins, owns)
    try:
        _start(c, assets, gpu_nodes, gpus_per_node, node_cpu, node_memory, training_operator, die_with_parent, timeout,
               extras)
    except BaseException:
        c.stop(keep_logs=not owns)
        raise
    c.startup_s = round(time.monotonic() - t0, 3)
    c.save()
    return c


def _start(c: Cluster, assets: Path, gpu_nodes: int, gpus_per_node: int, node_cpu: str, node_memory: str,
           training_operator: bool, die_with_parent: bool, timeout: float, extras: list[str] = ()) -> None:
    sd, b = c.state_dir, c.bin_dir
    spawn = lambda name, argv, env=None: c._spawn(name, argv, env, die_with_parent)  # noqa: E731
    ports = c.ports
    for name in ("etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler", "kwok", "operator-probe",
                 "operator-webhook"):
        ports[name] = free_port()
    c.server = f"https://{HOST}:{ports['apiserver']}"
    # Record the processes as soon as they exist, so `down` can always clean up.
    c.save()

    # 1. etcd
    etcd = spawn("etcd", [
        str(b / "etcd"), "--name=qwen-dev", f"--data-dir={sd / 'etcd'}",
        f"--listen-client-urls=http://{HOST}:{ports['etcd']}", f"--advertise-client-urls=http://{HOST}:{ports['etcd']}",
        f"--listen-peer-urls=http://{HOST}:{ports['etcd-peer']}",
        f"--initial-advertise-peer-urls=http://{HOST}:{ports['etcd-peer']}",
        f"--initial-cluster=qwen-dev=http://{HOST}:{ports['etcd-peer']}",
        "--unsafe-no-fsync=true", "--log-level=warn", "--quota-backend-bytes=2147483648",
    ])
    # PKI while etcd starts.
    p = pki.make_pki(sd / "pki", HOST)
    c.ca_file = p.ca_cert
    c.token = p.tokens["admin"]
    ca_pem = p.ca_cert.read_bytes()
    kubeconfigs = {}
    for user, fname in (("admin", "kubeconfig"), ("system:kube-controller-manager", "controller-manager.kubeconfig"),
                        ("system:kube-scheduler", "scheduler.kubeconfig"), ("kwok-controller", "kwok.kubeconfig"),
                        ("training-operator", "training-operator.kubeconfig"),
                        *((extras_mod.USERS[e], f"{extras_mod.USERS[e]}.kubeconfig") for e in extras)):
        path = sd / fname
        path.write_text(_kubeconfig(c.server, ca_pem, user, p.tokens[user]))
        path.chmod(0o600)
        kubeconfigs[user] = path

    def etcd_ready() -> bool | str:
        with urllib.request.urlopen(f"http://{HOST}:{ports['etcd']}/health", timeout=2) as resp:
            body = json.loads(resp.read())
        return True if body.get("health") == "true" else str(body)

    c._wait(etcd, etcd_ready, timeout, "/health")
    c.save()

    # 2. kube-apiserver
    api = spawn("kube-apiserver", [
        str(b / "kube-apiserver"),
        f"--etcd-servers=http://{HOST}:{ports['etcd']}",
        f"--bind-address={HOST}", f"--advertise-address={HOST}", f"--secure-port={ports['apiserver']}",
        f"--cert-dir={sd / 'pki' / 'apiserver-dir'}",
        f"--tls-cert-file={p.apiserver_cert}", f"--tls-private-key-file={p.apiserver_key}",
        f"--client-ca-file={p.ca_cert}", f"--token-auth-file={p.tokens_csv}",
        # Published in kube-system/extension-apiserver-authentication for the delegated authn of kcm and the
        # scheduler; without it they log an error for the missing bundle in a loop.
        f"--requestheader-client-ca-file={p.ca_cert}", "--requestheader-allowed-names=front-proxy-client",
        "--requestheader-username-headers=X-Remote-User", "--requestheader-group-headers=X-Remote-Group",
        "--requestheader-extra-headers-prefix=X-Remote-Extra-",
        "--authorization-mode=Node,RBAC",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        f"--service-account-key-file={p.sa_pub}", f"--service-account-signing-key-file={p.sa_key}",
        "--service-cluster-ip-range=10.96.0.0/16", "--allow-privileged=true",
        "--enable-priority-and-fairness=false", "--endpoint-reconciler-type=none", "--profiling=false",
        "--enable-garbage-collector=true", "--event-ttl=1h",
        # Nodes would be created with a not-ready:NoSchedule taint that only the node lifecycle controller
        # lifts; that controller is off (kwok's heartbeats are not worth evictions under CPU pressure).
        "--disable-admission-plugins=TaintNodesByCondition",
    ])
    c.save()
    ctx = c._ctx()
    c._wait(api, lambda: Cluster._http_ok(f"{c.server}/readyz", ctx, {"Authorization": f"Bearer {c.token}"}),
            timeout, "/readyz")

    # CRD and the training-operator's namespace/secret early, so the controllers can start together.
    if training_operator:
        crd = yaml.safe_load((assets / binaries.PYTORCHJOB_CRD).read_text())
        crd.get("metadata", {}).pop("creationTimestamp", None)
        c._must("kube-apiserver", "POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd,
                ok=(201, 409))
        c._must("kube-apiserver", "POST", "/api/v1/namespaces",
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": OPERATOR_NAMESPACE}}, ok=(201, 409))
        # The cert-controller fills this Secret itself but refuses to create it.
        c._must("kube-apiserver", "POST", f"/api/v1/namespaces/{OPERATOR_NAMESPACE}/secrets",
                {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "training-operator-webhook-cert"}},
                ok=(201, 409))
        # Out of cluster nobody mounts the Secret; it only waits for a file to exist at a fixed path.
        # Whichever cluster stops last removes it (see Cluster.stop).
        _webhook_cert(c)

    # 3-6. controllers: launched in order without waiting on each other, then waited on in order.
    common_auth = lambda kc: [f"--kubeconfig={kc}", f"--authentication-kubeconfig={kc}",  # noqa: E731
                              f"--authorization-kubeconfig={kc}",
                              "--authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics"]
    kcm_kc = kubeconfigs["system:kube-controller-manager"]
    kcm = spawn("kube-controller-manager", [
        str(b / "kube-controller-manager"), *common_auth(kcm_kc),
        f"--bind-address={HOST}", f"--secure-port={ports['controller-manager']}",
        f"--cert-dir={sd / 'pki' / 'controller-manager'}", "--leader-elect=false",
        "--controllers=*,-node-lifecycle-controller,-service-lb-controller,-node-route-controller,"
        "-cloud-node-lifecycle-controller",
        f"--service-account-private-key-file={p.sa_key}", f"--root-ca-file={p.ca_cert}",
        f"--cluster-signing-cert-file={p.ca_cert}", f"--cluster-signing-key-file={p.ca_key}",
        "--use-service-account-credentials=false", "--profiling=false",
    ])
    sched_kc = kubeconfigs["system:kube-scheduler"]
    sched = spawn("kube-scheduler", [
        str(b / "kube-scheduler"), *common_auth(sched_kc),
        f"--bind-address={HOST}", f"--secure-port={ports['scheduler']}", f"--cert-dir={sd / 'pki' / 'scheduler'}",
        "--leader-elect=false", "--profiling=false",
    ])
    (sd / "kwok.yaml").write_text(kwok_config(assets / "kwok-stages"))
    kwok = spawn("kwok", [
        str(b / "kwok"), f"--kubeconfig={kubeconfigs['kwok-controller']}", f"--config={sd / 'kwok.yaml'}",
        "--manage-all-nodes=true", "--cidr=10.244.0.0/16", "--node-ip=10.0.0.1",
        f"--server-address={HOST}:{ports['kwok']}",
    ])
    op = None
    if training_operator:
        # controller-runtime refuses to watch a kind the apiserver does not serve yet.
        def crd_established() -> bool | str:
            out = c._must("kube-apiserver", "GET",
                          "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/pytorchjobs.kubeflow.org")
            conds = (out.get("status") or {}).get("conditions") or []
            return True if any(x["type"] == "Established" and x["status"] == "True" for x in conds) else "not Established"

        c._wait(api, crd_established, timeout, "the PyTorchJob CRD to be Established", record=False)
        op = spawn("training-operator", [
            str(b / "training-operator.v1"), f"--kubeconfig={kubeconfigs['training-operator']}",
            "--enable-scheme=pytorchjob", "--metrics-bind-address=0",
            f"--health-probe-bind-address={HOST}:{ports['operator-probe']}",
            f"--webhook-server-port={ports['operator-webhook']}", "--leader-elect=false",
        ], {"MY_POD_NAMESPACE": OPERATOR_NAMESPACE, "TMPDIR": "/tmp",
            "KUBECONFIG": str(kubeconfigs["training-operator"])})
    c.save()

    insecure = ssl.create_default_context()
    insecure.check_hostname = False
    insecure.verify_mode = ssl.CERT_NONE

    def kcm_ready() -> bool | str:
        ok = Cluster._http_ok(f"https://{HOST}:{ports['controller-manager']}/healthz", insecure)
        if ok is not True:
            return ok
        # Functional check: the serviceaccount controller has created default/default.
        status, _ = c.api("GET", "/api/v1/namespaces/default/serviceaccounts/default")
        return True if status == 200 else "default ServiceAccount not created yet"

    c._wait(kcm, kcm_ready, timeout, "/healthz and the default ServiceAccount")
    c._wait(sched, lambda: Cluster._http_ok(f"https://{HOST}:{ports['scheduler']}/healthz", insecure), timeout,
            "/healthz")

    # kwok: register the fake GPU nodes, then wait until kwok has marked them all Ready.
    for i in range(gpu_nodes):
        name = f"gpu-node-{i}"
        c._must("kube-apiserver", "POST", "/api/v1/nodes", gpu_node(name, gpus_per_node, node_cpu, node_memory),
                ok=(201, 409))
        c.nodes.append(name)

    def nodes_ready() -> bool | str:
        status, out = c.api("GET", f"/api/v1/nodes?labelSelector={NODE_LABEL}%3Dtrue")
        if status != 200:
            return f"HTTP {status}"
        ready = [n["metadata"]["name"] for n in out["items"]
                 if any(cd["type"] == "Ready" and cd["status"] == "True" for cd in (n.get("status") or {}).get("conditions") or [])]
        return True if len(ready) == gpu_nodes else f"{len(ready)}/{gpu_nodes} nodes Ready"

    c._wait(kwok, nodes_ready, timeout, f"{gpu_nodes} fake nodes to become Ready")

    if op is not None:
        c._wait(op, lambda: Cluster._http_ok(f"http://{HOST}:{ports['operator-probe']}/readyz"), timeout, "/readyz")
    c.save()

    if extras:
        # The extras read the same controller-runtime default cert dir; the self-signed serving
        # certificate is also the caBundle of their webhook configurations.
        _webhook_cert(c)
        ca_b64 = base64.b64encode((WEBHOOK_CERT_DIR / "tls.crt").read_bytes()).decode()
        extras_mod.start(c, assets, extras, kubeconfigs, spawn, ca_b64, timeout)


def _webhook_cert(c: Cluster) -> None:
    c.created_webhook_cert_dir = True
    if not (WEBHOOK_CERT_DIR / "tls.crt").exists():
        WEBHOOK_CERT_DIR.mkdir(parents=True, exist_ok=True)
        pki.self_signed(WEBHOOK_CERT_DIR / "tls.crt", WEBHOOK_CERT_DIR / "tls.key", "training-operator",
                        [f"IP:{HOST}", "DNS:localhost"])
