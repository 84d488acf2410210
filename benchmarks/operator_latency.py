"""Operator latency and memory on the local control plane (tools/build-controlplane.sh + qwen_devcluster),
beside the Go controllers that run the children, in the same bursts on the same control plane.

For each job API (`--job-api pytorchjob,trainjob`; the operator is started once per API) and bursts of N
QwenTrainingJobs created at once (default 1, 100, 500), measures:

* ours, create -> child: from the API server acknowledging the resource's creation to the child job (PyTorchJob
  or TrainJob) appearing on a watch;
* theirs, in the same burst: the Go controllers' reaction to that child. PyTorchJob -> its first pod (the
  Kubeflow training-operator); TrainJob -> its JobSet (Kubeflow Trainer v2), JobSet -> its first pod (the JobSet
  controller and the Job controller of kube-controller-manager), and TrainJob -> pod end to end;
* child running -> resource Running: from the child's Running=True condition (a TrainJob: a ready node Job in its
  jobsStatus) appearing on a watch to the resource's status.phase=Running appearing on a watch;
* the time until all N have a child, and until all N are Running;
* the operator process's peak RSS (VmHWM);
* CPU seconds of the operator, each control-plane process and this client during the burst, and the API
  server's write requests per job (apiserver_request_total, every client's, by verb and resource).

Prints figures (p50, p99, max) and the ratio of our p99 to theirs; it never passes or fails. The targets it
reports against: our p99 create -> child no worse than 1.5x the Go controller's reaction p99 at 100 and 500,
all 500 reconciled within 60 s, peak RSS under 200 MB. The TrainJobs run on the chart's ClusterTrainingRuntime
(helm template), with pods kwok keeps Running (`qwen.test/outcome: run`).

    python benchmarks/operator_latency.py [--job-api pytorchjob,trainjob] [--bursts 1,100,500] [--workers N]
                                          [--crd crd.yaml] [--json out.json]

`--crd` installs another CRD manifest instead of the one generated from the models (for example a copy without
its CEL rules, to see what validating them costs the API server).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import qwen_devcluster  # noqa: E402
from kubernetes import client as k, config as kconfig, watch  # noqa: E402
from kubernetes.client.exceptions import ApiException  # noqa: E402
from qwen_devcluster.cluster import create, gpu_node  # noqa: E402

from qwen_operator.api import GROUP, PLURAL, VERSION  # noqa: E402
from qwen_operator.api.crd import build_crd  # noqa: E402


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    idx = min(len(values) - 1, max(0, int(round(q / 100 * len(values) + 0.5)) - 1))
    return values[idx]


def job(name: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "QwenTrainingJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"stage": "convert", "model": {"family": "qwen2.5", "size": "0.5B"},
                 "checkpoint": {"source": {"path": "/data/hf"}, "output": {"path": "/data/mcore"}},
                 "image": {"name": "ghcr.io/qwen-k8s/trainer-cpu:0.1.0"},
                 "training": {"globalBatchSize": 8},
                 "resources": {"nodes": 1, "gpusPerNode": 0, "processesPerNode": 2, "sharedMemory": "1Gi"}},
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


REQUEST_LINE = re.compile(r'^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>[0-9.e+]+)$')
LABEL = re.compile(r'(\w+)="([^"]*)"')
WRITE_VERBS = ("POST", "PUT", "PATCH", "APPLY")


def apiserver_writes(cluster: Any) -> dict[str, float]:
    """Write requests the API server has served so far, by `VERB resource[/subresource]` (apiserver_request_total;
    every client's, not only the operator's); refused optimistic-locking conflicts are counted apart."""
    resp = cluster.client().call_api("GET", cluster.server + "/metrics", _request_timeout=30)
    text = resp.read().decode(errors="replace")
    counts: dict[str, float] = {}
    if resp.status != 200:
        return counts
    for line in text.splitlines():
        m = REQUEST_LINE.match(line)
        if not m:
            continue
        labels = dict(LABEL.findall(m["labels"]))
        if labels.get("verb") not in WRITE_VERBS:
            continue
        key = f"{labels['verb']} {labels.get('resource', '')}" + (f"/{labels['subresource']}"
                                                                   if labels.get("subresource") else "")
        if labels.get("code") == "409":
            key += " (409 Conflict)"
        counts[key] = counts.get(key, 0.0) + float(m["value"])
    return counts


def install_crd(api: k.ApiClient, path: Optional[str] = None) -> None:
    ext = k.ApiextensionsV1Api(api)
    crd = yaml.safe_load(Path(path).read_text()) if path else build_crd()
    try:
        ext.create_custom_resource_definition(crd)
    except ApiException as e:
        if e.status != 409:
            raise
    deadline = time.monotonic() + 30
    custom = k.CustomObjectsApi(api)
    while time.monotonic() < deadline:
        try:
            custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)
            return
        except ApiException:
            time.sleep(0.2)
    raise RuntimeError("QwenTrainingJob API not served")


# (group, version, plural, label naming a pod's child) of each job API's child.
CHILDREN = {
    "pytorchjob": ("kubeflow.org", "v1", "pytorchjobs", "training.kubeflow.org/job-name"),
    "trainjob": ("trainer.kubeflow.org", "v1alpha1", "trainjobs", "jobset.sigs.k8s.io/jobset-name"),
}
RUNTIME = "qwen-bench-torch"


def child_running(job_api: str, obj: dict[str, Any]) -> bool:
    status = obj.get("status") or {}
    if job_api == "trainjob":
        return any(int(j.get("ready") or 0) > 0 for j in status.get("jobsStatus") or [])
    return any(c.get("type") == "Running" and c.get("status") == "True" for c in status.get("conditions") or [])


class Recorder:
    """First-seen times of the children, their running state, their JobSets (TrainJob), their first pods, and the
    resources' Running phase (one namespace)."""

    def __init__(self, api: k.ApiClient, namespace: str, job_api: str = "pytorchjob"):
        self.custom = k.CustomObjectsApi(api)
        self.core = k.CoreV1Api(api)
        self.ns = namespace
        self.job_api = job_api
        self.pj_added: dict[str, float] = {}  # the child (PyTorchJob or TrainJob)
        self.pj_running: dict[str, float] = {}
        self.res_running: dict[str, float] = {}
        self.jobset_added: dict[str, float] = {}
        self.pod_added: dict[str, float] = {}  # child name -> its first pod
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._watch_pj, daemon=True),
                         threading.Thread(target=self._watch_res, daemon=True),
                         threading.Thread(target=self._watch_pods, daemon=True)]
        if job_api == "trainjob":
            self._threads.append(threading.Thread(target=self._watch_jobsets, daemon=True))

    def start(self) -> "Recorder":
        for t in self._threads:
            t.start()
        time.sleep(0.5)  # let both watches connect before the burst
        return self

    def stop(self) -> None:
        self._stop.set()

    def _stream(self, group: str, version: str, plural: str):
        w = watch.Watch()
        while not self._stop.is_set():
            try:
                for ev in w.stream(self.custom.list_namespaced_custom_object, group, version, self.ns, plural,
                                   timeout_seconds=30):
                    yield time.monotonic(), ev
                    if self._stop.is_set():
                        return
            except Exception:  # a dropped watch: reconnect
                time.sleep(0.1)

    def _watch_pj(self) -> None:
        group, version, plural, _ = CHILDREN[self.job_api]
        for now, ev in self._stream(group, version, plural):
            obj = ev["object"]
            name = obj["metadata"]["name"]
            self.pj_added.setdefault(name, now)
            if child_running(self.job_api, obj):
                self.pj_running.setdefault(name, now)

    def _watch_jobsets(self) -> None:
        for now, ev in self._stream("jobset.x-k8s.io", "v1alpha2", "jobsets"):
            self.jobset_added.setdefault(ev["object"]["metadata"]["name"], now)

    def _watch_pods(self) -> None:
        label = CHILDREN[self.job_api][3]
        w = watch.Watch()
        while not self._stop.is_set():
            try:
                # Only the label of each pod is read; the bodies are not decoded into models.
                for ev in w.stream(self.core.list_namespaced_pod, self.ns, label_selector=label,
                                   timeout_seconds=30, deserialize=False):
                    now = time.monotonic()
                    obj = ev.get("object") or {}
                    child = ((obj.get("metadata") or {}).get("labels") or {}).get(label)
                    if child:
                        self.pod_added.setdefault(child, now)
                    if self._stop.is_set():
                        return
            except Exception:  # a dropped watch: reconnect
                time.sleep(0.1)

    def _watch_res(self) -> None:
        for now, ev in self._stream(GROUP, VERSION, PLURAL):
            obj = ev["object"]
            if (obj.get("status") or {}).get("phase") == "Running":
                self.res_running.setdefault(obj["metadata"]["name"], now)


