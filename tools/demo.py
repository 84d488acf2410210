"""`make demo`: the whole product end to end on this machine, with no GPU.

Where Docker works (it is installed and started if need be, as root on Debian), the pipeline runs in REAL PODS:
1. Builds the images and starts a kind cluster (one control-plane node, two workers), installs the
   training-operator and the operator's Helm chart (tools/qwen_kind).
2. `kubectl apply`s manifests/examples/cpu-pipeline.yaml with each step on two pods on the two workers:
   a random Hugging Face checkpoint of the tiny Qwen-MoE shape is converted to Megatron-Core, pretrained on
   the bundled corpus (gloo across the two nodes) and exported back to Hugging Face, on a volume both pods
   mount. Shows the resource's conditions and progress, the loss curve, and loads the exported model.
3. Deletes the cluster (and stops the Docker daemon if it started it).

Without Docker (`--mode kwok`, or when it cannot start):
1. Starts the local control plane (real etcd, kube-apiserver, controller-manager, scheduler, the real Kubeflow
   training-operator; kwok stands in for kubelets), installs the QwenTrainingJob CRD and starts the operator.
2. Applies `manifests/examples/cpu-pretrain.yaml` and shows it moving through its conditions with
   `kubectl get`. There is no kubelet: kwok moves the pods through Running to Succeeded. That part is
   SIMULATED and labelled so.
3. Runs the same flow FOR REAL through `qwenctl run --local` (the pod's own torchrun command): a random
   Hugging Face checkpoint of the tiny Qwen-MoE shape is converted to Megatron-Core, pretrained on the bundled
   corpus with two CPU processes, and exported back to Hugging Face. Prints the loss curve and throughput.
4. Stops everything it started.
"""

from __future__ import annotations

import argparse
import json
import warnings
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "manifests" / "examples"
CRD = ROOT / "manifests" / "crd" / "qwentrainingjobs.training.qwen.dev.yaml"
sys.path.insert(0, str(ROOT / "tools"))

import demo_inputs  # noqa: E402
from qwen_kind.errors import KindSetupError  # noqa: E402

NAMESPACE = "qwen-demo"
STAGES = ("convert", "pretrain", "export")


def say(tag: str, text: str) -> None:
    print(f"[{tag}] {text}", flush=True)


def banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def kubectl(kubeconfig: Path, *args: str, stdin: str | None = None) -> str:
    out = subprocess.run(["kubectl", f"--kubeconfig={kubeconfig}", *args], input=stdin, capture_output=True,
                         text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout


def wait(check, timeout: float, what: str, interval: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")


# --------------------------------------------------------------------------------------- simulated part

def bound_claim(kubeconfig: Path, claim: str) -> None:
    """A PersistentVolume bound to the claim the example mounts (no storage provisioner here)."""
    pv = f"demo-{claim}"
    kubectl(kubeconfig, "apply", "-f", "-", stdin=yaml.safe_dump_all([
        {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
         "spec": {"capacity": {"storage": "10Gi"}, "accessModes": ["ReadWriteMany"], "storageClassName": "",
                  "hostPath": {"path": f"/tmp/{pv}"}, "claimRef": {"namespace": NAMESPACE, "name": claim}}},
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim, "namespace": NAMESPACE},
         "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "", "volumeName": pv,
                  "resources": {"requests": {"storage": "10Gi"}}}},
    ]))


