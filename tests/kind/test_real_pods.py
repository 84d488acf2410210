"""QwenTrainingJobs run by real kubelets: `kubectl apply` on the kind cluster, the trainer image in pods.

- the demo's convert -> pretrain -> export pipeline on two worker pods on two nodes (gloo, rendezvous through
  the PyTorchJob's Service), checkpoints on a volume both mount; the exported model loads in transformers;
- a pod deleted mid-pretraining: the job restarts it, the trainer resumes from the last checkpoint and the
  loss continues exactly as in the uninterrupted run;
- pods failing for good (a missing dataset): Failed, the trainer's own error in the condition and an Event;
- the SFT and evaluate stages in a pod;
- a convert -> pretrain pipeline through Kubeflow Trainer v2: each step a TrainJob (run as a JobSet) on two
  pods on two nodes, rendezvous through the JobSet's headless Service (the chart's trainjob release).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import demo_inputs  # noqa: E402

from .conftest import NAMESPACE, TRAINJOB_NAMESPACE  # noqa: E402

CLAIM = "qwen-tiny-data"
EXAMPLE = ROOT / "manifests" / "examples" / "cpu-pipeline.yaml"
# Two pods of 1.5 CPUs cannot share a 2-CPU worker: the scheduler has to put them on two nodes.
TWO_NODES = {"nodes": 2, "gpusPerNode": 0, "processesPerNode": 1, "cpu": "1500m", "memory": "3Gi",
             "sharedMemory": "512Mi"}
ONE_POD = {**TWO_NODES, "nodes": 1}
# Long enough (tens of seconds on CPU) for progress reports and for a pod to be deleted between two saves.
PRETRAIN = {"trainIters": 200, "warmupIters": 10, "saveInterval": 50, "logInterval": 10}


# ------------------------------------------------------------------------------------------------ helpers

def get(kind, name: str, namespace: str = NAMESPACE) -> dict:
    return json.loads(kind.kubectl("-n", namespace, "get", "qwentrainingjob", name, "-o", "json"))


def diagnose(kind, name: str, namespace: str = NAMESPACE) -> str:
    children = "trainjob,jobset" if namespace == TRAINJOB_NAMESPACE else "pytorchjob"
    parts = [kind.kubectl("-n", namespace, "get", f"qwentrainingjob,{children},pods", "-o", "wide", check=False)]
    try:
        parts.append(json.dumps(get(kind, name, namespace).get("status", {}), indent=1)[-3000:])
    except Exception as err:  # noqa: BLE001 - diagnostics only
        parts.append(str(err))
    parts.append(kind.kubectl("-n", namespace, "get", "events", "--sort-by=.lastTimestamp", check=False)[-3000:])
    return "\n".join(parts)


def wait_for(kind, name: str, phases: set[str], timeout: float, watch=None, namespace: str = NAMESPACE) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        obj = get(kind, name, namespace)
        if watch:
            watch(obj)
        if obj.get("status", {}).get("phase") in phases:
            return obj
        time.sleep(1)
    pytest.fail(f"{name} did not reach {sorted(phases)} in {timeout:.0f} s:\n{diagnose(kind, name, namespace)}")


def apply(kind, doc: dict) -> None:
    kind.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(doc))


def base_resource(kind, name: str, namespace: str = NAMESPACE) -> dict:
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["metadata"] = {"name": name, "namespace": namespace}
    doc["spec"]["image"] = {"name": kind.refs["trainer-cpu"]}
    doc["spec"]["resources"] = dict(TWO_NODES)
    doc["spec"]["volumes"] = [{"name": "data", "claimName": CLAIM, "mountPath": "/data"}]
    return doc


def single_stage(kind, name: str, stage: str, *, drop: tuple[str, ...] = (), training: dict | None = None,
                 **fields) -> dict:
    """The example as one stage: its pipeline (and ``drop``) removed, ``training`` merged into the example's,
    ``fields`` set on the spec."""
    doc = base_resource(kind, name)
    spec = doc["spec"]
    for key in ("pipeline", *drop):
        spec.pop(key, None)
    spec["stage"] = stage
    if training is not None:
        spec["training"] = {**spec.get("training", {}), **training}
    spec.update(fields)
    return doc


def pods_of(kind, name: str, namespace: str = NAMESPACE) -> list[dict]:
    return json.loads(kind.kubectl("-n", namespace, "get", "pods", "-l", f"training.qwen.dev/job={name}",
                                   "-o", "json"))["items"]


def trainjob_release(kind) -> bool:
    """Whether the cluster runs Trainer v2 and the chart's trainjob release (`up --trainjob`)."""
    out = kind.kubectl("-n", "kubeflow-system", "get", "deployment", "kubeflow-trainer-controller-manager",
                       "-o", "name", check=False)
    watched = kind.kubectl("get", "namespace", TRAINJOB_NAMESPACE, "-o", "name", check=False)
    return bool(out.strip()) and bool(watched.strip())