def dist(values: list[float]) -> dict[str, Any]:
    return {"n": len(values), "p50": round(pct(values, 50), 3), "p99": round(pct(values, 99), 3),
            "max": round(max(values or [0]), 3)}


def burst(api: k.ApiClient, cluster: Any, n: int, operator_pid: int, timeout: float,
          others: dict[str, int], job_api: str = "pytorchjob") -> dict[str, Any]:
    core = k.CoreV1Api(api)
    custom = k.CustomObjectsApi(api)
    ns = f"bench-{job_api[:5]}-{n}-{int(time.time()) % 100000}"
    core.create_namespace({"metadata": {"name": ns}})
    deadline = time.monotonic() + 30
    while True:  # pods are refused until the namespace's default ServiceAccount exists
        try:
            core.read_namespaced_service_account("default", ns)
            break
        except ApiException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    rec = Recorder(api, ns, job_api).start()
    created: dict[str, float] = {}
    names = [f"j{i:04d}" for i in range(n)]

    def create(name: str) -> None:
        # The response is not decoded: the client's own CPU would otherwise compete with what is measured.
        resp = custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, job(name, ns),
                                                      _preload_content=False)
        created[name] = time.monotonic()
        resp.data  # read the body so the pooled connection can be reused
        resp.release_conn()

    cpu0 = {name: cpu_seconds(pid) for name, pid in {"operator": operator_pid, **others}.items()}
    cpu0["benchmark client"] = time.process_time()
    writes0 = apiserver_writes(cluster)
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(create, names))
    t_created = time.monotonic() - t0
    end = time.monotonic() + timeout
    while time.monotonic() < end and (len(rec.pj_added) < n or len(rec.res_running) < n or len(rec.pod_added) < n):
        time.sleep(0.2)
    rec.stop()
    cpu = {name: round(cpu_seconds(pid) - cpu0[name], 1) for name, pid in {"operator": operator_pid, **others}.items()}
    cpu["benchmark client"] = round(time.process_time() - cpu0["benchmark client"], 1)
    writes1 = apiserver_writes(cluster)
    # Rare writes (leases, the previous burst's namespace going away: < 0.05 a job) are left out.
    writes = {key: round((writes1[key] - writes0.get(key, 0.0)) / n, 2) for key in sorted(writes1)
              if (writes1[key] - writes0.get(key, 0.0)) / n >= 0.05}
    to_child = [rec.pj_added[x] - created[x] for x in names if x in rec.pj_added]
    to_running = [rec.res_running[x] - rec.pj_running[x] for x in names if x in rec.res_running and x in rec.pj_running]
    # The Go controllers' reaction to the children our operator made (child names equal the resources' here).
    child_to_pod = [rec.pod_added[x] - rec.pj_added[x] for x in names if x in rec.pod_added and x in rec.pj_added]
    all_children = max(rec.pj_added.values()) - t0 if len(rec.pj_added) == n else None
    all_running = max(rec.res_running.values()) - t0 if len(rec.res_running) == n else None
    go = {"child_to_first_pod_s": dist(child_to_pod)}
    if job_api == "trainjob":
        go["trainjob_to_jobset_s"] = dist([rec.jobset_added[x] - rec.pj_added[x] for x in names
                                           if x in rec.jobset_added and x in rec.pj_added])
        go["jobset_to_first_pod_s"] = dist([rec.pod_added[x] - rec.jobset_added[x] for x in names
                                            if x in rec.pod_added and x in rec.jobset_added])
    ours_p99, theirs_p99 = pct(to_child, 99), pct(child_to_pod, 99)
    result = {
        "job_api": job_api,
        "burst": n,
        "create_calls_s": round(t_created, 2),
        "create_to_pytorchjob_s": dist(to_child),  # (the child, whichever the API)
        "go_controllers": go,
        "ours_p99_over_theirs_p99": round(ours_p99 / theirs_p99, 2) if theirs_p99 and theirs_p99 > 0 else None,
        "pytorchjob_running_to_running_s": dist(to_running),
        "all_pytorchjobs_s": round(all_children, 2) if all_children is not None else None,
        "all_running_s": round(all_running, 2) if all_running is not None else None,
        "operator_peak_rss_mib": round(peak_rss_mib(operator_pid), 1),
        "cpu_seconds_during_burst": cpu,
        "apiserver_writes_per_job": writes,
        "apiserver_writes_per_job_total": round(sum(writes.values()), 1),
        "wall_seconds": round(time.monotonic() - t0, 1),
    }
    core.delete_namespace(ns)
    # Wait until the namespace (its jobs, children and pods) is gone: the next burst, or the next API's operator,
    # which would otherwise resume the dying resources, must not pay for this one.
    t_delete = time.monotonic()
    while time.monotonic() - t_delete < 600:
        try:
            core.read_namespace(ns)
        except ApiException as e:
            if e.status == 404:
                break
            raise
        time.sleep(1)
    result["namespace_deleted_s"] = round(time.monotonic() - t_delete, 1)
    return result


