"""Architecture presets per Qwen family and size, as published in the model cards and used by the
Pai-Megatron-Patch launch scripts. Data only: every other module reads these tables.

Vocabulary: the BPE vocabulary has 151643 entries; checkpoints pad it to 151936 (extra 293) or 152064
(extra 421). Qwen3 checkpoints always use 151936.
"""

from __future__ import annotations

BASE_VOCAB_SIZE = 151643

FAMILIES = ("qwen1.5", "qwen2", "qwen2.5", "qwen3")

# Columns: num_layers, hidden_size, num_attention_heads, num_query_groups, ffn_hidden_size,
#          norm_epsilon, extra_vocab_size, tie_word_embeddings, max_position_embeddings
_DENSE_COLUMNS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "ffn_hidden_size",
    "norm_epsilon",
    "extra_vocab_size",
    "tie_word_embeddings",
    "max_position_embeddings",
)

_DENSE_ROWS: dict[str, dict[str, tuple]] = {
    "qwen1.5": {
        "0.5B": (24, 1024, 16, 16, 2816, 1e-6, 293, False, 32768),
        "1.8B": (24, 2048, 16, 16, 5504, 1e-6, 293, False, 32768),
        "4B": (40, 2560, 20, 20, 6912, 1e-6, 293, False, 32768),
        "7B": (32, 4096, 32, 32, 11008, 1e-6, 293, False, 32768),
        "14B": (40, 5120, 40, 40, 13696, 1e-6, 293, False, 32768),
        "32B": (64, 5120, 40, 8, 27392, 1e-6, 293, False, 32768),
        "72B": (80, 8192, 64, 64, 24576, 1e-6, 421, False, 32768),
        "A2.7B": (24, 2048, 16, 16, 5632, 1e-6, 293, False, 8192),
    },
    "qwen2": {
        "0.5B": (24, 896, 14, 2, 4864, 1e-6, 293, True, 131072),
        "1.5B": (28, 1536, 12, 2, 8960, 1e-6, 293, True, 131072),
        "7B": (28, 3584, 28, 4, 18944, 1e-6, 421, False, 131072),
        "72B": (80, 8192, 64, 8, 29568, 1e-5, 421, False, 131072),
        "A14B": (28, 3584, 28, 4, 18944, 1e-6, 293, False, 131072),
    },
    "qwen2.5": {
        "0.5B": (24, 896, 14, 2, 4864, 1e-6, 293, True, 32768),
        "1.5B": (28, 1536, 12, 2, 8960, 1e-6, 293, True, 32768),
        "3B": (36, 2048, 16, 2, 11008, 1e-6, 293, True, 32768),
        "7B": (28, 3584, 28, 4, 18944, 1e-6, 421, False, 131072),
        "14B": (48, 5120, 40, 8, 13824, 1e-5, 421, False, 131072),
        "32B": (64, 5120, 40, 8, 27648, 1e-5, 421, False, 131072),
        "72B": (80, 8192, 64, 8, 29568, 1e-5, 421, False, 131072),
    },
    "qwen3": {
        "0.6B": (28, 1024, 16, 8, 3072, 1e-6, 293, True, 40960),
        "1.7B": (28, 2048, 16, 8, 6144, 1e-6, 293, True, 40960),
        "4B": (36, 2560, 32, 8, 9728, 1e-6, 293, True, 40960),
        "8B": (36, 4096, 32, 8, 12288, 1e-6, 293, False, 40960),
        "14B": (40, 5120, 40, 8, 17408, 1e-6, 293, False, 40960),
        "32B": (64, 5120, 64, 8, 25600, 1e-6, 293, False, 40960),
        "A3B": (48, 2048, 32, 4, 6144, 1e-6, 293, False, 40960),
        "A22B": (94, 4096, 64, 4, 12288, 1e-6, 293, False, 40960),
    },
}

# MoE presets: num_experts, top_k, expert ffn, shared expert ffn (0 = none), shared-expert sigmoid gate,
# renormalise top-k probabilities, aux-loss coefficient, load-balancing type.
_MOE_COLUMNS = (
    "num_experts",
    "top_k",
    "ffn_hidden_size",
    "shared_expert_ffn_hidden_size",
    "shared_expert_gate",
    "norm_topk_prob",
    "aux_loss_coeff",
    "load_balancing_type",
)

_MOE_ROWS: dict[str, dict[str, tuple]] = {
    "qwen1.5": {"A2.7B": (60, 4, 1408, 5632, True, False, 1e-2, "aux_loss")},
    "qwen2": {"A14B": (64, 8, 2560, 20480, True, False, 1e-3, "seq_aux_loss")},
    "qwen3": {
        "A3B": (128, 8, 768, 0, False, True, 1e-3, "aux_loss"),
        "A22B": (128, 8, 1536, 0, False, True, 1e-3, "aux_loss"),
    },
}

# Family-wide constants.
FAMILY_TRAITS: dict[str, dict] = {
    "qwen1.5": {"qkv_bias": True, "qk_layernorm": False, "rotary_base": 1_000_000, "kv_channels": None},
    "qwen2": {"qkv_bias": True, "qk_layernorm": False, "rotary_base": 1_000_000, "kv_channels": None},
    "qwen2.5": {"qkv_bias": True, "qk_layernorm": False, "rotary_base": 1_000_000, "kv_channels": None},
    "qwen3": {"qkv_bias": False, "qk_layernorm": True, "rotary_base": 1_000_000, "kv_channels": 128},
}

# Qwen3 checkpoints fix the padded vocabulary regardless of the extra-vocab knob.
FIXED_VOCAB_SIZE = {"qwen3": 151936}


def sizes(family: str) -> tuple[str, ...]:
    return tuple(_DENSE_ROWS[family])


def is_moe_size(family: str, size: str) -> bool:
    return size in _MOE_ROWS.get(family, {})


def dense_preset(family: str, size: str) -> dict:
    row = _DENSE_ROWS[family][size]
    return dict(zip(_DENSE_COLUMNS, row))


def moe_preset(family: str, size: str) -> dict | None:
    row = _MOE_ROWS.get(family, {}).get(size)
    return None if row is None else dict(zip(_MOE_COLUMNS, row))


def all_sizes() -> dict[str, tuple[str, ...]]:
    return {family: sizes(family) for family in FAMILIES}