def train_losses(path: Path) -> dict[int, float]:
    from qwen_trainer.metrics import read_metrics

    return {r["iteration"]: r["loss"] for r in read_metrics(path)}


# ----------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def data(kind) -> Path:
    kind.kubectl("create", "namespace", NAMESPACE, check=False)
    host = kind.shared_volume(NAMESPACE, CLAIM, "qwen-kind/data")
    demo_inputs.prepare_data(host.parent)
    return host


@pytest.fixture(scope="module")
def pipeline(kind, data) -> dict:
    """The demo's pipeline with each step on two pods on two nodes; returns what was seen on the way."""
    doc = base_resource(kind, "pipeline")
    doc["spec"]["pipeline"][1]["training"] = dict(PRETRAIN)
    apply(kind, doc)
    seen: dict = {"progress": [], "steps": set()}

    def watch(obj):
        status = obj.get("status", {})
        if status.get("progress"):
            seen["progress"].append(status["progress"])
        for pod in pods_of(kind, "pipeline"):
            if pod["spec"].get("nodeName"):
                seen["steps"].add((pod["metadata"]["labels"].get("training.qwen.dev/stage"),
                                   pod["metadata"]["name"], pod["spec"]["nodeName"]))

    t0 = time.monotonic()
    final = wait_for(kind, "pipeline", {"Succeeded", "Failed"}, 1500, watch)
    seen["seconds"] = time.monotonic() - t0
    assert final["status"]["phase"] == "Succeeded", diagnose(kind, "pipeline")
    seen["final"] = final
    return seen


# -------------------------------------------------------------------------------------------------- tests

def test_pipeline_runs_on_two_nodes_and_exports_a_loadable_model(kind, data, pipeline):
    by_stage: dict[str, set[str]] = {}
    for stage, _pod, node in pipeline["steps"]:
        by_stage.setdefault(stage, set()).add(node)
    for stage in ("convert", "pretrain", "export"):
        assert len(by_stage.get(stage, ())) == 2, f"{stage} pods did not run on two nodes: {pipeline['steps']}"
    workers = set(kind.workers())
    assert set().union(*by_stage.values()) <= workers

    # The loss the trainer logged (on the shared volume) is the loss status.progress reported.
    losses = train_losses(data / "pipeline" / "pretrain" / "logs" / "metrics.jsonl")
    assert max(losses) == PRETRAIN["trainIters"]
    assert losses[PRETRAIN["trainIters"]] < losses[min(losses)], losses
    reported = [p for p in pipeline["progress"] if p.get("iteration") in losses and p.get("loss") is not None]
    assert reported, f"status.progress never showed a loss: {pipeline['progress'][-3:]}"
    for p in reported:
        assert math.isclose(p["loss"], losses[p["iteration"]], rel_tol=1e-3), (p, losses)

    from transformers import AutoModelForCausalLM
    import torch

    model = AutoModelForCausalLM.from_pretrained(data / "pipeline" / "hf")
    with torch.no_grad():
        out = model(torch.arange(16).unsqueeze(0))
    assert torch.isfinite(out.logits).all()
    print(f"\n[kind] pipeline on two nodes: {pipeline['seconds']:.0f} s; loss {losses[min(losses)]:.4f} -> "
          f"{losses[max(losses)]:.4f}")


