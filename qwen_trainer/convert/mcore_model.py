"""Build the megatron-core GPTModel a converted checkpoint belongs to (used to check conversions by loading them).

The translation follows the HF config: RMSNorm, SwiGLU, no linear bias, QKV bias for Qwen1.5/2/2.5, q/k norm for
Qwen3, and for MoE the router softmax order from norm_topk_prob plus the Qwen2-MoE sigmoid shared-expert gate.
"""

from __future__ import annotations

import torch

from .dims import ModelDims


def transformer_config_kwargs(dims: ModelDims) -> dict:
    cfg = dims.hf_config
    kw = dict(num_layers=dims.layers, hidden_size=dims.hidden, num_attention_heads=dims.heads,
              num_query_groups=dims.groups, kv_channels=dims.head_dim, ffn_hidden_size=dims.ffn or dims.moe_ffn,
              normalization="RMSNorm", layernorm_epsilon=cfg.get("rms_norm_eps", 1e-6), gated_linear_unit=True,
              activation_func=torch.nn.functional.silu, add_bias_linear=False, add_qkv_bias=dims.qkv_bias,
              qk_layernorm=dims.qk_norm, hidden_dropout=0.0, attention_dropout=0.0)
    if dims.is_moe:
        kw.update(num_moe_experts=dims.num_experts, moe_ffn_hidden_size=dims.moe_ffn, moe_router_topk=dims.top_k,
                  moe_router_pre_softmax=not bool(cfg.get("norm_topk_prob", False)),
                  moe_router_load_balancing_type="none")
        if dims.shared_ffn:
            kw.update(moe_shared_expert_intermediate_size=dims.shared_ffn, moe_shared_expert_gate=True)
    return kw


def build_gpt_model(dims: ModelDims, *, dtype: torch.dtype = torch.float32, grouped_experts: bool = False,
                    transformer_engine: bool = False, **config_overrides):
    """A GPTModel for `dims`; needs torch.distributed and parallel_state initialised by the caller."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (get_gpt_layer_local_spec,
                                                          get_gpt_layer_with_transformer_engine_spec)
    from megatron.core.transformer import TransformerConfig

    if dims.num_experts and not transformer_engine:
        from qwen_trainer.engines.megatron.kernels import ensure_moe_without_te

        ensure_moe_without_te()  # megatron-core 0.16.1's router needs this without Transformer Engine
    kw = transformer_config_kwargs(dims)
    kw.update(params_dtype=dtype, use_cpu_initialization=True, bf16=dtype == torch.bfloat16,
              moe_grouped_gemm=grouped_experts, **config_overrides)
    config = TransformerConfig(**kw)
    experts = dims.num_experts or None
    if transformer_engine:
        layer = get_gpt_layer_with_transformer_engine_spec(experts, moe_grouped_gemm=grouped_experts,
                                                           qk_layernorm=dims.qk_norm)
    else:
        layer = get_gpt_layer_local_spec(experts, moe_grouped_gemm=grouped_experts, qk_layernorm=dims.qk_norm,
                                         normalization="RMSNorm")
    rope = dims.hf_config.get("rope_parameters") or {}
    return GPTModel(config, layer, vocab_size=dims.padded_vocab,
                    max_sequence_length=dims.hf_config.get("max_position_embeddings", 4096),
                    position_embedding_type="rope", share_embeddings_and_output_weights=dims.tied,
                    rotary_base=rope.get("rope_theta", dims.hf_config.get("rope_theta", 10000.0)))
