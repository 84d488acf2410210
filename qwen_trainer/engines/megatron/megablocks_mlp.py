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
"""

from __future__ import annotations

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

    def forward(self, hidden_states, padding_mask=None, **_ignored):
        return self.moe(hidden_states), None


def megablocks_mlp_spec():
    from megatron.core.transformer.spec_utils import ModuleSpec

    return ModuleSpec(module=MegablocksMLP)