def test_a_deleted_pod_resumes_from_the_last_checkpoint(kind, data, pipeline):
    apply(kind, single_stage(kind, "resume", "pretrain", training=PRETRAIN, checkpoint={
        "source": {"path": "/data/pipeline/mcore"}, "output": {"path": "/data/resume/pretrain"}}))
    save = PRETRAIN["saveInterval"]

    def past_the_save(obj) -> bool:
        return (obj.get("status", {}).get("progress") or {}).get("iteration", 0) > save

    deadline = time.monotonic() + 900
    while not past_the_save(get(kind, "resume")):
        assert get(kind, "resume").get("status", {}).get("phase") not in ("Succeeded", "Failed"), diagnose(kind, "resume")
        assert time.monotonic() < deadline, diagnose(kind, "resume")
        time.sleep(0.5)
    assert (data / "resume" / "pretrain" / f"iter_{save:07d}").exists() or \
        (data / "resume" / "pretrain" / "latest_checkpointed_iteration.txt").exists()
    victim = next(p["metadata"]["name"] for p in pods_of(kind, "resume")
                  if p["metadata"]["labels"].get("training.kubeflow.org/replica-type", "").lower() == "worker")
    kind.kubectl("-n", NAMESPACE, "delete", "pod", victim, "--wait=false")

    final = wait_for(kind, "resume", {"Succeeded", "Failed"}, 1200)
    assert final["status"]["phase"] == "Succeeded", diagnose(kind, "resume")
    restarts = sum(cs.get("restartCount", 0) for p in pods_of(kind, "resume")
                   for cs in p.get("status", {}).get("containerStatuses", []))
    names = {p["metadata"]["name"] for p in pods_of(kind, "resume")}
    assert restarts > 0 or victim in names, "the job did not restart anything after the pod was deleted"

    uninterrupted = train_losses(data / "pipeline" / "pretrain" / "logs" / "metrics.jsonl")
    resumed = train_losses(data / "resume" / "pretrain" / "logs" / "metrics.jsonl")
    after = [i for i in resumed if i > save]
    assert after and max(after) == PRETRAIN["trainIters"], resumed
    for i in after:
        assert math.isclose(resumed[i], uninterrupted[i], rel_tol=1e-3), (i, resumed[i], uninterrupted[i])


def test_pods_that_fail_for_good_say_why(kind, data):
    apply(kind, single_stage(
        kind, "broken", "pretrain", training=PRETRAIN,
        data={"pretrain": {"prefixes": [{"path": "/data/no/such/corpus"}]}},
        checkpoint={"source": {"path": "/data/pipeline/mcore"}, "output": {"path": "/data/broken/out"}},
        resources=dict(ONE_POD), runPolicy={"restartPolicy": "Never", "backoffLimit": 0}))
    final = wait_for(kind, "broken", {"Failed", "Succeeded"}, 600)
    assert final["status"]["phase"] == "Failed", diagnose(kind, "broken")
    failed = next(c for c in final["status"]["conditions"] if c["type"] == "Failed")
    assert "/data/no/such/corpus" in failed["message"], failed
    assert "Traceback" not in failed["message"]
    events = json.loads(kind.kubectl("-n", NAMESPACE, "get", "events", "--field-selector",
                                     "involvedObject.kind=QwenTrainingJob,involvedObject.name=broken", "-o", "json"))
    warnings = [e for e in events["items"] if e["type"] == "Warning"]
    assert any("/data/no/such/corpus" in e["message"] for e in warnings), [e["message"] for e in events["items"]]


