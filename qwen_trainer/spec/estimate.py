"""Parameter counts, model FLOPs per token and a memory estimate, from the resolved architecture.

FLOPs follow Megatron's `num_floating_point_operations` (0.12+): forward+backward factor 3, multiply-add
factor 2, causal attention counted at half the sequence, only routed top-k experts counted. The memory
estimate covers weights, gradients and Adam state exactly and activations by the Korthikanti et al.
formula; allocator fragmentation and communication buffers are not in it, so treat it as a lower bound.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # a type only: resolve imports this module
    from .resolve import ResolvedArchitecture


def _attention_params(a: ResolvedArchitecture) -> int:
    q = a.num_attention_heads * a.kv_channels
    kv = a.num_query_groups * a.kv_channels
    n = a.hidden_size * (q + 2 * kv) + q * a.hidden_size
    if a.qkv_bias:
        n += q + 2 * kv
    if a.qk_layernorm:
        n += 2 * a.kv_channels
    return n


def _mlp_params(a: ResolvedArchitecture) -> tuple[int, int]:
    """(total, active) parameters of one layer's MLP or MoE block."""
    if a.moe is None:
        n = 3 * a.hidden_size * a.ffn_hidden_size
        return n, n
    m = a.moe
    expert = 3 * a.hidden_size * m.ffn_hidden_size
    shared = 3 * a.hidden_size * m.shared_expert_ffn_hidden_size + (a.hidden_size if m.shared_expert_gate else 0)
    router = m.num_experts * a.hidden_size
    return m.num_experts * expert + shared + router, m.top_k * expert + shared + router


def parameter_counts(a: ResolvedArchitecture) -> tuple[int, int]:
    """(total, active per token) parameters, embeddings included."""
    mlp_total, mlp_active = _mlp_params(a)
    per_layer_common = _attention_params(a) + 2 * a.hidden_size
    embed = a.vocab_size * a.hidden_size
    output = 0 if a.tie_word_embeddings else embed
    total = a.num_layers * (per_layer_common + mlp_total) + embed + output + a.hidden_size
    active = a.num_layers * (per_layer_common + mlp_active) + embed + output + a.hidden_size
    return total, active


def flops_per_token(a: ResolvedArchitecture, seq_length: int) -> float:
    """Training FLOPs (forward + backward) per token, Megatron's formula with the causal half."""
    h, d = a.hidden_size, a.kv_channels
    q = d * a.num_attention_heads
    kv = d * a.num_query_groups
    attention = 6 * (h * (q + 2 * kv) + q * (seq_length / 2) * 2 + q * h)
    if a.moe is None:
        mlp = 6 * h * a.ffn_hidden_size * 3
    else:
        mlp = 6 * h * (a.moe.ffn_hidden_size * a.moe.top_k * 3 + a.moe.shared_expert_ffn_hidden_size * 3)
    logits = 6 * h * a.vocab_size
    return a.num_layers * (attention + mlp) + logits


@dataclass(frozen=True)
class MemoryEstimate:
    weights_gib: float
    gradients_gib: float
    optimizer_gib: float
    activations_gib: float
    total_gib: float

    def to_dict(self) -> dict:
        return asdict(self)


GIB = 1024**3


def memory_per_gpu(
    a: ResolvedArchitecture,
    *,
    tensor: int,
    pipeline: int,
    expert: int,
    data_parallel: int,
    distributed_optimizer: bool,
    expert_data_parallel: int | None = None,
    micro_batch_size: int,
    seq_length: int,
    recompute: str,
    sequence_parallel: bool,
) -> MemoryEstimate:
    """Bytes per GPU on the busiest pipeline stage, mixed precision with fp32 main weights and Adam."""
    total, _ = parameter_counts(a)
    expert_params = 0
    if a.moe is not None:
        expert_params = a.num_layers * a.moe.num_experts * 3 * a.hidden_size * a.moe.ffn_hidden_size
    dense_params = total - expert_params
    dense_shard, expert_shard = dense_params / (tensor * pipeline), expert_params / (pipeline * expert)
    params = dense_shard + expert_shard
    weights = 2 * params
    grads = 4 * params  # megatron-core keeps fp32 gradient buffers
    optim = 12 * params  # fp32 main weights + Adam m and v
    if distributed_optimizer:  # experts' states are split over the expert-data-parallel ranks only
        edp = data_parallel if expert_data_parallel is None else expert_data_parallel
        optim = 12 * (dense_shard / max(data_parallel, 1) + expert_shard / max(edp, 1))
    s, b, h, L = seq_length, micro_batch_size, a.hidden_size, a.num_layers / pipeline
    heads = a.num_attention_heads
    if recompute == "full":
        act = 2 * s * b * h * L  # only layer inputs are kept
    else:
        per_layer = s * b * h * 34
        if recompute != "selective":
            per_layer += 5 * heads * s * s * b
        act = per_layer * L / (tensor if sequence_parallel else 1)
    # logits in fp32 on the last stage
    act += 4 * s * b * a.vocab_size / tensor
    parts = [weights / GIB, grads / GIB, optim / GIB, act / GIB]
    return MemoryEstimate(*[round(x, 3) for x in parts], total_gib=round(sum(parts), 3))


@dataclass(frozen=True)
class CheckpointSize:
    total_gib: float  # one training checkpoint on disk
    per_rank_gib: float  # what the busiest rank writes, and stages in host memory while it does

    def to_dict(self) -> dict:
        return asdict(self)


def checkpoint_size(a: ResolvedArchitecture, *, tensor: int, pipeline: int, expert: int, world: int,
                    save_optimizer: bool = True, reshardable_optimizer: bool = False) -> CheckpointSize:
    """A sharded training checkpoint (qwen_trainer.checkpoint.sharded): bf16 weights, and with the optimizer its fp32
    main weights and Adam's two moments, 14 bytes a parameter in all. Each parameter is written once; the fully
    parallel save spreads the replicas' writing over the data-parallel ranks (the distributed optimizer's states
    are each rank's own already), so a rank writes its model-parallel shard divided by the data-parallel size.
    `reshardable_optimizer` (the distributed optimizer saved 'fully_reshardable'): the first data-parallel rank of
    each model-parallel group gathers and writes that group's whole optimizer state (12 bytes a parameter of the
    shard; of the dense and of the expert shard where it is first in both groups), beside its share of the weights."""
    total, _ = parameter_counts(a)
    expert_params = 0
    if a.moe is not None:
        expert_params = a.num_layers * a.moe.num_experts * 3 * a.hidden_size * a.moe.ffn_hidden_size
    dense_params = total - expert_params
    dense_shard = dense_params / (tensor * pipeline)
    expert_shard = expert_params / (expert * pipeline)
    dense_dp = max(world // (tensor * pipeline), 1)
    expert_dp = max(world // (expert * pipeline), 1)
    spread = dense_shard / dense_dp + expert_shard / expert_dp
    if not save_optimizer:
        return CheckpointSize(round(total * 2 / GIB, 3), round(spread * 2 / GIB, 3))
    per_rank = spread * 14
    if reshardable_optimizer:
        per_rank = (dense_shard + expert_shard) * 12 + spread * 2
    return CheckpointSize(round(total * 14 / GIB, 3), round(per_rank / GIB, 3))
