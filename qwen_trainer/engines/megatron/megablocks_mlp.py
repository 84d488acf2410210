"""The megablocks backend: MegaBlocks' dropless MoE layer (`megablocks.layers.dmoe.dMoE`) as the MLP of each
megatron-core transformer layer.

MegaBlocks needs CUDA (its ops extension, grouped GEMM and Triton kernels, and `Arguments.device` defaults to the
current GPU) and the `megablocks` package; without either, `require_megablocks` stops the job with one line.

Mapping of our MoE settings onto `megablocks.layers.arguments.Arguments`: SwiGLU experts are `mlp_type="glu"`
with silu; the grouped-GEMM implementation (`mlp_impl="grouped"`) is the one recommended for Hopper; top-k
renormalisation (`norm_topk_prob`) is `moe_normalize_expert_weights=1`; expert parallelism reuses the
expert-parallel group megatron-core built (`moe_expert_model_parallelism`, `expert_parallel_group`). MegaBlocks has
no sigmoid-gated shared expert, so the Qwen1.5/Qwen2-MoE shared expert cannot be represented: a spec that has one
is refused rather than silently trained without it.

Checkpoints: `sharded_state_dict` hands megatron's dist_checkpointing this rank's experts under megatron-core's
keys and layout, so the engine saves a MegaBlocks model per rank like the other backends, and the checkpoint is one
the megatron-core backend, the converter and a run at another expert-parallel size read alike.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from qwen_trainer.errors import UserError


def require_megablocks(caps) -> None:
    if not caps.cuda:
        raise UserError("backend megablocks needs a CUDA GPU and none is visible to this process",
                        path="spec.model.backend")
    if not caps.megablocks:
        raise UserError("backend megablocks needs the megablocks package (pip install megablocks), "
                        "which is not installed in this image", path="spec.model.backend")


class MegablocksMLP(torch.nn.Module):
    """megatron MLP interface (`forward(hidden) -> (output, bias)`) around MegaBlocks' dMoE."""

    def __init__(self, config, submodules=None, pg_collection=None, **_ignored):
        super().__init__()
        from megablocks.layers.arguments import Arguments
        from megablocks.layers.dmoe import dMoE

        from megatron.core import parallel_state

        if config.moe_shared_expert_intermediate_size:
            raise UserError("MegaBlocks has no sigmoid-gated shared expert; use backend megatron-core for this model",
                            path="spec.model.moe.sharedExpertFfnHiddenSize")
        ep = config.expert_model_parallel_size
        args = Arguments(
            hidden_size=config.hidden_size,
            ffn_hidden_size=config.moe_ffn_hidden_size,
            num_layers=config.num_layers,
            bias=False,
            return_bias=False,
            activation_fn=F.silu,
            mlp_type="glu",
            mlp_impl="grouped",
            moe_num_experts=config.num_moe_experts,
            moe_top_k=config.moe_router_topk,
            moe_capacity_factor=config.moe_expert_capacity_factor or 1,
            moe_normalize_expert_weights=None if config.moe_router_pre_softmax else 1,
            moe_loss_weight=config.moe_aux_loss_coeff or 0.0,
            moe_expert_model_parallelism=ep > 1,
            expert_parallel_group=parallel_state.get_expert_model_parallel_group() if ep > 1 else None,
            pipeline_model_parallel_size=config.pipeline_model_parallel_size,
            fp16=config.fp16,
            bf16=config.bf16,
            device=torch.cuda.current_device(),
            init_method=config.init_method,
            output_layer_init_method=config.output_layer_init_method,
        )
        self.moe = dMoE(args)
        self.num_experts = config.num_moe_experts

    def forward(self, hidden_states, padding_mask=None, **_ignored):
        return self.moe(hidden_states), None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """Every rank its own experts, under megatron-core's keys (see expert_sharded_state_dict)."""
        from megatron.core import parallel_state as ps

        return expert_sharded_state_dict(
            prefix, self.state_dict(prefix="", keep_vars=True), sharded_offsets,
            num_experts=self.num_experts,
            ep_rank=ps.get_expert_model_parallel_rank(), ep_size=ps.get_expert_model_parallel_world_size(),
            tp_rank=ps.get_tensor_model_parallel_rank(),
            dp_rank=ps.get_data_parallel_rank(with_context_parallel=True),
            expert_dp_rank=ps.get_expert_data_parallel_rank())