def test_sft_and_evaluate_stages_in_pods(kind, data, pipeline):
    sft = single_stage(
        kind, "sft", "finetune",
        training={"globalBatchSize": 4, "padLength": 64, "trainIters": 10, "warmupIters": 2, "saveInterval": 10,
                  "logInterval": 5, "lr": 1.0e-3, "minLr": 1.0e-4},
        data={"sft": {"trainPath": "/data/sft/train.json"}},
        checkpoint={"source": {"path": "/data/pipeline/pretrain"}, "output": {"path": "/data/sft/out"}},
        resources=dict(ONE_POD))
    evaluate = single_stage(
        kind, "evaluate", "evaluate", drop=("training", "parallelism"), training={"seqLength": 64},
        evaluate={"tasks": ["perplexity"], "batchSize": 4, "limit": 16},
        data={"pretrain": {"prefixes": [{"path": "/data/corpus/tiny_text_document"}], "split": "80,20,0"}},
        checkpoint={"source": {"path": "/data/pipeline/hf", "format": "hf"}, "output": {"path": "/data/eval"}},
        resources=dict(ONE_POD))

    apply(kind, sft)
    assert wait_for(kind, "sft", {"Succeeded", "Failed"}, 900)["status"]["phase"] == "Succeeded", diagnose(kind, "sft")
    losses = train_losses(data / "sft" / "out" / "logs" / "metrics.jsonl")
    assert max(losses) == 10 and all(math.isfinite(v) for v in losses.values())

    apply(kind, evaluate)
    final = wait_for(kind, "evaluate", {"Succeeded", "Failed"}, 900)
    assert final["status"]["phase"] == "Succeeded", diagnose(kind, "evaluate")
    results = json.loads((data / "eval" / "eval_results.json").read_text())
    assert results["results"]["perplexity"]["tokens"] > 0
    assert final["status"]["evaluation"]["summary"].startswith("perplexity")



def test_a_pipeline_runs_as_trainjobs_in_real_pods(kind):
    """Each step a Kubeflow Trainer v2 TrainJob (the chart's ClusterTrainingRuntime, run as a JobSet) on two pods
    on two nodes; the pretrain step trains from the converted checkpoint and its loss falls."""
    if not trainjob_release(kind):
        pytest.skip("no Trainer v2 and trainjob chart release on this cluster (QWEN_KIND_TRAINJOB=1, or "
                    "python tools/qwen_kind up --trainjob NS)")
    ns = TRAINJOB_NAMESPACE
    host = kind.shared_volume(ns, CLAIM, "qwen-kind/data")  # the same host folder as the other tests' claim
    if not (host / "tiny-moe-hf").exists():
        demo_inputs.prepare_data(host.parent)
    doc = base_resource(kind, "trainjob", ns)
    convert, pretrain, _export = doc["spec"]["pipeline"]
    convert["checkpoint"] = {"output": {"path": "/data/trainjob/mcore"}}
    pretrain["training"] = {"trainIters": 20, "warmupIters": 2, "saveInterval": 20, "logInterval": 5}
    pretrain["checkpoint"] = {"output": {"path": "/data/trainjob/pretrain"}}
    doc["spec"]["pipeline"] = [convert, pretrain]
    apply(kind, doc)
    nodes: dict[str, set[str]] = {}

    def watch(obj):
        for pod in pods_of(kind, "trainjob", ns):
            if pod["spec"].get("nodeName"):
                nodes.setdefault(pod["metadata"]["labels"].get("training.qwen.dev/stage", ""), set()).add(
                    pod["spec"]["nodeName"])

    t0 = time.monotonic()
    final = wait_for(kind, "trainjob", {"Succeeded", "Failed"}, 1200, watch, namespace=ns)
    seconds = time.monotonic() - t0
    assert final["status"]["phase"] == "Succeeded", diagnose(kind, "trainjob", ns)
    trainjobs = json.loads(kind.kubectl("-n", ns, "get", "trainjobs.trainer.kubeflow.org", "-o", "json"))["items"]
    assert {t["spec"]["runtimeRef"]["name"] for t in trainjobs} == {"qwen-torch-distributed"}
    assert len(trainjobs) == 2 and all(t["spec"]["trainer"]["numNodes"] == 2 for t in trainjobs)
    assert json.loads(kind.kubectl("-n", ns, "get", "pytorchjobs", "-o", "json"))["items"] == []
    for stage in ("convert", "pretrain"):
        assert len(nodes.get(stage, ())) == 2, f"{stage} pods did not run on two nodes: {nodes}"
    losses = train_losses(host / "trainjob" / "pretrain" / "logs" / "metrics.jsonl")
    assert max(losses) == 20 and losses[20] < losses[min(losses)], losses
    print(f"\n[kind] convert -> pretrain as TrainJobs on two nodes: {seconds:.0f} s; loss {losses[min(losses)]:.4f} -> "
          f"{losses[20]:.4f}")
