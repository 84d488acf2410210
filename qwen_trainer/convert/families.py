"""Per-family mapping tables: which HF tensors become which Megatron tensor, in every naming scheme.

Naming schemes (a format picks an ordered list of them; the first scheme a rule names wins):
    mcore       Megatron-Core, local layer spec (SequentialMLP experts)
    te          Megatron-Core, Transformer-Engine spec (norms fused into the following linear)
    grouped     Megatron-Core grouped-GEMM experts (`experts.linear_fc1.weight{i}`)
    legacy      Megatron-LM legacy model (`language_model.encoder...`)
    megablocks  MegaBlocks dMoE inside the legacy model (`mlp.moe.experts.mlp.w1/v1/w2`)
    megablocks_mcore  MegaBlocks dMoE as the MLP of a Megatron-Core layer: the megatron engine's megablocks backend
    gmm         Megatron-Core's legacy GroupedMLP (`experts.weight1/weight2`): the megatron engine's grouped-GEMM
                experts in memory; no checkpoint format uses it

Placeholders: {layer} is the layer index local to the pipeline chunk, {expert} the expert index local to the
expert-parallel rank; on the HF side both are global. A new family is a new list built from these blocks.
"""

from __future__ import annotations

from .rules import UNSUPPORTED, Rule

H = "model.layers.{layer}."
M = "decoder.layers.{layer}."
L = "language_model.encoder.layers.{layer}."
HX = H + "mlp.experts.{expert}."

EMBEDDING = [
    Rule(("model.embed_tokens.weight",),
         {"mcore": "embedding.word_embeddings.weight", "legacy": "language_model.embedding.word_embeddings.weight"},
         kind="vocab", scope="first"),
]

HEAD = [
    Rule(("model.norm.weight",),
         {"mcore": "decoder.final_layernorm.weight", "legacy": "language_model.encoder.final_norm.weight"},
         scope="last"),
    Rule(("lm_head.weight",), {"mcore": "output_layer.weight", "legacy": "language_model.output_layer.weight"},
         kind="vocab", scope="last", when="untied", linear=True),
]

ATTENTION = [
    Rule((H + "input_layernorm.weight",),
         {"mcore": M + "input_layernorm.weight", "te": M + "self_attention.linear_qkv.layer_norm_weight",
          "legacy": L + "input_norm.weight"}),
    Rule(tuple(H + f"self_attn.{p}_proj.weight" for p in "qkv"),
         {"mcore": M + "self_attention.linear_qkv.weight", "legacy": L + "self_attention.query_key_value.weight"},
         kind="qkv", linear=True),
    Rule(tuple(H + f"self_attn.{p}_proj.bias" for p in "qkv"),
         {"mcore": M + "self_attention.linear_qkv.bias", "legacy": L + "self_attention.query_key_value.bias"},
         kind="qkv", when="qkv_bias"),
    Rule((H + "self_attn.q_norm.weight",),
         {"mcore": M + "self_attention.q_layernorm.weight", "legacy": L + "self_attention.q_layernorm.weight"},
         when="qk_norm"),
    Rule((H + "self_attn.k_norm.weight",),
         {"mcore": M + "self_attention.k_layernorm.weight", "legacy": L + "self_attention.k_layernorm.weight"},
         when="qk_norm"),
    Rule((H + "self_attn.o_proj.weight",),
         {"mcore": M + "self_attention.linear_proj.weight", "legacy": L + "self_attention.dense.weight"},
         kind="row", linear=True),
]

DENSE_MLP = [
    Rule((H + "post_attention_layernorm.weight",),
         {"mcore": M + "pre_mlp_layernorm.weight", "te": M + "mlp.linear_fc1.layer_norm_weight",
          "legacy": L + "post_attention_norm.weight"}),
    Rule((H + "mlp.gate_proj.weight", H + "mlp.up_proj.weight"),
         {"mcore": M + "mlp.linear_fc1.weight", "legacy": L + "mlp.dense_h_to_4h.weight"},
         kind="gate_up", linear=True),
    Rule((H + "mlp.down_proj.weight",), {"mcore": M + "mlp.linear_fc2.weight", "legacy": L + "mlp.dense_4h_to_h.weight"},
         kind="row", linear=True),
]

