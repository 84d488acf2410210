"""The evaluate stage on CPU: a tiny model scored on a local lm-eval task and on held-out perplexity, the
results file written next to the checkpoint, and the score reported into a real resource's status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from .trainer_helpers import REPO, TINY_ARCH, explain, torchrun, write_spec

pytestmark = pytest.mark.slow

LOCAL_TASK = "qwen_tiny_glossary"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    from qwen_trainer.data.synthetic import make_demo_data
    from qwen_trainer.engines.hf_model import build_model, hf_config
    from qwen_trainer.spec import load_job_spec, resolve_architecture

    root = tmp_path_factory.mktemp("evaluate")
    made = make_demo_data(root, vocab_size=600, sft_samples=8, corpus_repeat=2)
    proc = subprocess.run(
        [sys.executable, "-m", "qwen_trainer", "data", "preprocess", "--input", made["corpus"], "--output-prefix",
         str(root / "corpus"), "--tokenizer", made["tokenizer"], "--json-key", "text", "--workers", "1", "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, explain(proc)

    model_spec = {"family": "qwen2.5", "size": "0.5B", "tokenizerPath": made["tokenizer"], "architecture": dict(TINY_ARCH)}
    arch = resolve_architecture(load_job_spec({"stage": "evaluate", "model": model_spec, "evaluate": {"tasks": ["x"]},
                                               "checkpoint": {"source": {"path": "/x"}}}))
    import torch

    torch.manual_seed(0)
    model = build_model(hf_config(arch))
    hf_dir = root / "model-hf"
    model.save_pretrained(hf_dir)
    for f in Path(made["tokenizer"]).iterdir():
        (hf_dir / f.name).write_bytes(f.read_bytes())

    # A local multiple-choice task on a local data file: what an offline cluster would use.
    tasks = root / "tasks"
    tasks.mkdir()
    rows = [
        {"question": "A token is", "choices": ["a piece of text", "a learning rate", "a GPU"], "answer": 0},
        {"question": "The optimizer turns gradients into", "choices": ["tokens", "updates of the weights", "data"], "answer": 1},
        {"question": "Warmup is when the learning rate", "choices": ["climbs from zero", "is negative", "is a token"], "answer": 0},
        {"question": "A checkpoint holds", "choices": ["the weights", "a router", "nothing"], "answer": 0},
    ]
    (tasks / "glossary.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / f"{LOCAL_TASK}.yaml").write_text(yaml.safe_dump({
        "task": LOCAL_TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(tasks / "glossary.jsonl")}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }))
    return {"root": root, "hf": hf_dir, "tasks": tasks, "prefix": str(root / "corpus_text_document"), "model": model_spec}


def evaluate_spec(ws: dict, out: Path, tasks: list[str]) -> dict:
    return {
        "stage": "evaluate",
        "model": ws["model"],
        "training": {"seqLength": 64},
        "data": {"pretrain": {"prefixes": [{"path": ws["prefix"]}], "split": "80,20,0"}},
        "evaluate": {"tasks": tasks, "batchSize": 4, "includePath": str(ws["tasks"]), "limit": 16},
        "checkpoint": {"source": {"path": str(ws["hf"]), "format": "hf"}, "output": {"path": str(out)}},
    }


def _offline_env() -> dict:
    return {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def test_local_task_and_perplexity_write_a_results_file(workspace, tmp_path):
    out = tmp_path / "eval"
    spec = write_spec(tmp_path / "job.yaml", evaluate_spec(workspace, out, [LOCAL_TASK, "perplexity"]))
    proc = torchrun(spec, nproc=1, env=_offline_env(), timeout=600)
    assert proc.returncode == 0, explain(proc)
    results = json.loads((out / "eval_results.json").read_text())
    acc = results["results"][LOCAL_TASK]["acc"]
    assert 0.0 <= acc <= 1.0
    ppl = results["results"]["perplexity"]
    assert ppl["tokens"] > 0 and 1.0 < ppl["perplexity"] < 10 * 600  # a random model: near the vocabulary size
    assert f"{LOCAL_TASK} acc=" in results["summary"] and "perplexity perplexity=" in results["summary"]
    assert not list(out.glob(".eval-*")), "scratch directory left behind"


def test_unknown_task_is_a_clear_error(workspace, tmp_path):
    spec = write_spec(tmp_path / "job.yaml", evaluate_spec(workspace, tmp_path / "eval", ["no_such_task_anywhere"]))
    proc = torchrun(spec, nproc=1, env=_offline_env(), timeout=300)
    output = proc.stdout + proc.stderr
    # The trainer exits 2 with one line naming the field; torchrun then reports the child's exit code.
    assert proc.returncode != 0 and "exitcode: 2" in output, explain(proc)
    assert "error: evaluate.tasks: unknown lm-eval task(s) no_such_task_anywhere" in output
    assert f'File "{REPO}/trainer' not in output, "the trainer printed a traceback for a user error"


def test_score_reaches_the_resource_status(workspace, tmp_path, cluster, namespace):
    """Rank 0 patches status.evaluation of the QwenTrainingJob it runs for (the real API server)."""
    crd = REPO / "manifests" / "crd" / "qwentrainingjobs.training.qwen.dev.yaml"
    kube = ["kubectl", f"--kubeconfig={cluster.kubeconfig}"]
    subprocess.run([*kube, "apply", "--server-side", "--force-conflicts", "-f", str(crd)], check=True, capture_output=True)
    subprocess.run([*kube, "wait", "--for=condition=Established", "crd/qwentrainingjobs.training.qwen.dev"], check=True,
                   capture_output=True)
    job = evaluate_spec(workspace, tmp_path / "eval", [LOCAL_TASK])
    resource = {"apiVersion": "training.qwen.dev/v1alpha1", "kind": "QwenTrainingJob",
                "metadata": {"name": "tiny-eval", "namespace": namespace}, "spec": {**job, "resources": {"gpusPerNode": 0}}}
    deadline = time.monotonic() + 30
    while True:
        created = subprocess.run([*kube, "apply", "-f", "-"], input=yaml.safe_dump(resource), capture_output=True, text=True)
        if created.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert created.returncode == 0, created.stderr
    spec = write_spec(tmp_path / "job.yaml", job)
    env = {**_offline_env(), "QWEN_STATUS_RESOURCE": f"{namespace}/tiny-eval", "KUBECONFIG": str(cluster.kubeconfig)}
    proc = torchrun(spec, nproc=1, env=env, timeout=600)
    assert proc.returncode == 0, explain(proc)
    got = json.loads(subprocess.run([*kube, "get", "-n", namespace, "qwentrainingjob", "tiny-eval", "-o", "json"],
                                    capture_output=True, text=True, check=True).stdout)
    evaluation = got["status"]["evaluation"]
    assert 0.0 <= evaluation["results"][LOCAL_TASK]["acc"] <= 1.0
    assert evaluation["summary"].startswith(f"{LOCAL_TASK} acc=")