def simulated_lifecycle(work: Path) -> dict:
    import qwen_devcluster

    banner("Control plane (real components; kwok simulates the kubelets)")
    cluster = qwen_devcluster.start_cluster(work / "cluster")
    m = cluster.measure()
    say("REAL", f"etcd, kube-apiserver, controller-manager, scheduler, kwok, training-operator up in {m['startup_s']} s "
                f"({m['total_rss_mib']} MiB RSS)")
    kc = cluster.kubeconfig
    operator = None
    try:
        kubectl(kc, "apply", "--server-side", "-f", str(CRD))
        kubectl(kc, "wait", "--for=condition=Established", "--timeout=30s", "crd/qwentrainingjobs.training.qwen.dev")
        kubectl(kc, "create", "namespace", NAMESPACE)
        wait(lambda: subprocess.run(["kubectl", f"--kubeconfig={kc}", "-n", NAMESPACE, "get", "sa", "default"],
                                    capture_output=True).returncode == 0, 30, "the namespace's ServiceAccount")
        bound_claim(kc, "qwen-tiny-data")
        log = (work / "operator.log").open("w")
        operator = subprocess.Popen(
            [sys.executable, "-m", "qwen_operator.main", "--namespace", NAMESPACE, "--standalone",
             "--metrics-port", "0", "--liveness", "", "--log-format", "plain"],
            env={**os.environ, "KUBECONFIG": str(kc)}, stdout=log, stderr=subprocess.STDOUT)
        say("REAL", f"operator started (pid {operator.pid}), watching namespace {NAMESPACE}; log: {work / 'operator.log'}")

        banner("kubectl apply -f manifests/examples/cpu-pretrain.yaml")
        doc = yaml.safe_load((EXAMPLES / "cpu-pretrain.yaml").read_text())
        doc["metadata"]["namespace"] = NAMESPACE
        name = doc["metadata"]["name"]
        print(kubectl(kc, "apply", "-f", "-", stdin=yaml.safe_dump(doc)).strip())

        def row() -> str:
            return kubectl(kc, "-n", NAMESPACE, "get", "qwentrainingjob", name, "--no-headers").strip()

        def phase() -> str:
            return kubectl(kc, "-n", NAMESPACE, "get", "qwentrainingjob", name, "-o", "jsonpath={.status.phase}")

        print(kubectl(kc, "-n", NAMESPACE, "get", "qwentrainingjob", name).splitlines()[0])
        seen = []

        def show_until(target: str, timeout: float) -> None:
            def step():
                current = row()
                if not seen or seen[-1] != current:
                    seen.append(current)
                    print(current, flush=True)
                return phase() == target
            wait(step, timeout, f"phase {target}")

        show_until("Running", 90)
        pods = kubectl(kc, "-n", NAMESPACE, "get", "pods", "-l", f"training.qwen.dev/job={name}", "-o", "wide")
        say("SIMULATED", "these pods 'run' on kwok's fake GPU nodes; no container is started:")
        print(pods.rstrip())
        say("SIMULATED", "telling kwok to finish the pods successfully in 2 s")
        cluster.set_pod_outcome(NAMESPACE, f"training.qwen.dev/job={name}", "succeed", delay="2s")
        show_until("Succeeded", 90)
        conditions = json.loads(kubectl(kc, "-n", NAMESPACE, "get", "qwentrainingjob", name, "-o", "json"))["status"]["conditions"]
        for c in conditions:
            print(f"  condition {c['type']:<10} {c['status']:<6} {c['reason']}: {c.get('message', '')}")
        return {"startup_s": m["startup_s"], "rss_mib": m["total_rss_mib"]}
    finally:
        if operator is not None:
            operator.terminate()
            try:
                operator.wait(15)
            except subprocess.TimeoutExpired:
                operator.kill()
        cluster.stop()
        say("REAL", "operator and control plane stopped")


# ------------------------------------------------------------------------------------------ kind (real pods)

def docker_usable() -> bool:
    """Docker can be used here: running, or installable/startable by us (root on Debian)."""
    from qwen_kind.docker import daemon_answers, docker_cli

    cli = docker_cli()
    if cli and daemon_answers(cli):
        return True
    return os.geteuid() == 0 and bool(shutil.which("dockerd") or shutil.which("apt-get"))


