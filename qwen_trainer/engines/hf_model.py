"""The Hugging Face view of a resolved architecture: config, model, and state dicts in checkpoint naming.

Qwen1.5, Qwen2 and Qwen2.5 dense models are `Qwen2Config`; their MoE models (Qwen1.5-MoE, Qwen2-MoE) are
`Qwen2MoeConfig`; Qwen3 uses `Qwen3Config` / `Qwen3MoeConfig`. State dicts exchanged with the converter and
written as safetensors use the on-disk naming of published checkpoints (one tensor per expert), not the packed
in-memory layout that recent transformers versions use for experts.
"""

from __future__ import annotations

import os
import tempfile
from typing import Optional

import torch

from qwen_trainer.spec.resolve import ResolvedArchitecture


def hf_config(arch: ResolvedArchitecture, init_std: float = 0.02, dropout: float = 0.0,
              bos_token_id: Optional[int] = None, eos_token_id: Optional[int] = None):
    from transformers import Qwen2Config, Qwen2MoeConfig, Qwen3Config, Qwen3MoeConfig

    common = dict(
        vocab_size=arch.vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.ffn_hidden_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_query_groups,
        max_position_embeddings=arch.max_position_embeddings,
        rms_norm_eps=arch.norm_epsilon,
        tie_word_embeddings=arch.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(arch.rotary_base)},
        initializer_range=init_std,
        attention_dropout=dropout,
        hidden_act="silu",
        use_cache=False,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )
    moe = arch.moe
    head_dim_default = arch.hidden_size // arch.num_attention_heads
    if arch.family == "qwen3":
        if moe is None:
            return Qwen3Config(head_dim=arch.kv_channels, attention_bias=arch.qkv_bias, **common)
        cfg = Qwen3MoeConfig(
            attention_bias=arch.qkv_bias,
            num_experts=moe.num_experts,
            num_experts_per_tok=moe.top_k,
            moe_intermediate_size=moe.ffn_hidden_size,
            norm_topk_prob=moe.norm_topk_prob,
            router_aux_loss_coef=moe.aux_loss_coeff,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            **common,
        )
        cfg.head_dim = arch.kv_channels
        return cfg
    if arch.kv_channels != head_dim_default:
        raise ValueError(f"{arch.family} models need kvChannels = hidden / heads = {head_dim_default}")
    if moe is None:
        return Qwen2Config(**common)
    return Qwen2MoeConfig(
        qkv_bias=arch.qkv_bias,
        num_experts=moe.num_experts,
        num_experts_per_tok=moe.top_k,
        moe_intermediate_size=moe.ffn_hidden_size,
        shared_expert_intermediate_size=moe.shared_expert_ffn_hidden_size,
        norm_topk_prob=moe.norm_topk_prob,
        router_aux_loss_coef=moe.aux_loss_coeff,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        **common,
    )


def build_model(config, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    return model


def vestigial_keys(model) -> set[str]:
    """Tensors transformers builds that the model does not have: Qwen2-MoE's block always makes a shared expert and
    its gate, so a model without one (shared_expert_intermediate_size 0: upcycled or MegaBlocks models) carries a
    zero-width expert, whose output is zero, and a gate in front of it. They are left out of checkpoints and
    filled with zeros on load."""
    if getattr(model.config, "model_type", "") != "qwen2_moe" or model.config.shared_expert_intermediate_size:
        return set()
    return {k for k in model.state_dict() if ".mlp.shared_expert." in k or ".mlp.shared_expert_gate." in k}


def checkpoint_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's weights in published-checkpoint naming (experts one by one), detached, on CPU."""
    from transformers.core_model_loading import revert_weight_conversion

    skip = vestigial_keys(model)
    sd = {k: v.detach() for k, v in model.state_dict().items() if k not in skip}
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    sd = revert_weight_conversion(model, sd)
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def load_checkpoint_state_dict(model, state_dict: dict[str, torch.Tensor]) -> None:
    """Load weights given in published-checkpoint naming into `model` (in place), strictly."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    own = model.state_dict()
    state_dict = {**{k: torch.zeros_like(own[k], device="cpu") for k in vestigial_keys(model)}, **state_dict}
    runtime_keys = set(own)
    if set(state_dict) <= runtime_keys and _shapes_match(model, state_dict):
        missing = runtime_keys - set(state_dict) - _tied_keys(model)
        if missing:
            raise KeyError(f"missing weights: {sorted(missing)[:5]}")
        model.load_state_dict(state_dict, strict=False)
        return
    # Experts (or other tensors) need transformers' own load-time conversion: go through from_pretrained.
    with tempfile.TemporaryDirectory(prefix="hf-load-") as tmp:
        save_file({k: v.contiguous() for k, v in state_dict.items()}, os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        loaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=next(model.parameters()).dtype)
        src = loaded.state_dict()
        missing = runtime_keys - set(src)
        if missing:
            raise KeyError(f"missing weights: {sorted(missing)[:5]}")
        model.load_state_dict(src, strict=True)


def _tied_keys(model) -> set[str]:
    return {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()


def _shapes_match(model, state_dict) -> bool:
    own = model.state_dict()
    return all(tuple(own[k].shape) == tuple(v.shape) for k, v in state_dict.items())
