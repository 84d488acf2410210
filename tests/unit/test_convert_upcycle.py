"""Dense -> MoE upcycling (the MegaBlocks flow): experts are copies of the dense MLP with gate and up in their roles."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from .convert_models import load_tensors, save_tiny
from qwen_trainer.convert import ParallelLayout, UpcycleOptions, convert

warnings.filterwarnings("ignore", category=UserWarning)
UP = UpcycleOptions(num_experts=4, top_k=2, seed=7)


@pytest.mark.parametrize("family", ["qwen3", "qwen1.5"])
def test_upcycle_to_megablocks_and_back(tmp_path, family):
    dense = save_tiny(family, tmp_path / "dense")
    mb, back = tmp_path / "mb", tmp_path / "back"
    convert(dense, "hf", mb, "megablocks", layout=ParallelLayout(tp=2, ep=2), upcycle=UP, extra_vocab_size=12,
            progress=False, verify=True)
    convert(mb, "megablocks", back, "hf", progress=False)

    d, m = load_tensors(dense), load_tensors(back)
    cfg = json.loads((back / "config.json").read_text())
    assert cfg["model_type"] == {"qwen3": "qwen3_moe", "qwen1.5": "qwen2_moe"}[family] and cfg["num_experts"] == 4
    for layer in range(4):
        p = f"model.layers.{layer}.mlp."
        for e in range(4):
            for w in ("gate_proj", "up_proj", "down_proj"):
                assert torch.equal(m[f"{p}experts.{e}.{w}.weight"], d[f"{p}{w}.weight"])
        assert m[f"{p}gate.weight"].shape == (4, 64) and m[f"{p}gate.weight"].std() < 0.05
    for k in d:
        if ".mlp." not in k:
            assert torch.equal(m[k], d[k]), k

    # MegaBlocks GLU computes act(x w1^T) * (x v1^T): w1 must hold gate_proj, v1 up_proj, w2 down_proj^T.
    rank = torch.load(mb / "release" / "mp_rank_01_001" / "model_optim_rng.pt", weights_only=False)
    enc = rank["model"]["language_model"]["encoder"]
    w1, v1, w2 = (enc[f"layers.0.mlp.moe.experts.mlp.{n}"] for n in ("w1", "v1", "w2"))
    ffn = 128
    assert w1.shape == v1.shape == w2.shape == (2 * ffn, 64)  # two local experts stacked, not TP-split
    assert torch.equal(w1[ffn:], d["model.layers.0.mlp.gate_proj.weight"])
    assert torch.equal(v1[:ffn], d["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(w2[:ffn], d["model.layers.0.mlp.down_proj.weight"].t())

    # Same seed, same router.
    again = tmp_path / "again"
    convert(dense, "hf", again, "hf", upcycle=UP, progress=False)
    assert torch.equal(load_tensors(again)["model.layers.2.mlp.gate.weight"], m["model.layers.2.mlp.gate.weight"])


def test_upcycled_model_computes_the_dense_function(tmp_path):
    from transformers import AutoModelForCausalLM

    dense = save_tiny("qwen3", tmp_path / "dense")
    moe = tmp_path / "moe"
    convert(dense, "hf", moe, "hf", upcycle=UP, progress=False)
    ids = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(dense).eval()(ids).logits
        b = AutoModelForCausalLM.from_pretrained(moe).eval()(ids).logits
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
