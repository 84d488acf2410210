"""Tiny random Qwen checkpoints built from transformers configs (no downloads), shared by the converter tests."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

COMMON = dict(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[])


def _build(name: str):
    from transformers import (Qwen2Config, Qwen2ForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3Config,
                              Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)

    if name == "qwen1.5":  # MHA with QKV bias
        return Qwen2ForCausalLM(Qwen2Config(**dict(COMMON, num_key_value_heads=4)))
    if name == "qwen2.5-tied":  # GQA, QKV bias, tied embeddings like the small Qwen2.5 sizes
        return Qwen2ForCausalLM(Qwen2Config(**COMMON, tie_word_embeddings=True))
    if name == "qwen3":  # q/k norm, no bias, head_dim (32) != hidden/heads (16)
        return Qwen3ForCausalLM(Qwen3Config(**COMMON, head_dim=32))
    if name == "qwen2-moe":  # shared expert with sigmoid gate
        return Qwen2MoeForCausalLM(Qwen2MoeConfig(**COMMON, **MOE, shared_expert_intermediate_size=64))
    if name == "qwen3-moe":
        return Qwen3MoeForCausalLM(Qwen3MoeConfig(**COMMON, **MOE, head_dim=32, norm_topk_prob=True))
    raise KeyError(name)


FAMILIES = ("qwen1.5", "qwen2.5-tied", "qwen3", "qwen2-moe", "qwen3-moe")


def save_tiny(name: str, directory: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = _build(name)
    with torch.no_grad():  # norms initialise to ones; randomise them so a swapped norm cannot go unnoticed
        for n, p in model.named_parameters():
            if "norm" in n:
                p.normal_(1.0, 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(directory)
    (directory / "tokenizer_config.json").write_text('{"model_max_length": 256}')
    return directory


def load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_same(a: Path, b: Path) -> None:
    x, y = load_tensors(a), load_tensors(b)
    assert x.keys() == y.keys(), sorted(x.keys() ^ y.keys())
    bad = [k for k in x if x[k].dtype != y[k].dtype or not torch.equal(x[k], y[k])]
    assert not bad, bad
