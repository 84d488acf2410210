"""Resolve a job spec into concrete values: the full architecture, defaults that depend on the backend,
and the derived numbers (iterations, vocabulary, world and data-parallel sizes) shown to users.

Pure functions; they assume the spec passed structural validation. Numbers follow the launch scripts'
integer arithmetic (tokens // global batch // sequence length).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from pydantic.alias_generators import to_camel

from . import presets
from .estimate import MemoryEstimate, memory_per_gpu, parameter_counts
from .job import JobSpec

BACKEND_FORMAT = {"megatron-lm": "megatron-lm", "megatron-core": "mcore", "megablocks": "megablocks"}


@dataclass(frozen=True)
class ResolvedMoE:
    num_experts: int
    top_k: int
    ffn_hidden_size: int
    shared_expert_ffn_hidden_size: int
    shared_expert_gate: bool
    norm_topk_prob: bool
    aux_loss_coeff: float
    load_balancing_type: str
    capacity_factor: Optional[float]


@dataclass(frozen=True)
class ResolvedArchitecture:
    family: str
    size: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    max_position_embeddings: int
    norm_epsilon: float
    rotary_base: int
    vocab_size: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_layernorm: bool
    moe: Optional[ResolvedMoE]

    def to_dict(self) -> dict:
        return asdict(self)


def padded_vocab_size(spec: JobSpec) -> int:
    arch = spec.model.architecture
    if arch.vocab_size is not None:
        return arch.vocab_size
    family, size = spec.model.family, spec.model.size
    if family in presets.FIXED_VOCAB_SIZE and spec.training.extra_vocab_size is None:
        return presets.FIXED_VOCAB_SIZE[family]
    extra = spec.training.extra_vocab_size
    if extra is None:
        extra = presets.dense_preset(family, size)["extra_vocab_size"]
    return presets.BASE_VOCAB_SIZE + extra


def _pick(override, default):
    return default if override is None else override


def resolve_moe(spec: JobSpec, dense_ffn: int) -> Optional[ResolvedMoE]:
    family, size, moe = spec.model.family, spec.model.size, spec.model.moe
    preset = presets.moe_preset(family, size) if size in ("A2.7B", "A14B", "A3B", "A22B") else None
    if preset is None and (moe is None or moe.num_experts is None):
        return None
    preset = preset or {
        "num_experts": None,
        "top_k": 2,
        "ffn_hidden_size": dense_ffn,
        "shared_expert_ffn_hidden_size": 0,
        "shared_expert_gate": False,
        # an MoE made from a dense size (upcycling): renormalised top-k keeps it equal to the dense model at start
        "norm_topk_prob": True,
        "aux_loss_coeff": 1e-2,
        "load_balancing_type": "aux_loss",
    }
    if moe is None:
        return ResolvedMoE(**preset, capacity_factor=None)
    num_experts = _pick(moe.num_experts, preset["num_experts"])
    return ResolvedMoE(
        num_experts=num_experts,
        top_k=_pick(moe.top_k, preset["top_k"]),
        ffn_hidden_size=_pick(moe.ffn_hidden_size, preset["ffn_hidden_size"]),
        shared_expert_ffn_hidden_size=_pick(moe.shared_expert_ffn_hidden_size, preset["shared_expert_ffn_hidden_size"]),
        shared_expert_gate=_pick(moe.shared_expert_gate, preset["shared_expert_gate"]),
        norm_topk_prob=_pick(moe.norm_topk_prob, preset["norm_topk_prob"]),
        aux_loss_coeff=_pick(moe.aux_loss_coeff, preset["aux_loss_coeff"]),
        load_balancing_type=_pick(moe.load_balancing_type, preset["load_balancing_type"]),
        capacity_factor=moe.capacity_factor,
    )


def resolve_architecture(spec: JobSpec) -> ResolvedArchitecture:
    family, size = spec.model.family, spec.model.size
    dense = presets.dense_preset(family, size)
    traits = presets.FAMILY_TRAITS[family]
    o = spec.model.architecture
    hidden = _pick(o.hidden_size, dense["hidden_size"])
    heads = _pick(o.num_attention_heads, dense["num_attention_heads"])
    kv_channels = _pick(o.kv_channels, traits["kv_channels"] or max(hidden // heads, 1))
    ffn = _pick(o.ffn_hidden_size, dense["ffn_hidden_size"])
    return ResolvedArchitecture(
        family=family,
        size=size,
        num_layers=_pick(o.num_layers, dense["num_layers"]),
        hidden_size=hidden,
        ffn_hidden_size=ffn,
        num_attention_heads=heads,
        num_query_groups=_pick(o.num_query_groups, dense["num_query_groups"]),
        kv_channels=kv_channels,
        max_position_embeddings=_pick(o.max_position_embeddings, dense["max_position_embeddings"]),
        norm_epsilon=_pick(o.norm_epsilon, dense["norm_epsilon"]),
        rotary_base=_pick(o.rotary_base, traits["rotary_base"]),
        vocab_size=padded_vocab_size(spec),
        tie_word_embeddings=_pick(o.tie_word_embeddings, dense["tie_word_embeddings"]),
        qkv_bias=_pick(o.qkv_bias, traits["qkv_bias"]),
        qk_layernorm=_pick(o.qk_layernorm, traits["qk_layernorm"]),
        moe=resolve_moe(spec, ffn),
    )


def lr_decay_style(spec: JobSpec) -> str:
    if spec.training.lr_decay_style is not None:
        return spec.training.lr_decay_style
    return "linear" if spec.model.backend == "megatron-lm" else "cosine"


def init_method_std(spec: JobSpec) -> float:
    if spec.training.init_method_std is not None:
        return spec.training.init_method_std
    return 0.006 if spec.model.backend == "megatron-lm" else 0.008


def checkpoint_formats(spec: JobSpec) -> tuple[Optional[str], Optional[str]]:
    """(source format, output format) with the stage's and backend's defaults applied."""
    backend_format = BACKEND_FORMAT[spec.model.backend]
    src = spec.checkpoint.source.format if spec.checkpoint.source else None
    out = spec.checkpoint.output.format if spec.checkpoint.output else None
    stage = spec.stage
    if stage == "convert":
        src, out = src or "hf", out or backend_format
    elif stage == "export":
        src, out = src or backend_format, out or "hf"
    elif stage == "evaluate":
        src = src or "hf"
    else:  # pretrain / finetune read and write the backend's layout
        src, out = src or backend_format, out or backend_format
    return src, out


@dataclass(frozen=True)
class Schedule:
    train_iters: Optional[int]
    warmup_iters: int
    decay_iters: Optional[int]
    basis: str  # tokens | iterations | epochs


def schedule(spec: JobSpec) -> Schedule:
    """Iterations as the seed's scripts compute them (bash integer division)."""
    t = spec.training
    if t.train_tokens is not None:
        iters = t.train_tokens // t.global_batch_size // t.seq_length
        warmup = (t.warmup_tokens or 0) // t.global_batch_size // t.seq_length
        return Schedule(iters, warmup, iters, "tokens")
    if t.train_iters is not None:
        warmup = t.warmup_iters or 0
        return Schedule(t.train_iters, warmup, max(t.train_iters - warmup, 0), "iterations")
    if t.epochs is not None:
        return Schedule(None, t.warmup_iters or 0, None, "epochs")
    return Schedule(None, 0, None, "none")


