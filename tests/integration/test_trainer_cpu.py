"""The trainer end to end on CPU: torchrun with two gloo processes, tiny Qwen models, real Megatron datasets,
Megatron-layout checkpoints through the converter, crash/restart and export back to Hugging Face.

Each torchrun run takes well under a minute on two cores.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from .trainer_helpers import REPO, TINY_ARCH, explain, losses, torchrun, write_spec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """Tiny tokenizer, the bundled corpus as a Megatron dataset (through the preprocess CLI with two workers) and
    alpaca SFT samples."""
    import subprocess
    import sys

    from qwen_trainer.data.synthetic import make_demo_data

    root = tmp_path_factory.mktemp("trainer-data")
    made = make_demo_data(root, vocab_size=600, sft_samples=192, corpus_repeat=2)
    proc = subprocess.run(
        [sys.executable, "-m", "qwen_trainer", "data", "preprocess", "--input", made["corpus"], "--output-prefix",
         str(root / "corpus"), "--tokenizer", made["tokenizer"], "--json-key", "text", "--workers", "2",
         "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin",
                                                                   "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, explain(proc)
    prefix = proc.stdout.strip().splitlines()[-1]
    assert prefix == str(root / "corpus_text_document")
    assert Path(prefix + ".bin").is_file() and Path(prefix + ".idx").is_file()
    return {**made, "prefix": prefix, "root": root}


def pretrain_spec(data: dict, out: Path, *, iters: int = 30, save: int = 10, moe: dict | None = None,
                  family: str = "qwen2.5", size: str = "0.5B") -> dict:
    model = {"family": family, "size": size, "tokenizerPath": data["tokenizer"], "architecture": dict(TINY_ARCH)}
    if moe:
        model["moe"] = moe
    return {
        "stage": "pretrain",
        "model": model,
        "training": {"microBatchSize": 1, "globalBatchSize": 4, "seqLength": 64, "trainIters": iters,
                     "warmupIters": 2, "lr": 3e-3, "minLr": 3e-4, "saveInterval": save, "evalInterval": 1000,
                     "evalIters": 2, "logInterval": 1, "keepLastN": 2},
        "data": {"pretrain": {"prefixes": [{"path": data["prefix"]}], "split": "95,5,0"}},
        "checkpoint": {"output": {"path": str(out)}},
    }


def assert_loss_falls(curve: dict[int, float], margin: float) -> None:
    its = sorted(curve)
    first, last = [curve[i] for i in its[:5]], [curve[i] for i in its[-5:]]
    assert sum(last) / 5 < sum(first) / 5 - margin, f"loss did not fall enough: {first} -> {last}"


@pytest.fixture(scope="module")
def dense_reference(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dense-ref") / "ckpt"
    spec = write_spec(out.parent / "job.yaml", pretrain_spec(data, out))
    proc = torchrun(spec)
    assert proc.returncode == 0, explain(proc)
    assert "engine=cpu" in proc.stdout
    return out


def test_dense_pretrain_loss_falls_and_checkpoints(dense_reference):
    curve = losses(dense_reference)
    assert sorted(curve) == list(range(1, 31))
    assert_loss_falls(curve, margin=0.3)
    # keepLastN=2: iterations 20 and 30 remain, in Megatron's layout, tracker on the last.
    assert sorted(p.name for p in dense_reference.glob("iter_*")) == ["iter_0000020", "iter_0000030"]
    assert (dense_reference / "latest_checkpointed_iteration.txt").read_text() == "30"
    assert (dense_reference / "iter_0000030" / "mp_rank_00" / "model_optim_rng.pt").is_file()
    records = [json.loads(x) for x in (dense_reference / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["engine"] == "cpu" for r in records if r["event"] == "train")
    assert list((dense_reference / "tensorboard").glob("events.out.tfevents.*"))


def test_megatron_checkpoint_holds_iteration_and_mcore_keys(dense_reference):
    import torch

    obj = torch.load(dense_reference / "iter_0000030" / "mp_rank_00" / "model_optim_rng.pt", map_location="cpu",
                     weights_only=False)
    assert obj["iteration"] == 30
    assert obj["checkpoint_version"] == 3.0
    keys = set(obj["model"])
    assert "embedding.word_embeddings.weight" in keys
    assert "decoder.layers.0.self_attention.linear_qkv.weight" in keys
    assert "decoder.layers.1.mlp.linear_fc1.weight" in keys


def test_checkpoint_exports_to_hf_and_loads_in_transformers(dense_reference, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from qwen_trainer.checkpoint.weights import read_weights
    from qwen_trainer.convert import convert

    target = tmp_path / "hf"
    convert(dense_reference, "mcore", target, "hf", progress=False, verify=True)
    model = AutoModelForCausalLM.from_pretrained(target)
    ours = read_weights(dense_reference / "iter_0000030", "mcore")
    for name, tensor in model.state_dict().items():
        if name in ours:
            assert torch.equal(tensor, ours[name]), name
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    assert model(ids).logits.shape == (1, 5, 600)
    assert (target / "tokenizer.json").is_file()


def test_restart_after_crashes_repeats_the_loss_curve_bitwise(data, dense_reference, tmp_path):
    """Run the reference job again, but (1) SIGKILL rank 1 right after checkpoint 10, (2) restart and die while
    writing checkpoint 20 (files written, folder not yet renamed), (3) restart again: it resumes from 10 and the
    whole curve equals the uninterrupted run's, float for float."""
    out = tmp_path / "ckpt"
    spec = write_spec(tmp_path / "job.yaml", pretrain_spec(data, out))

    first = torchrun(spec, env={"QWEN_TRAINER_FAULT": "after_save@10:1"})
    assert first.returncode != 0, "a killed rank must bring the job down"
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "10"

    second = torchrun(spec, env={"QWEN_TRAINER_FAULT": "save_before_rename@20"})
    assert second.returncode != 0
    assert "resumed from" in second.stdout and "iteration 10" in second.stdout
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "10"
    assert not (out / "iter_0000020").exists()
    assert [p for p in out.iterdir() if p.name.startswith(".iter_0000020")], "the interrupted save leaves scratch"

    third = torchrun(spec)
    assert third.returncode == 0, explain(third)
    assert "resumed from" in third.stdout
    assert not [p for p in out.iterdir() if p.name.startswith(".iter_")], "leftovers are cleaned at start"
    assert losses(out) == losses(dense_reference)


