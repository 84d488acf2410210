"""Converted checkpoints load into a real megatron-core GPTModel (CPU, local spec) with every parameter filled."""

from __future__ import annotations

import warnings

import pytest
import torch

from .convert_models import load_tensors, save_tiny
from qwen_trainer.convert import convert, open_source
from qwen_trainer.convert.mcore_model import build_gpt_model

warnings.filterwarnings("ignore", category=UserWarning)


@pytest.mark.parametrize("family", ["qwen2.5-tied", "qwen3", "qwen2-moe", "qwen3-moe"])
def test_per_rank_checkpoint_loads_strict(megatron_world, tmp_path, family):
    hf = save_tiny(family, tmp_path / "hf")
    out = tmp_path / "mcore"
    convert(hf, "hf", out, "mcore", extra_vocab_size=12, progress=False)
    dims = open_source(out, "mcore").dims
    model = build_gpt_model(dims)
    state = torch.load(out / "release" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)
    model.load_state_dict(state["model"], strict=True)  # raises on any missing or unexpected key / shape
    emb = load_tensors(hf)["model.embed_tokens.weight"]
    w = model.embedding.word_embeddings.weight
    assert w.shape[0] == 512 and torch.equal(w[:500], emb) and not w[500:].any()


@pytest.mark.parametrize("family", ["qwen2.5-tied", "qwen2-moe", "qwen3-moe"])
def test_torch_dist_checkpoint_loads_through_sharded_state_dict(megatron_world, tmp_path, family):
    from megatron.core import dist_checkpointing

    hf = save_tiny(family, tmp_path / "hf")
    out = tmp_path / "dist"
    convert(hf, "hf", out, "torch_dist", extra_vocab_size=12, progress=False)
    dims = open_source(out, "torch_dist").dims
    model = build_gpt_model(dims)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))  # anything the checkpoint does not fill stays NaN
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(out / "release"))
    assert loaded["iteration"] == 0 and loaded["args"].padded_vocab_size == 512
    model.load_state_dict(loaded["model"], strict=True)
    nan = [n for n, p in model.named_parameters() if torch.isnan(p).any()]
    assert not nan, nan
    t = load_tensors(hf)
    qkv = model.decoder.layers[1].self_attention.linear_qkv.weight
    q, k, v = (t[f"model.layers.1.self_attn.{x}_proj.weight"] for x in "qkv")
    qd = dims.heads // dims.groups * dims.head_dim  # query rows of one KV group, then that group's k and v
    d = dims.head_dim
    assert torch.equal(qkv[:qd], q[:qd]) and torch.equal(qkv[qd:qd + d], k[:d])
    assert torch.equal(qkv[qd + d:qd + 2 * d], v[:d]) and torch.equal(qkv[qd + 2 * d:2 * qd + 2 * d], q[qd:2 * qd])