@dataclass(frozen=True)
class Derived:
    world_size: Optional[int]
    data_parallel_size: Optional[int]
    expert_data_parallel_size: Optional[int]
    gradient_accumulation_steps: Optional[int]
    padded_vocab_size: int
    train_iters: Optional[int]
    warmup_iters: int
    decay_iters: Optional[int]
    schedule_basis: str
    tokens_per_step: int
    lr_decay_style: str
    init_method_std: float
    source_format: Optional[str]
    output_format: Optional[str]
    parameters: int
    active_parameters: int

    def to_dict(self) -> dict:
        """camelCase keys, as users read them in status and `qwenctl explain`."""
        return {to_camel(k): v for k, v in asdict(self).items()}


def derive(spec: JobSpec, world_size: Optional[int] = None) -> Derived:
    arch = resolve_architecture(spec)
    p = spec.parallelism
    model_parallel = p.tensor * p.pipeline * p.context
    dp = world_size // model_parallel if world_size and world_size % model_parallel == 0 else None
    edp = None
    if world_size and world_size % (p.pipeline * p.expert * p.expert_tensor) == 0:
        edp = world_size // (p.pipeline * p.expert * p.expert_tensor)
    t = spec.training
    ga = None
    if dp and t.global_batch_size % (t.micro_batch_size * dp) == 0:
        ga = t.global_batch_size // (t.micro_batch_size * dp)
    sched = schedule(spec)
    src, out = checkpoint_formats(spec)
    total, active = parameter_counts(arch)
    return Derived(
        world_size=world_size,
        data_parallel_size=dp,
        expert_data_parallel_size=edp,
        gradient_accumulation_steps=ga,
        padded_vocab_size=arch.vocab_size,
        train_iters=sched.train_iters,
        warmup_iters=sched.warmup_iters,
        decay_iters=sched.decay_iters,
        schedule_basis=sched.basis,
        tokens_per_step=t.global_batch_size * t.seq_length,
        lr_decay_style=lr_decay_style(spec),
        init_method_std=init_method_std(spec),
        source_format=src,
        output_format=out,
        parameters=total,
        active_parameters=active,
    )


def job_memory_per_gpu(job: JobSpec, world_size: int) -> MemoryEstimate:
    """estimate.memory_per_gpu for a job spec run on `world_size` processes (the layout `qwenctl explain`
    reports)."""
    derived = derive(job, world_size)
    p, t = job.parallelism, job.training
    return memory_per_gpu(
        resolve_architecture(job),
        tensor=p.tensor,
        pipeline=p.pipeline,
        expert=p.expert,
        data_parallel=derived.data_parallel_size or 1,
        distributed_optimizer=p.distributed_optimizer,
        expert_data_parallel=derived.expert_data_parallel_size or None,
        micro_batch_size=t.micro_batch_size,
        seq_length=t.seq_length,
        recompute=t.activation_checkpointing.mode,
        sequence_parallel=p.sequence_parallel,
    )
