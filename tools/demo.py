"""`make demo`: the whole product end to end on this machine, with no GPU and no Docker.

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


# ------------------------------------------------------------------------------------------- real part

def prepare_data(root: Path) -> None:
    from qwen_trainer.data.synthetic import make_demo_data
    from qwen_trainer.engines.hf_model import build_model, hf_config
    from qwen_trainer.spec import resolve_architecture
    from qwen_operator.api import validate_resource_spec

    data = root / "data"
    made = make_demo_data(data, vocab_size=512, sft_samples=64, corpus_repeat=2)
    (data / "sft").mkdir(exist_ok=True)
    shutil.copy(made["sft"], data / "sft" / "train.json")
    (data / "corpus").mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-m", "qwen_trainer", "data", "preprocess", "--input", made["corpus"],
                    "--output-prefix", str(data / "corpus" / "tiny"), "--tokenizer", made["tokenizer"],
                    "--json-key", "text", "--workers", "2", "--no-progress"], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    say("REAL", f"bundled corpus tokenised into {data / 'corpus' / 'tiny_text_document'}.bin/.idx")

    import torch

    spec = validate_resource_spec(yaml.safe_load((EXAMPLES / "cpu-convert.yaml").read_text())["spec"])
    arch = resolve_architecture(spec.job_spec())
    torch.manual_seed(0)
    model = build_model(hf_config(arch))
    hf_dir = data / "tiny-moe-hf"
    model.save_pretrained(hf_dir)
    for f in Path(made["tokenizer"]).iterdir():
        shutil.copy(f, hf_dir / f.name)
    params = sum(p.numel() for p in model.parameters())
    say("REAL", f"random Hugging Face checkpoint of the tiny Qwen1.5-MoE shape ({arch.moe.num_experts} experts, "
                f"top-{arch.moe.top_k}, {params:,} parameters) in {hf_dir}")


def run_stage(stage: str, root: Path) -> float:
    banner(f"qwenctl run --local manifests/examples/cpu-{stage}.yaml   (the pod's command, run here)")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "qwen_operator.cli", "run", "--local", "--root", str(root),
                           str(EXAMPLES / f"cpu-{stage}.yaml")], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                                                 "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise RuntimeError(f"the {stage} stage failed (exit {proc.returncode})")
    return time.monotonic() - t0


def loss_curve(root: Path) -> list[dict]:
    from qwen_trainer.metrics import read_metrics

    records = read_metrics(root / "data" / "tiny-moe-pretrain" / "logs" / "metrics.jsonl")
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
    records = loss_curve(root)
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
    ap.add_argument("--skip-cluster", action="store_true", help="only the real local run")
    args = ap.parse_args(argv)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.monotonic()
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
    except (RuntimeError, subprocess.CalledProcessError) as err:
        print(f"demo failed: {err}", file=sys.stderr)
        sys.exit(1)
