"""The pods the operator renders run the trainer's entry point: the Master container's command and environment,
taken from a rendered PyTorchJob, executed here as local processes (what `qwenctl run --local` does)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qwen_operator.local import local_command
from qwen_operator.render import render

from .trainer_helpers import REPO, explain

pytestmark = pytest.mark.slow
EXAMPLE = REPO / "manifests" / "examples" / "cpu-convert.yaml"


def test_rendered_pod_command_runs_the_convert_stage(tmp_path):
    import torch

    from qwen_operator.api import validate_resource_spec
    from qwen_trainer.data.synthetic import make_demo_data
    from qwen_trainer.engines.hf_model import build_model, hf_config
    from qwen_trainer.spec import resolve_architecture

    doc = yaml.safe_load(EXAMPLE.read_text())
    # What the pod would run, exactly as rendered.
    container = render({**doc, "metadata": {**doc["metadata"], "namespace": "default"}})[1][
        "spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    argv, env = local_command(doc, root=str(tmp_path), nproc=None, workdir=tmp_path)
    assert argv[3:] == [a.replace("$(PET_NNODES)", "1").replace("$(PET_NODE_RANK)", "0")
                        .replace("$(PET_MASTER_ADDR)", "127.0.0.1").replace("$(PET_MASTER_PORT)", env["PET_MASTER_PORT"])
                        .replace("/etc/qwen/job.yaml", str(tmp_path / "job.yaml")) for a in container["command"][1:]]
    assert all(env[e["name"]] == e["value"] for e in container["env"] if e["name"] not in ("QWEN_STATUS_RESOURCE", "QWEN_JOB_SPEC"))

    # The volume the example mounts at /data, as a local directory with a tiny random HF checkpoint in it.
    data = tmp_path / "data"
    made = make_demo_data(data, vocab_size=512, sft_samples=4)
    spec = validate_resource_spec(doc["spec"])
    torch.manual_seed(0)
    model = build_model(hf_config(resolve_architecture(spec.job_spec())))
    model.save_pretrained(data / "tiny-moe-hf")
    for f in Path(made["tokenizer"]).iterdir():
        shutil.copy(f, data / "tiny-moe-hf" / f.name)

    proc = subprocess.run([sys.executable, "-m", "qwen_operator.cli", "run", "--local", "--root", str(tmp_path), str(EXAMPLE)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, explain(proc)
    out = data / "tiny-moe-mcore"
    assert (out / "latest_checkpointed_iteration.txt").read_text().strip() == "release"
    assert (out / "release" / "mp_rank_00" / "model_optim_rng.pt").is_file()
