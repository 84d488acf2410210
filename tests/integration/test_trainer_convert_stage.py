"""The convert and export stages as a pod runs them: the seed's MegaBlocks flow in miniature (a dense Qwen1.5
checkpoint upcycled into experts, sharded for expert parallel 2) and back to Hugging Face."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from .trainer_helpers import explain, torchrun, write_spec

pytestmark = pytest.mark.slow

ARCH = {"numLayers": 2, "hiddenSize": 64, "ffnHiddenSize": 128, "numAttentionHeads": 4, "numQueryGroups": 4, "vocabSize": 512}


def test_upcycle_to_megablocks_then_export(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from qwen_trainer.data.synthetic import make_demo_data
    from qwen_trainer.engines.hf_model import build_model, hf_config
    from qwen_trainer.spec import load_job_spec, resolve_architecture

    made = make_demo_data(tmp_path / "data", vocab_size=512, sft_samples=4)
    dense_spec = {"stage": "convert", "model": {"family": "qwen1.5", "size": "0.5B", "architecture": ARCH},
                  "checkpoint": {"source": {"path": "/x"}, "output": {"path": "/y"}}}
    torch.manual_seed(0)
    dense = build_model(hf_config(resolve_architecture(load_job_spec(dense_spec))))
    hf = tmp_path / "hf"
    dense.save_pretrained(hf)
    for f in Path(made["tokenizer"]).iterdir():
        shutil.copy(f, hf / f.name)

    model = {"family": "qwen1.5", "size": "0.5B", "backend": "megablocks", "architecture": ARCH,
             "moe": {"numExperts": 4, "topK": 2}}
    convert = {"stage": "convert", "model": {**model, "moe": {**model["moe"], "upcycling": {"enabled": True}}},
               "parallelism": {"expert": 2, "distributedOptimizer": False}, "training": {"globalBatchSize": 2},
               "checkpoint": {"source": {"path": str(hf), "format": "hf"}, "output": {"path": str(tmp_path / "mb")},
                              "verify": True, "dtype": "fp32"}}
    proc = torchrun(write_spec(tmp_path / "convert.yaml", convert), nproc=2)
    assert proc.returncode == 0, explain(proc)
    ranks = sorted(p.name for p in (tmp_path / "mb" / "release").iterdir())
    assert ranks == ["mp_rank_00_000", "mp_rank_00_001"]  # expert-parallel shards

    export = {"stage": "export", "model": model, "parallelism": {"expert": 2, "distributedOptimizer": False},
              "training": {"globalBatchSize": 2},
              "checkpoint": {"source": {"path": str(tmp_path / "mb")}, "output": {"path": str(tmp_path / "moe-hf")},
                             "dtype": "fp32"}}
    proc = torchrun(write_spec(tmp_path / "export.yaml", export), nproc=2)
    assert proc.returncode == 0, explain(proc)
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "moe-hf")
    assert moe.config.num_experts == 4 and moe.config.num_experts_per_tok == 2
    # Every expert starts as the dense MLP, so the upcycled model computes what the dense one did.
    ids = torch.tensor([[5, 17, 42, 7, 99, 3]])
    with torch.no_grad():
        diff = (moe(ids).logits - dense(ids).logits).abs().max().item()
    assert diff < 1e-4, diff