def kind_pipeline(work: Path) -> dict:
    from qwen_kind import cluster as kind_cluster

    banner("kind: images built here, a cluster of one control-plane node and two workers (real kubelets)")
    cluster = kind_cluster.up("qwen-demo", workers=2, work=work / "kind", namespaces=(NAMESPACE,))
    try:
        say("REAL", "; ".join(f"{k} {v} s" for k, v in cluster.timings.items()))
        print(cluster.kubectl("get", "nodes", "-o", "wide").rstrip())
        host = cluster.shared_volume(NAMESPACE, "qwen-tiny-data", "demo/data")
        demo_inputs.prepare_data(host.parent, say)

        banner("kubectl apply -f manifests/examples/cpu-pipeline.yaml   (each step: 2 pods on 2 nodes, gloo)")
        doc = yaml.safe_load((EXAMPLES / "cpu-pipeline.yaml").read_text())
        doc["metadata"]["namespace"] = NAMESPACE
        doc["spec"]["image"] = {"name": cluster.refs["trainer-cpu"]}
        doc["spec"]["resources"] = {"nodes": 2, "gpusPerNode": 0, "processesPerNode": 1, "cpu": "1500m",
                                    "memory": "3Gi", "sharedMemory": "512Mi"}
        name = doc["metadata"]["name"]
        print(cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(doc)).strip())
        t0 = time.monotonic()
        print(cluster.kubectl("-n", NAMESPACE, "get", "qwentrainingjob", name, "-o", "wide").splitlines()[0])
        seen: list[str] = []
        nodes: dict[str, set[str]] = {}

        def done() -> bool:
            obj = json.loads(cluster.kubectl("-n", NAMESPACE, "get", "qwentrainingjob", name, "-o", "json"))
            status = obj.get("status", {})
            # A row when something but the clock changed (stage, phase, progress, message).
            state = json.dumps([status.get("phase"), status.get("currentStep"), status.get("progress"),
                                [(c.get("type"), c.get("status"), c.get("message")) for c in status.get("conditions", [])]])
            if not seen or seen[-1] != state:
                seen.append(state)
                print(cluster.kubectl("-n", NAMESPACE, "get", "qwentrainingjob", name, "-o", "wide",
                                      "--no-headers").strip(), flush=True)
            for pod in json.loads(cluster.kubectl("-n", NAMESPACE, "get", "pods", "-l",
                                                  f"training.qwen.dev/job={name}", "-o", "json"))["items"]:
                if pod["spec"].get("nodeName"):
                    stage = pod["metadata"]["labels"].get("training.qwen.dev/stage", "?")
                    nodes.setdefault(stage, set()).add(pod["spec"]["nodeName"])
            phase = status.get("phase")
            if phase == "Failed":
                raise RuntimeError(f"{name} failed: {status.get('conditions')}")
            return phase == "Succeeded"

        wait(done, 1800, f"{name} to succeed", interval=2)
        seconds = time.monotonic() - t0
        for stage, where in nodes.items():
            say("REAL", f"{stage}: pods ran on {', '.join(sorted(where))}")
        print(cluster.kubectl("-n", NAMESPACE, "get", "pods", "-o", "wide").rstrip())
        records = loss_curve(host / "pipeline" / "pretrain")
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(host / "pipeline" / "hf")
        say("REAL", f"exported checkpoint (written by the export pod) loads in transformers as {type(model).__name__}")
        return {"seconds": seconds, "first_loss": records[0]["loss"], "last_loss": records[-1]["loss"],
                "timings": cluster.timings}
    finally:
        kind_cluster.down(cluster)
        say("REAL", "kind cluster deleted")


# ------------------------------------------------------------------------------------------- real part

def prepare_data(root: Path) -> None:
    demo_inputs.prepare_data(root, say)


def run_stage(stage: str, root: Path) -> float:
    banner(f"qwenctl run --local manifests/examples/cpu-{stage}.yaml   (the pod's command, run here)")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "qwen_operator.cli", "run", "--local", "--root", str(root),
                           str(EXAMPLES / f"cpu-{stage}.yaml")], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                                                 "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise RuntimeError(f"the {stage} stage failed (exit {proc.returncode})")
    return time.monotonic() - t0