# MegaBlocks' parameter names (module state-dict keys below the MLP) and the megatron-core keys they are saved under
ROUTER, W1, V1, W2 = "moe.router.layer.weight", "moe.experts.mlp.w1", "moe.experts.mlp.v1", "moe.experts.mlp.w2"
MCORE_ROUTER = "router.weight"
MCORE_FC1 = "experts.experts.linear_fc1.weight"
MCORE_FC2 = "experts.experts.linear_fc2.weight"


def expert_sharded_state_dict(prefix: str, params: dict, sharded_offsets: tuple, *, num_experts: int, ep_rank: int,
                              ep_size: int, tp_rank: int, dp_rank: int, expert_dp_rank: int) -> dict:
    """The MegaBlocks MLP's sharded state dict: this rank's experts as regions of megatron-core's global expert
    tensors, so every rank saves its own experts (no gather) and the checkpoint has the keys and layout of the
    megatron-core backend's (`decoder.layers.mlp.experts.experts.linear_fc1.weight` [layers, experts, 2 x ffn,
    hidden], gate rows then up rows; `...linear_fc2.weight` [layers, experts, hidden, ffn]; `...mlp.router.weight`).
    The converter's torch_dist reader (export) and a resume at any expert-parallel size, with either backend, read
    it like any megatron-core checkpoint.

    MegaBlocks keeps the rank's `num_experts / ep_size` local experts stacked on dim 0: w1 (gate) and v1 (up) are
    [local x ffn, hidden], w2 is down_proj transposed, [local x ffn, hidden]. Each is a ShardedTensorFactory whose
    build cuts the parameter (a view, no copy) into the global layout and whose merge puts a loaded region back in
    MegaBlocks' shape; megatron's optimizers apply the same factory to their fp32 copies and Adam moments.
    `params` are the module's state-dict tensors (keep_vars, so the optimizer finds its parameters);
    `sharded_offsets` the layer axis megatron's transformer block passes down."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    unknown = sorted(set(params) - {ROUTER, W1, V1, W2})
    if unknown:
        raise RuntimeError(f"MegaBlocks MLP state {unknown} has no place in the sharded checkpoint layout")
    if num_experts % ep_size:
        raise ValueError(f"{num_experts} experts do not split over {ep_size} expert-parallel ranks")
    local = num_experts // ep_size
    hidden = params[W1].shape[-1]
    ffn = params[W1].shape[0] // local
    prepend = len(sharded_offsets)
    expert_axis = prepend  # global axes: the layer axis first, then experts
    expert_replica = (0, 0, expert_dp_rank)  # experts are whole on each rank (expertTensor 1)
    out: dict = {}

    def factory(name: str, key: str, half: Optional[int]):
        transposed = half is None

        def build(key, data, replica_id, flattened_range):
            if flattened_range is not None:
                raise ValueError("flattened ranges are not used with MegaBlocks experts")
            view = data.view(local, ffn, hidden)
            offsets = [(expert_axis, ep_rank, ep_size)]
            if transposed:
                view = view.transpose(1, 2)  # down_proj: [hidden, ffn] per expert
            else:
                offsets.append((expert_axis + 1, half, 2))  # gate rows, then up rows
            return ShardedTensor.from_rank_offsets(key, view, *sharded_offsets, *offsets, replica_id=replica_id,
                                                   prepend_axis_num=prepend)

        def merge(loaded):
            t = loaded.transpose(1, 2) if transposed else loaded
            return t.reshape(local * ffn, hidden)

        out[prefix + name] = ShardedTensorFactory(prefix + key, params[name], build, merge, expert_replica)

    factory(W1, MCORE_FC1, 0)
    factory(V1, MCORE_FC1, 1)
    factory(W2, MCORE_FC2, None)
    router = params[ROUTER]
    if tuple(router.shape) != (num_experts, hidden):
        raise ValueError(f"router weight has shape {tuple(router.shape)}, expected {(num_experts, hidden)}")
    out[prefix + ROUTER] = ShardedTensor.from_rank_offsets(prefix + MCORE_ROUTER, router, *sharded_offsets,
                                                           replica_id=(0, tp_rank, dp_rank), prepend_axis_num=prepend)
    return out


def megablocks_mlp_spec():
    from megatron.core.transformer.spec_utils import ModuleSpec

    return ModuleSpec(module=MegablocksMLP)