def test_moe_pretrain_loss_falls(data, tmp_path):
    out = tmp_path / "ckpt"
    moe = {"numExperts": 4, "topK": 2, "ffnHiddenSize": 32, "sharedExpertFfnHiddenSize": 64}
    spec = pretrain_spec(data, out, iters=30, save=30, moe=moe, family="qwen2", size="A14B")
    proc = torchrun(write_spec(tmp_path / "job.yaml", spec))
    assert proc.returncode == 0, explain(proc)
    assert "load-balancing loss" in proc.stdout
    assert_loss_falls(losses(out), margin=0.3)
    import torch

    obj = torch.load(out / "iter_0000030" / "mp_rank_00" / "model_optim_rng.pt", map_location="cpu",
                     weights_only=False)
    assert any(".mlp.experts." in k for k in obj["model"])


def test_sft_with_packing_learns_the_responses(data, tmp_path):
    out = tmp_path / "ckpt"
    spec = {
        "stage": "finetune",
        "model": {"family": "qwen3", "size": "0.6B", "tokenizerPath": data["tokenizer"],
                  "architecture": {**TINY_ARCH, "kvChannels": 16}},
        "training": {"microBatchSize": 1, "globalBatchSize": 4, "seqLength": 160, "trainIters": 30,
                     "warmupIters": 2, "lr": 3e-3, "minLr": 3e-4, "saveInterval": 30},
        "data": {"sft": {"trainPath": data["sft"], "packing": True}},
        "checkpoint": {"output": {"path": str(out)}},
    }
    proc = torchrun(write_spec(tmp_path / "job.yaml", spec))
    assert proc.returncode == 0, explain(proc)
    assert "packed" in proc.stdout
    assert_loss_falls(losses(out), margin=0.5)


def test_bad_spec_fails_every_rank_with_one_line_and_no_traceback(data, tmp_path):
    spec = pretrain_spec(data, tmp_path / "ckpt")
    spec["training"]["globalBatchSize"] = 3  # not a multiple of micro batch x 2 ranks
    spec["training"]["bogus"] = 1
    proc = torchrun(write_spec(tmp_path / "job.yaml", spec))
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert any("training.bogus: unknown field" in line for line in errors), proc.stderr
    assert f'File "{REPO / "qwen_trainer"}' not in proc.stderr, "user errors print no traceback from the trainer"
    # every rank that gets as far as reading the spec reports the same problems; once one rank has exited,
    # torchrun stops the other, which on a loaded machine may not have reached that point yet
    assert 1 <= sum("training.bogus: unknown field" in line for line in errors) <= 2