def install_runtime(api: k.ApiClient, cluster: Any) -> None:
    """The chart's ClusterTrainingRuntime (helm template, jobApi=trainjob) as RUNTIME, with pods kwok keeps Running
    (without the annotation kwok completes any pod a batch Job owns at once)."""
    helm = cluster.bin_dir / "helm"
    out = subprocess.run([str(helm), "template", "qwen", str(ROOT / "charts" / "qwen-training-operator"), "--set",
                          "jobApi=trainjob", "--show-only", "templates/trainingruntime.yaml"],
                         capture_output=True, text=True, check=True).stdout
    (doc,) = [d for d in yaml.safe_load_all(out) if d]
    doc["metadata"]["name"] = RUNTIME
    (node,) = doc["spec"]["template"]["spec"]["replicatedJobs"]
    node["template"]["spec"]["template"].setdefault("metadata", {})["annotations"] = {"qwen.test/outcome": "run"}
    try:
        k.CustomObjectsApi(api).create_cluster_custom_object("trainer.kubeflow.org", "v1alpha1",
                                                             "clustertrainingruntimes", doc)
    except ApiException as e:
        if e.status != 409:
            raise


def start_operator(cluster: Any, state: str, job_api: str, workers: Optional[int]) -> subprocess.Popen:
    metrics_port = free_port()
    log = Path(state) / f"operator-{job_api}.log"
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    with open(log, "ab") as fh:
        operator = subprocess.Popen(
            [sys.executable, "-m", "qwen_operator.main", "--all-namespaces", "--standalone",
             "--job-api", job_api, "--trainjob-runtime", RUNTIME,
             *(["--workers", str(workers)] if workers else []),
             "--metrics-host", "127.0.0.1", "--metrics-port", str(metrics_port), "--liveness", ""],
            stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/readyz", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if operator.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"operator did not become ready; see {log}")
        time.sleep(0.2)
    print(f"operator ({job_api}) ready (pid {operator.pid}, RSS peak {peak_rss_mib(operator.pid):.1f} MiB at idle)")
    return operator


def stop_operator(operator: Optional[subprocess.Popen]) -> None:
    if operator is not None and operator.poll() is None:
        operator.send_signal(signal.SIGTERM)
        try:
            operator.wait(15)
        except subprocess.TimeoutExpired:
            operator.kill()


def table(results: list[dict[str, Any]]) -> None:
    print(f"{'API':>10} {'burst':>5} | {'ours: create->child p50':>23} {'p99':>6} | "
          f"{'theirs: child->pod p50':>22} {'p99':>6} | {'ratio p99':>9} | {'TJ->JobSet p50/p99':>18} | "
          f"{'all children (s)':>16} {'all Running (s)':>15} | {'peak RSS MiB':>12} | {'CPU s op':>8} {'apiserver':>9}")
    for r in results:
        a, go = r["create_to_pytorchjob_s"], r["go_controllers"]
        b = go["child_to_first_pod_s"]
        js = go.get("trainjob_to_jobset_s")
        jobset = f"{js['p50']:.3f}/{js['p99']:.3f}" if js else "-"
        cpu = r["cpu_seconds_during_burst"]
        print(f"{r['job_api']:>10} {r['burst']:>5} | {a['p50']:>23.3f} {a['p99']:>6.3f} | {b['p50']:>22.3f} "
              f"{b['p99']:>6.3f} | {str(r['ours_p99_over_theirs_p99']):>9} | {jobset:>18} | "
              f"{str(r['all_pytorchjobs_s']):>16} {str(r['all_running_s']):>15} | {r['operator_peak_rss_mib']:>12} | "
              f"{cpu['operator']:>8} {cpu.get('kube-apiserver', 0):>9}")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job-api", default="pytorchjob,trainjob",
                   help="child job APIs, one operator each (trainjob needs tools/build-controlplane.sh --with-extras)")
    p.add_argument("--bursts", default="1,100,500")
    p.add_argument("--workers", type=int, default=None, help="operator --workers (default: the operator's own)")
    p.add_argument("--timeout", type=float, default=240, help="seconds to wait for one burst")
    p.add_argument("--nodes", type=int, default=6, help="fake nodes (110 pods each)")
    p.add_argument("--crd", default=None, help="install this CRD manifest instead of the generated one")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)
    bursts = [int(x) for x in args.bursts.split(",")]
    apis = [a.strip() for a in args.job_api.split(",") if a.strip()]
    unknown = [a for a in apis if a not in CHILDREN]
    if unknown:
        p.error(f"--job-api: unknown {', '.join(unknown)}; expected pytorchjob, trainjob")

    state = tempfile.mkdtemp(prefix="qwen-bench-")
    extras = ["jobset", "trainer-v2"] if "trainjob" in apis else []
    cluster = qwen_devcluster.start_cluster(state, gpu_nodes=4, extras=extras, timeout=180)
    operator = None
    try:
        api = kconfig.new_client_from_config(config_file=str(cluster.kubeconfig))
        for i in range(4, args.nodes):  # more fake nodes so every pod of the largest burst fits
            create(lambda: k.CoreV1Api(api).create_node(gpu_node(f"gpu-node-{i}", 8, "96", "1024Gi")))
        install_crd(api, args.crd)
        if "trainjob" in apis:
            install_runtime(api, cluster)
        results = []
        for job_api in apis:
            operator = start_operator(cluster, state, job_api, args.workers)
            for n in bursts:
                others = {name: c["pid"] for name, c in cluster.measure()["components"].items() if c["alive"]}
                r = burst(api, cluster, n, operator.pid, args.timeout, others, job_api)
                results.append(r)
                print(json.dumps(r), flush=True)
                time.sleep(3)
            stop_operator(operator)
            operator = None
        print()
        table(results)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
    finally:
        stop_operator(operator)
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
