"""Model dimensions (read from a Hugging Face config) and the parallel layout a conversion targets."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .errors import ConversionError

# HF model_type -> family table name. Qwen1.5, Qwen2 and Qwen2.5 share model_type "qwen2" and one table
# (Qwen1.5 is the MHA case num_key_value_heads == num_attention_heads).
MODEL_TYPES = {"qwen2": "qwen2", "qwen3": "qwen3", "qwen2_moe": "qwen2_moe", "qwen3_moe": "qwen3_moe"}
FAMILY_ALIASES = {
    "qwen1.5": "qwen2", "qwen1_5": "qwen2", "qwen2": "qwen2", "qwen2.5": "qwen2", "qwen2_5": "qwen2",
    "qwen3": "qwen3", "qwen1.5-moe": "qwen2_moe", "qwen1.5_moe": "qwen2_moe", "qwen2-moe": "qwen2_moe",
    "qwen2_moe": "qwen2_moe", "qwen3-moe": "qwen3_moe", "qwen3_moe": "qwen3_moe",
}


@dataclass(frozen=True)
class ModelDims:
    """The numbers the mapping rules need; everything else in the HF config is carried along untouched."""

    family: str
    hidden: int
    layers: int
    heads: int
    groups: int
    head_dim: int
    ffn: int
    vocab: int  # HF vocab_size (rows in the HF embedding)
    padded_vocab: int  # rows in the Megatron embedding (vocab + extra)
    tied: bool
    qkv_bias: bool
    qk_norm: bool
    num_experts: int = 0
    moe_ffn: int = 0
    shared_ffn: int = 0
    top_k: int = 0
    hf_config: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    # Named predicates the family tables refer to in `Rule.when`.
    @property
    def untied(self) -> bool:
        return not self.tied

    @property
    def shared_expert(self) -> bool:
        return self.shared_ffn > 0


def load_hf_config(directory: Path) -> dict:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{directory}: missing config.json (the Hugging Face config describes the model)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None


def resolve_family(config: dict, family: Optional[str]) -> str:
    model_type = config.get("model_type")
    detected = MODEL_TYPES.get(model_type or "")
    if family is None:
        if detected is None:
            archs = ",".join(config.get("architectures") or []) or "none"
            raise ConversionError(
                f"unknown architecture: model_type={model_type!r} (architectures: {archs}); "
                f"supported model types: {', '.join(sorted(MODEL_TYPES))}")
        return detected
    table = FAMILY_ALIASES.get(family.lower())
    if table is None:
        raise ConversionError(f"unknown family {family!r}; known: {', '.join(sorted(FAMILY_ALIASES))}")
    if detected is not None and detected != table:
        raise ConversionError(f"family {family!r} does not match the config's model_type {model_type!r}")
    return table


def model_dims(config: dict, family: Optional[str] = None, *, extra_vocab_size: int = 0,
               padded_vocab_size: Optional[int] = None) -> ModelDims:
    fam = resolve_family(config, family)
    try:
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        groups = int(config.get("num_key_value_heads") or heads)
        vocab = int(config["vocab_size"])
        layers = int(config["num_hidden_layers"])
    except KeyError as e:
        raise ConversionError(f"config.json lacks {e.args[0]!r}") from None
    head_dim = int(config.get("head_dim") or hidden // heads)
    padded = int(padded_vocab_size) if padded_vocab_size else vocab + int(extra_vocab_size)
    if padded < vocab:
        raise ConversionError(f"padded vocab size {padded} is smaller than the model's vocab_size {vocab}")
    moe = fam.endswith("_moe")
    if moe and config.get("mlp_only_layers"):
        raise ConversionError("mlp_only_layers (dense layers inside an MoE model) is not supported")
    if moe and int(config.get("decoder_sparse_step", 1)) != 1:
        raise ConversionError("decoder_sparse_step != 1 (dense layers inside an MoE model) is not supported")
    qkv_bias = fam in ("qwen2", "qwen2_moe") and bool(config.get("qkv_bias", True)) or bool(
        config.get("attention_bias", False))
    return ModelDims(
        family=fam, hidden=hidden, layers=layers, heads=heads, groups=groups, head_dim=head_dim,
        ffn=int(config.get("intermediate_size") or 0), vocab=vocab, padded_vocab=padded,
        tied=bool(config.get("tie_word_embeddings", False)), qkv_bias=qkv_bias, qk_norm=fam.startswith("qwen3"),
        num_experts=int(config.get("num_experts") or config.get("num_local_experts") or 0) if moe else 0,
        moe_ffn=int(config.get("moe_intermediate_size") or 0) if moe else 0,
        shared_ffn=int(config.get("shared_expert_intermediate_size") or 0) if moe else 0,
        top_k=int(config.get("num_experts_per_tok") or 0) if moe else 0,
        hf_config=config,
    )


@dataclass(frozen=True)
class ParallelLayout:
    """Megatron model-parallel layout of a per-rank checkpoint. etp=None means the format's default
    (= tp for Megatron-Core, 1 for MegaBlocks, whose experts are not tensor-parallel). vpp is the number of
    virtual pipeline chunks per stage (Megatron's virtual_pipeline_model_parallel_size)."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: Optional[int] = None
    vpp: int = 1

    def as_dict(self) -> dict[str, Any]:
        return {"tp": self.tp, "pp": self.pp, "ep": self.ep, "etp": self.etp, "vpp": self.vpp}


def layout_problems(dims: ModelDims, lay: ParallelLayout, etp: int) -> list[str]:
    """Every way the layout fails to divide the model, one line each."""
    p: list[str] = []
    for name, v in (("tp", lay.tp), ("pp", lay.pp), ("ep", lay.ep), ("etp", etp), ("vpp", lay.vpp)):
        if v < 1:
            p.append(f"{name}={v}: must be >= 1")
    if p:
        return p

    def need(value: int, by: int, what: str, axis: str) -> None:
        if value % by:
            p.append(f"{what} ({value}) is not divisible by {axis} ({by})")

    need(dims.heads, lay.tp, "attention heads", "tp")
    need(dims.groups, lay.tp, "query groups (num_key_value_heads)", "tp")
    need(dims.padded_vocab, lay.tp, "padded vocab size", "tp; use extra_vocab_size to pad")
    if dims.ffn and not dims.is_moe:
        need(dims.ffn, lay.tp, "intermediate_size", "tp")
    need(dims.layers, lay.pp * lay.vpp, "layers", "pp*vpp")
    if lay.vpp > 1 and lay.pp == 1:
        p.append("vpp > 1 needs pp > 1")
    if dims.is_moe:
        need(dims.num_experts, lay.ep, "experts", "ep")
        need(dims.moe_ffn, etp, "moe_intermediate_size", "etp")
        if dims.shared_ffn:
            need(dims.shared_ffn, lay.tp, "shared_expert_intermediate_size", "tp")
        if etp not in (1, lay.tp):
            p.append(f"etp ({etp}) must be 1 or equal to tp ({lay.tp}) in per-rank checkpoint formats")
    elif lay.ep > 1:
        p.append(f"ep={lay.ep} needs an MoE model (this {dims.family} model has no experts)")
    return p


@dataclass(frozen=True)
class UpcycleOptions:
    """Dense -> MoE upcycling: every expert starts as a copy of the dense MLP (gate stays gate, up stays up);
    the router starts small and random (normal(0, router_std), seeded) so experts diverge during training."""

    num_experts: int
    top_k: int = 2
    router_std: float = 0.02
    seed: int = 0
    norm_topk_prob: bool = True  # weights of the k identical experts sum to 1: the MoE starts equal to the dense MLP