def test_missing_data_is_a_user_error(data, tmp_path):
    spec = pretrain_spec(data, tmp_path / "ckpt")
    spec["data"]["pretrain"]["prefixes"] = [{"path": str(tmp_path / "nope")}]
    proc = torchrun(write_spec(tmp_path / "job.yaml", spec), nproc=1)
    assert proc.returncode != 0
    assert f"{tmp_path / 'nope'}.bin and {tmp_path / 'nope'}.idx do not exist" in proc.stderr
    assert f'File "{REPO / "qwen_trainer"}' not in proc.stderr


def test_resource_document_and_resume_require(data, tmp_path):
    """A whole QwenTrainingJob (Kubernetes fields ignored) with resume=require and nothing to resume."""
    inner = pretrain_spec(data, tmp_path / "ckpt")
    inner["checkpoint"]["resume"] = "require"
    inner.update({"image": {"name": "x"}, "resources": {"nodes": 1, "gpusPerNode": 0, "processesPerNode": 1},
                  "runPolicy": {}, "suspend": False})
    doc = {"apiVersion": "training.qwen.dev/v1alpha1", "kind": "QwenTrainingJob", "metadata": {"name": "t"},
           "spec": copy.deepcopy(inner)}
    proc = torchrun(write_spec(tmp_path / "job.yaml", doc), nproc=1)
    assert proc.returncode != 0
    assert "spec.checkpoint.resume" in proc.stderr or "checkpoint.resume" in proc.stderr, proc.stderr
    assert "no complete checkpoint" in proc.stderr


def test_progress_and_engine_notes_reach_the_resource_status(data, tmp_path, cluster, namespace):
    """Rank 0 patches status.progress of the QwenTrainingJob it runs for (the real API server): the engine and
    what it could not do up front (CUDA graphs asked for, on CPU), then the steps as they finish."""
    import subprocess
    import time

    import yaml

    crd = REPO / "manifests" / "crd" / "qwentrainingjobs.training.qwen.dev.yaml"
    kube = ["kubectl", f"--kubeconfig={cluster.kubeconfig}"]
    subprocess.run([*kube, "apply", "--server-side", "--force-conflicts", "-f", str(crd)], check=True,
                   capture_output=True)
    subprocess.run([*kube, "wait", "--for=condition=Established", "crd/qwentrainingjobs.training.qwen.dev"],
                   check=True, capture_output=True)
    job = pretrain_spec(data, tmp_path / "ckpt", iters=6, save=6)
    job["training"]["cudaGraphs"] = True
    resource = {"apiVersion": "training.qwen.dev/v1alpha1", "kind": "QwenTrainingJob",
                "metadata": {"name": "tiny-progress", "namespace": namespace},
                "spec": {**job, "resources": {"gpusPerNode": 0, "cpu": "1", "memory": "2Gi"}}}
    deadline = time.monotonic() + 30
    while True:
        created = subprocess.run([*kube, "apply", "-f", "-"], input=yaml.safe_dump(resource), capture_output=True,
                                 text=True)
        if created.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert created.returncode == 0, created.stderr
    env = {"QWEN_STATUS_RESOURCE": f"{namespace}/tiny-progress", "KUBECONFIG": str(cluster.kubeconfig)}
    proc = torchrun(write_spec(tmp_path / "job.yaml", job), env=env)
    assert proc.returncode == 0, explain(proc)
    assert "note: CUDA graphs off: the CPU engine runs without a GPU" in proc.stdout
    got = json.loads(subprocess.run([*kube, "get", "-n", namespace, "qwentrainingjob", "tiny-progress", "-o", "json"],
                                    capture_output=True, text=True, check=True).stdout)
    progress = got["status"]["progress"]
    assert progress["engine"] == "cpu" and progress["notes"] == ["CUDA graphs off: the CPU engine runs without a GPU"]
    assert progress["iteration"] == progress["trainIters"] == 6
    assert progress["checkpoint"].endswith("iter_0000006") and progress["summary"].startswith("6/6 (100.0%) loss ")
    assert progress["percentage"] == 100.0 and progress["estimatedRemainingSeconds"] == 0
    assert progress["elapsedSeconds"] >= 0