def loss_curve(checkpoint: Path) -> list[dict]:
    from qwen_trainer.metrics import read_metrics

    records = read_metrics(checkpoint / "logs" / "metrics.jsonl")
    lo = min(r["loss"] for r in records)
    hi = max(r["loss"] for r in records)
    print("\n  iter   loss    tokens/s")
    for r in records:
        width = 1 + int(40 * (r["loss"] - lo) / max(hi - lo, 1e-9))
        print(f"  {r['iteration']:>4}  {r['loss']:6.3f}  {r.get('tokens_per_second', 0):8.0f}  {'#' * width}")
    return records


def real_run(work: Path) -> dict:
    banner("The same flow for real on this machine (CPU engine, 2 processes, gloo)")
    root = work / "root"
    prepare_data(root)
    seconds = {stage: run_stage(stage, root) for stage in STAGES}
    records = loss_curve(root / "data" / "tiny-moe-pretrain")
    first, last = records[0]["loss"], records[-1]["loss"]
    tps = [r.get("tokens_per_second", 0) for r in records[1:]] or [0]
    say("REAL", f"loss {first:.3f} -> {last:.3f} over {records[-1]['iteration']} steps; "
                f"median {sorted(tps)[len(tps) // 2]:.0f} tokens/s on 2 CPU processes")
    from transformers import AutoModelForCausalLM

    exported = root / "data" / "tiny-moe-pretrain-hf"
    model = AutoModelForCausalLM.from_pretrained(exported)
    say("REAL", f"exported checkpoint loads in transformers as {type(model).__name__}")
    print("\n  checkpoints:")
    for label, rel in (("Hugging Face (random init)", "tiny-moe-hf"), ("Megatron-Core (converted)", "tiny-moe-mcore"),
                       ("Megatron-Core (pretrained)", "tiny-moe-pretrain"), ("Hugging Face (exported)", "tiny-moe-pretrain-hf")):
        print(f"    {label:<28} {root / 'data' / rel}")
    return {"seconds": seconds, "first_loss": first, "last_loss": last}


def main(argv=None) -> int:
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=str(ROOT / "out" / "demo"), help="scratch directory (wiped first)")
    ap.add_argument("--mode", choices=("auto", "kind", "kwok"), default="auto",
                    help="kind: real pods (needs Docker); kwok: simulated pods plus the pod command run locally; "
                         "auto: kind where Docker can be used")
    ap.add_argument("--skip-cluster", action="store_true", help="kwok mode without the cluster: only the local run")
    args = ap.parse_args(argv)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.monotonic()
    mode = args.mode
    if mode == "auto":
        mode = "kind" if not args.skip_cluster and docker_usable() else "kwok"
    if mode == "kind":
        real = kind_pipeline(work)
        banner("Summary")
        say("REAL", f"pipeline in pods on two kind nodes in {real['seconds']:.0f} s; loss fell from "
                    f"{real['first_loss']:.3f} to {real['last_loss']:.3f}")
    else:
        sim = None if args.skip_cluster else simulated_lifecycle(work)
        real = real_run(work)
        banner("Summary")
        if sim:
            say("REAL", f"control plane up in {sim['startup_s']} s; the operator rendered and tracked the PyTorchJob")
            say("SIMULATED", "pod execution on the cluster (kwok fake nodes): Created -> Running -> Succeeded")
        say("REAL", "convert {convert:.0f} s, pretrain {pretrain:.0f} s, export {export:.0f} s".format(**real["seconds"]))
        say("REAL", f"loss fell from {real['first_loss']:.3f} to {real['last_loss']:.3f}")
    print(f"\ndemo finished in {time.monotonic() - t0:.0f} s. On a GPU cluster with the Kubeflow training-operator:\n"
          "  helm install qwen charts/qwen-training-operator\n"
          "  kubectl apply -f manifests/examples/qwen-moe-pretrain.yaml   # MegaBlocks MoE, 8 GPUs\n"
          "  kubectl get qtj -w")
    return 0

if __name__ == "__main__":
    try:
        sys.exit(main())
    except (RuntimeError, subprocess.CalledProcessError, KindSetupError) as err:
        print(f"demo failed: {err}", file=sys.stderr)
        sys.exit(1)
