"""What model is trained: family, size preset, backend, architecture overrides and MoE settings."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from .base import PositiveInt, SpecModel

Family = Literal["qwen1.5", "qwen2", "qwen2.5", "qwen3"]
Backend = Literal["megatron-lm", "megatron-core", "megablocks"]
Size = Literal[
    "0.5B", "0.6B", "1.5B", "1.7B", "1.8B", "3B", "4B", "7B", "8B", "14B", "32B", "72B",
    "A2.7B", "A3B", "A14B", "A22B",
]


class Architecture(SpecModel):
    """Explicit overrides of the size preset. Any field left out comes from the preset."""

    num_layers: Optional[PositiveInt] = None
    """Number of transformer layers."""
    hidden_size: Optional[PositiveInt] = None
    """Model width."""
    ffn_hidden_size: Optional[PositiveInt] = None
    """Intermediate size of the dense SwiGLU MLP."""
    num_attention_heads: Optional[PositiveInt] = None
    """Number of query heads."""
    num_query_groups: Optional[PositiveInt] = None
    """Number of key/value heads (grouped-query attention); equal to the heads for multi-head attention."""
    kv_channels: Optional[PositiveInt] = None
    """Head dimension; defaults to hidden size / heads (Qwen3 fixes it at 128)."""
    max_position_embeddings: Optional[PositiveInt] = None
    """Maximum positions of the rotary embedding."""
    norm_epsilon: Optional[float] = Field(default=None, gt=0, lt=1)
    """RMSNorm epsilon."""
    rotary_base: Optional[PositiveInt] = None
    """Rotary embedding base (theta)."""
    vocab_size: Optional[PositiveInt] = None
    """Padded vocabulary size; overrides 151643 + training.extraVocabSize."""
    tie_word_embeddings: Optional[bool] = None
    """Share the input embedding with the output layer."""
    qkv_bias: Optional[bool] = None
    """Bias on the query/key/value projections (Qwen1.5, Qwen2, Qwen2.5)."""
    qk_layernorm: Optional[bool] = None
    """RMSNorm on queries and keys (Qwen3)."""


class Upcycling(SpecModel):
    """Start an MoE model from a dense checkpoint: every expert begins as a full copy of the dense MLP (gate stays
    gate, up stays up) and top-k weights are renormalised, so the MoE starts out computing what the dense model did."""

    enabled: bool = False
    """Turn the dense source checkpoint into an MoE checkpoint during conversion."""
    router_init_std: float = Field(default=0.02, gt=0)
    """Standard deviation of the freshly initialised router."""
    seed: int = 1234
    """Seed of the router initialisation, so conversion is reproducible."""


class MoE(SpecModel):
    """Mixture-of-experts settings. Presets A2.7B, A14B, A3B and A22B fill these; dense sizes need numExperts to be an MoE."""

    num_experts: Optional[PositiveInt] = None
    """Experts per MoE layer."""
    top_k: Optional[PositiveInt] = None
    """Experts each token is routed to."""
    ffn_hidden_size: Optional[PositiveInt] = None
    """Intermediate size of one expert; defaults to the dense FFN size (upcycling) or the preset."""
    shared_expert_ffn_hidden_size: Optional[int] = Field(default=None, ge=0)
    """Intermediate size of the shared expert (0 = none)."""
    shared_expert_gate: Optional[bool] = None
    """Scale the shared expert by a sigmoid gate (Qwen1.5-MoE, Qwen2-MoE)."""
    norm_topk_prob: Optional[bool] = None
    """Renormalise the top-k routing probabilities (Qwen3-MoE)."""
    aux_loss_coeff: Optional[float] = Field(default=None, ge=0)
    """Load-balancing loss weight."""
    load_balancing_type: Optional[Literal["aux_loss", "seq_aux_loss", "sinkhorn", "none"]] = None
    """Load-balancing method."""
    capacity_factor: Optional[float] = Field(default=None, gt=0)
    """Expert capacity factor; unset means dropless."""
    grouped_gemm: bool = True
    """Run the experts as one grouped GEMM where the kernels exist (else one GEMM per expert)."""
    token_dispatcher: Literal["alltoall", "allgather"] = "alltoall"
    """How tokens reach experts on other expert-parallel ranks."""
    shared_expert_overlap: bool = False
    """Overlap the shared expert with token dispatch."""
    layer_recompute: bool = False
    """Recompute the MoE layer in the backward pass to save memory."""
    upcycling: Upcycling = Field(default_factory=Upcycling)
    """Dense-to-MoE upcycling (the MegaBlocks flow)."""


class ModelSpec(SpecModel):
    """The model to train or convert."""

    family: Family
    """Qwen generation: qwen1.5, qwen2, qwen2.5 or qwen3."""
    size: Size
    """Size preset; MoE presets are A2.7B (qwen1.5), A14B (qwen2), A3B and A22B (qwen3)."""
    backend: Backend = "megatron-core"
    """Training backend and checkpoint layout: megatron-lm (legacy layout), megatron-core, megablocks (dMoE)."""
    architecture: Architecture = Field(default_factory=Architecture)
    """Overrides of the size preset's architecture."""
    moe: Optional[MoE] = None
    """Mixture-of-experts settings (required for megablocks and for upcycling a dense size)."""
    tokenizer_path: Optional[str] = Field(default=None, pattern=r"^/", max_length=4096)
    """Directory with the Hugging Face tokenizer files; defaults to the source checkpoint."""