# MoE layers keep a standalone pre-MLP norm in both Megatron-Core specs.
MOE_MLP = [
    Rule((H + "post_attention_layernorm.weight",),
         {"mcore": M + "pre_mlp_layernorm.weight", "legacy": L + "post_attention_norm.weight"}),
    Rule((H + "mlp.gate.weight",),
         {"mcore": M + "mlp.router.weight", "legacy": L + "mlp.router.weight",
          "megablocks": L + "mlp.moe.router.layer.weight", "megablocks_mcore": M + "mlp.moe.router.layer.weight"}),
    # Megatron fuses gate and up into linear_fc1 ...
    Rule((HX + "gate_proj.weight", HX + "up_proj.weight"),
         {"mcore": M + "mlp.experts.local_experts.{expert}.linear_fc1.weight",
          "grouped": M + "mlp.experts.linear_fc1.weight{expert}",
          "legacy": L + "mlp.local_experts.{expert}.dense_h_to_4h.weight", "megablocks": None, "gmm": None,
          "megablocks_mcore": None},
         kind="gate_up", scope="expert", linear=True),
    Rule((HX + "down_proj.weight",),
         {"mcore": M + "mlp.experts.local_experts.{expert}.linear_fc2.weight",
          "grouped": M + "mlp.experts.linear_fc2.weight{expert}",
          "legacy": L + "mlp.local_experts.{expert}.dense_4h_to_h.weight", "megablocks": None, "gmm": None,
          "megablocks_mcore": None},
         kind="row", scope="expert", linear=True),
    # ... and megatron-core's legacy GroupedMLP stacks every local expert's transposed weights in one tensor ...
    Rule((HX + "gate_proj.weight", HX + "up_proj.weight"),
         {"gmm": M + "mlp.experts.weight1", "mcore": None, "legacy": None},
         kind="gate_up_t", scope="expert", stack_dim=1),
    Rule((HX + "down_proj.weight",), {"gmm": M + "mlp.experts.weight2", "mcore": None, "legacy": None},
         kind="row_t", scope="expert"),
    # ... while MegaBlocks keeps them apart, all local experts stacked on dim 0 (no {expert} in the name).
    # Its GLU computes act(x w1^T) * (x v1^T), so w1 holds gate and v1 holds up; w2 is down_proj transposed.
    Rule((HX + "gate_proj.weight",), {"megablocks": L + "mlp.moe.experts.mlp.w1",
                                     "megablocks_mcore": M + "mlp.moe.experts.mlp.w1", "mcore": None, "legacy": None},
         kind="replicated", scope="expert"),
    Rule((HX + "up_proj.weight",), {"megablocks": L + "mlp.moe.experts.mlp.v1",
                                     "megablocks_mcore": M + "mlp.moe.experts.mlp.v1", "mcore": None, "legacy": None},
         kind="replicated", scope="expert"),
    Rule((HX + "down_proj.weight",), {"megablocks": L + "mlp.moe.experts.mlp.w2",
                                     "megablocks_mcore": M + "mlp.moe.experts.mlp.w2", "mcore": None, "legacy": None},
         kind="transposed", scope="expert"),
]

# Qwen1.5-MoE / Qwen2-MoE shared expert with a sigmoid gate; MegaBlocks has no sigmoid-gated shared expert.
SHARED_EXPERT = [
    Rule((H + "mlp.shared_expert.gate_proj.weight", H + "mlp.shared_expert.up_proj.weight"),
         {"mcore": M + "mlp.shared_experts.linear_fc1.weight", "legacy": L + "mlp.shared_expert.dense_h_to_4h.weight",
          "megablocks": UNSUPPORTED, "megablocks_mcore": UNSUPPORTED},
         kind="gate_up", when="shared_expert", linear=True),
    Rule((H + "mlp.shared_expert.down_proj.weight",),
         {"mcore": M + "mlp.shared_experts.linear_fc2.weight", "legacy": L + "mlp.shared_expert.dense_4h_to_h.weight",
          "megablocks": UNSUPPORTED, "megablocks_mcore": UNSUPPORTED},
         kind="row", when="shared_expert", linear=True),
    Rule((H + "mlp.shared_expert_gate.weight",),
         {"mcore": M + "mlp.shared_experts.gate_weight", "legacy": L + "mlp.shared_expert_gate.weight",
          "megablocks": UNSUPPORTED, "megablocks_mcore": UNSUPPORTED},
         when="shared_expert"),
]

FAMILIES: dict[str, list[Rule]] = {
    # Qwen1.5 / Qwen2 / Qwen2.5: GQA (MHA for Qwen1.5), QKV bias, optional tied embeddings.
    "qwen2": EMBEDDING + ATTENTION + DENSE_MLP + HEAD,
    # Qwen3: per-head q/k RMSNorm, no bias, head_dim independent of hidden/heads.
    "qwen3": EMBEDDING + ATTENTION + DENSE_MLP + HEAD,
    "qwen2_moe": EMBEDDING + ATTENTION + MOE_MLP + SHARED_EXPERT + HEAD,
    "qwen3_moe": EMBEDDING + ATTENTION + MOE_MLP + HEAD,
}
