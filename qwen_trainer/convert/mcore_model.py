"""Build the megatron-core GPTModel a converted checkpoint belongs to (used to check conversions by loading them).

The translation follows the HF config: RMSNorm, SwiGLU, no linear bias, QKV bias for Qwen1.5/2/2.5, q/k norm for
Qwen3, and for MoE the router softmax order from norm_topk_prob plus the Qwen2-MoE sigmoid shared-expert gate.
"""

from __future__ import annotations

import torch

from .spec import ModelSpec


def transformer_config_kwargs(spec: ModelSpec) -> dict:
    cfg = spec.hf_config
    kw = dict(num_layers=spec.layers, hidden_size=spec.hidden, num_attention_heads=spec.heads,
              num_query_groups=spec.groups, kv_channels=spec.head_dim, ffn_hidden_size=spec.ffn or spec.moe_ffn,
              normalization="RMSNorm", layernorm_epsilon=cfg.get("rms_norm_eps", 1e-6), gated_linear_unit=True,
              activation_func=torch.nn.functional.silu, add_bias_linear=False, add_qkv_bias=spec.qkv_bias,
              qk_layernorm=spec.qk_norm, hidden_dropout=0.0, attention_dropout=0.0)
    if spec.is_moe:
        kw.update(num_moe_experts=spec.num_experts, moe_ffn_hidden_size=spec.moe_ffn, moe_router_topk=spec.top_k,
                  moe_router_pre_softmax=not bool(cfg.get("norm_topk_prob", False)),
                  moe_router_load_balancing_type="none")
        if spec.shared_ffn:
            kw.update(moe_shared_expert_intermediate_size=spec.shared_ffn, moe_shared_expert_gate=True)
    return kw


def build_gpt_model(spec: ModelSpec, *, dtype: torch.dtype = torch.float32, grouped_experts: bool = False,
                    transformer_engine: bool = False, **config_overrides):
    """A GPTModel for `spec`; needs torch.distributed and parallel_state initialised by the caller."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (get_gpt_layer_local_spec,
                                                          get_gpt_layer_with_transformer_engine_spec)
    from megatron.core.transformer import TransformerConfig

    if spec.num_experts and not transformer_engine:
        from qwen_trainer.engines.megatron.kernels import ensure_moe_without_te

        ensure_moe_without_te()  # megatron-core 0.16.1's router needs this without Transformer Engine
    kw = transformer_config_kwargs(spec)
    kw.update(params_dtype=dtype, use_cpu_initialization=True, bf16=dtype == torch.bfloat16,
              moe_grouped_gemm=grouped_experts, **config_overrides)
    config = TransformerConfig(**kw)
    experts = spec.num_experts or None
    if transformer_engine:
        layer = get_gpt_layer_with_transformer_engine_spec(experts, moe_grouped_gemm=grouped_experts,
                                                           qk_layernorm=spec.qk_norm)
    else:
        layer = get_gpt_layer_local_spec(experts, moe_grouped_gemm=grouped_experts, qk_layernorm=spec.qk_norm,
                                         normalization="RMSNorm")
    rope = spec.hf_config.get("rope_parameters") or {}
    return GPTModel(config, layer, vocab_size=spec.padded_vocab,
                    max_sequence_length=spec.hf_config.get("max_position_embeddings", 4096),
                    position_embedding_type="rope", share_embeddings_and_output_weights=spec.tied,
                    rotary_base=rope.get("rope_theta", spec.hf_config.get("rope_theta", 10000.0)))
