"""The `args` namespace Megatron stores next to the weights (it checks parallel sizes and shapes on load)."""

from __future__ import annotations

import argparse

import torch

from ..dims import ModelDims, ParallelLayout


def megatron_args(dims: ModelDims, layout: ParallelLayout, etp: int, *, ckpt_format: str, transformer_impl: str,
                  dtype: torch.dtype) -> argparse.Namespace:
    cfg = dims.hf_config
    rope = cfg.get("rope_parameters") or {}
    return argparse.Namespace(
        num_layers=dims.layers, hidden_size=dims.hidden, ffn_hidden_size=dims.ffn or dims.moe_ffn,
        num_attention_heads=dims.heads, num_query_groups=dims.groups, group_query_attention=dims.groups != dims.heads,
        kv_channels=dims.head_dim, padded_vocab_size=dims.padded_vocab, orig_vocab_size=dims.vocab,
        # The padded size is exact; stop Megatron from rounding it again.
        make_vocab_size_divisible_by=1,
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep, expert_tensor_parallel_size=etp,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        num_experts=dims.num_experts or None, moe_ffn_hidden_size=dims.moe_ffn or None,
        moe_shared_expert_intermediate_size=dims.shared_ffn or None, moe_router_topk=dims.top_k or None,
        moe_shared_expert_gate=dims.shared_ffn > 0,
        moe_router_pre_softmax=not bool(cfg.get("norm_topk_prob", False)) if dims.is_moe else False,
        untie_embeddings_and_output_weights=not dims.tied, add_qkv_bias=dims.qkv_bias, qk_layernorm=dims.qk_norm,
        add_bias_linear=False, swiglu=True, normalization="RMSNorm", norm_epsilon=cfg.get("rms_norm_eps", 1e-6),
        position_embedding_type="rope", rotary_base=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
        max_position_embeddings=cfg.get("max_position_embeddings"), seq_length=cfg.get("max_position_embeddings"),
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        transformer_impl=transformer_impl, ckpt_format=ckpt_format, rank=0, tokenizer_type="HuggingFaceTokenizer",
        data_parallel_size=1, world_size=layout.tp * layout.pp,
    )
