"""Token dispatch for MoE layers whose experts all live on this rank, without a device-to-host synchronisation.

megatron-core's dispatchers are built for expert parallelism: even when the expert-parallel and expert
tensor-parallel groups have one rank, they bring the number of tokens per expert to the host (the grouped GEMM
packages they call take host-side group sizes) and permute with `masked_select`, whose output size the host
must read back. Each of those waits drains the GPU's queue, and the kernels launched after it start only as fast
as Python issues them: on one GPU the MoE step spent about a quarter of its time with the GPU idle.

With every expert local and no token dropping, none of that is needed: the permuted token count is tokens x top-k,
known on the host, and torch's grouped GEMM takes its group offsets on the device. `LocalTokenDispatcher` keeps
megatron's permutation order (tokens grouped by expert, ascending token index within an expert) and combine
(scatter-add, or index-add when deterministic algorithms are on), so results match megatron's dispatcher; it
only replaces how the order is computed (`nonzero_static`, sync-free on CUDA) and leaves out the host copies.

With `gather=True` (EngineOptions.gather_permute) the two adds of the permutation, the combine's forward and the
dispatch's backward, become gathers over each token's `topk` rows (`token_slots`): one fp32 sum per token and a
single rounding to bf16, where megatron's scatter-add/index-add take `topk` atomic bf16 adds into a zeroed
tensor (slow on the GPU and one rounding per add). The order of rows and everything the experts see are unchanged.
With experts spread over ranks, megatron's all-to-all dispatcher keeps its communication and host-side splits and
gets the same gathers for its first permutation and last unpermutation (`install_alltoall_gather`), which list
every token `topk` times just as here.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterable, Optional

import torch


def local_permutation(routing_map: torch.Tensor, probs: Optional[torch.Tensor], topk: int):
    """(token index, routing probability) of each permuted row, and tokens per expert, all on the device.

    routing_map: [tokens, experts] bool with exactly `topk` entries per row (dropless top-k routing).
    Rows are ordered by expert, then by token index, as megatron's `permute` orders them. Without probs the
    permuted probabilities are None.
    """
    num_tokens, num_experts = routing_map.shape
    flat = torch.nonzero_static(routing_map.t().reshape(-1), size=num_tokens * topk).squeeze(1)
    expert = torch.div(flat, num_tokens, rounding_mode="floor")
    token = flat - expert * num_tokens
    permuted_probs = None if probs is None else probs.reshape(-1).index_select(0, token * num_experts + expert)
    tokens_per_expert = routing_map.sum(dim=0)
    return token, permuted_probs, tokens_per_expert


def combine(expert_output: torch.Tensor, token: torch.Tensor, restore_shape) -> torch.Tensor:
    """Sum each token's expert outputs back into its row (megatron's unpermute without probabilities)."""
    out = torch.zeros(restore_shape, dtype=expert_output.dtype, device=expert_output.device)
    if torch.are_deterministic_algorithms_enabled():
        return out.index_add_(0, token, expert_output)
    return out.scatter_add_(0, token.unsqueeze(1).expand(-1, restore_shape[-1]), expert_output)


def token_slots(token: torch.Tensor, topk: int) -> torch.Tensor:
    """[tokens, topk]: the permuted rows holding each token (its experts in ascending order).

    `token` lists the token of each permuted row; with dropless top-k routing every token appears exactly `topk`
    times, so a stable sort by token lists token 0's rows, then token 1's, each in row (that is expert) order.
    """
    return torch.sort(token, stable=True).indices.view(-1, topk)


def gather_sum(rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """out[t] = sum of rows[slots[t, j]] over j, summed in fp32 (torch's reduction) and rounded once."""
    num_tokens, topk = slots.shape
    return rows.index_select(0, slots.reshape(-1)).view(num_tokens, topk, rows.shape[-1]).sum(dim=1)


class PermuteRows(torch.autograd.Function):
    """rows = tokens[token]; its gradient sums each token's rows by gathering them (no atomic index-add)."""

    @staticmethod
    def forward(ctx, tokens, token, slots):
        ctx.save_for_backward(slots)
        return tokens.index_select(0, token)

    @staticmethod
    def backward(ctx, grad):
        (slots,) = ctx.saved_tensors
        return gather_sum(grad, slots), None, None


class CombineRows(torch.autograd.Function):
    """out[t] = sum of the rows holding token t, by gathering them (no zero fill, no atomic scatter-add)."""

    @staticmethod
    def forward(ctx, rows, token, slots):
        ctx.save_for_backward(token)
        return gather_sum(rows, slots)

    @staticmethod
    def backward(ctx, grad):
        (token,) = ctx.saved_tensors
        return grad.index_select(0, token), None, None


def _dispatcher_class():
    from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher

    class LocalTokenDispatcher(MoETokenDispatcher):
        """Dispatcher for one rank holding every expert (see the module docstring)."""

        def __init__(self, replaced: MoETokenDispatcher, gather: bool = False):
            # The replaced dispatcher's process groups and config; no CUDA side stream, no host buffers.
            self.config = replaced.config
            self.shared_experts = None
            self.ep_group, self.tp_group, self.tp_ep_group = replaced.ep_group, replaced.tp_group, replaced.tp_ep_group
            self.tp_size, self.tp_rank, self.ep_size = replaced.tp_size, replaced.tp_rank, replaced.ep_size
            # what a CUDA graph of the router + permutation must hand to the eager experts that follow it
            self.cudagraph_attrs, self.valid_cudagraph_attrs = ["token", "tokens_per_expert"], None
            self.topk = self.config.moe_router_topk
            self.gather, self.slots = gather, None
            if gather:
                self.cudagraph_attrs.append("slots")

        def dispatch_preprocess(self, hidden_states, routing_map, probs):
            self.hidden_shape = hidden_states.shape
            tokens = hidden_states.view(-1, self.hidden_shape[-1])
            self.restore_shape = tokens.shape
            self.token, permuted_probs, self.tokens_per_expert = local_permutation(routing_map, probs, self.topk)
            if not self.gather:
                return tokens.index_select(0, self.token), permuted_probs
            self.slots = token_slots(self.token, self.topk)
            return PermuteRows.apply(tokens, self.token, self.slots), permuted_probs

        def token_dispatch(self, hidden_states, probs):
            return hidden_states, probs

        def dispatch_postprocess(self, hidden_states, probs):
            tokens_per_expert, self.tokens_per_expert = self.tokens_per_expert, None
            return hidden_states, tokens_per_expert, probs

        def combine_preprocess(self, hidden_states):
            return hidden_states

        def token_combine(self, hidden_states):
            return hidden_states

        def combine_postprocess(self, hidden_states):
            if self.gather:
                out = CombineRows.apply(hidden_states, self.token, self.slots)
            else:
                out = combine(hidden_states, self.token, self.restore_shape)
            self.token = self.slots = None
            return out.view(self.hidden_shape)

    return LocalTokenDispatcher


_GATHERING: contextvars.ContextVar = contextvars.ContextVar("qwen_gather_dispatcher", default=None)
"""The all-to-all dispatcher whose permutation is running with gathers (set around its pre/post-processing)."""


@contextlib.contextmanager
def _gathering(dispatcher):
    mark = _GATHERING.set(dispatcher)
    try:
        yield
    finally:
        _GATHERING.reset(mark)


def _gathering_permute(original: Callable) -> Callable:
    def permute(tokens, routing_map, probs=None, num_out_tokens=None, fused=False, drop_and_pad=False):
        dispatcher = _GATHERING.get()
        if dispatcher is None or fused or drop_and_pad:
            return original(tokens, routing_map, probs=probs, num_out_tokens=num_out_tokens, fused=fused,
                            drop_and_pad=drop_and_pad)
        token, permuted_probs, _ = local_permutation(routing_map, probs, dispatcher.config.moe_router_topk)
        dispatcher.gather_slots = token_slots(token, dispatcher.config.moe_router_topk)
        return PermuteRows.apply(tokens, token, dispatcher.gather_slots), permuted_probs, token
    return permute


def _gathering_unpermute(original: Callable) -> Callable:
    def unpermute(permuted_tokens, sorted_indices, restore_shape, probs=None, routing_map=None, fused=False,
                  drop_and_pad=False):
        dispatcher = _GATHERING.get()
        slots = None if dispatcher is None else dispatcher.gather_slots
        if slots is None or probs is not None or fused or drop_and_pad:
            return original(permuted_tokens, sorted_indices, restore_shape, probs=probs, routing_map=routing_map,
                            fused=fused, drop_and_pad=drop_and_pad)
        dispatcher.gather_slots = None
        return CombineRows.apply(permuted_tokens, sorted_indices, slots)
    return unpermute


def _alltoall_gather_class():
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    class GatherAlltoAllTokenDispatcher(MoEAlltoAllTokenDispatcher):
        """megatron's all-to-all dispatcher, its local permutation and unpermutation done by gathers."""

        gather_slots = None

        def dispatch_preprocess(self, *args, **kwargs):
            with _gathering(self):
                return super().dispatch_preprocess(*args, **kwargs)

        def combine_postprocess(self, *args, **kwargs):
            with _gathering(self):
                return super().combine_postprocess(*args, **kwargs)

    return GatherAlltoAllTokenDispatcher


def why_not_alltoall_gather(layer) -> str | None:
    """None when the gathers apply to this layer's all-to-all dispatcher (every token listed `topk` times)."""
    config = layer.config
    if config.moe_expert_capacity_factor is not None or getattr(config, "moe_router_padding_for_quantization", False):
        return "token dropping or routing padding lists tokens a varying number of times"
    if getattr(config, "moe_permute_fusion", False):
        return "Transformer Engine's fused permutation is in use"
    if getattr(config, "moe_latent_size", None):
        return "latent projections"
    return None


def install_alltoall_gather(chunks: Iterable[torch.nn.Module]) -> tuple[int, list[str], Callable[[], None]]:
    """The gathers on every MoE layer kept on megatron's all-to-all dispatcher where they apply: (layers changed,
    reasons for the others, the function that undoes the module patch)."""
    from megatron.core.transformer.moe import token_dispatcher as td
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from .patches import replace

    cls = _alltoall_gather_class()
    changed, reasons = 0, []
    for chunk in chunks:
        for module in chunk.modules():
            if not isinstance(module, MoELayer) or type(module.token_dispatcher) is not td.MoEAlltoAllTokenDispatcher:
                continue
            reason = why_not_alltoall_gather(module)
            if reason is None:
                module.token_dispatcher.__class__ = cls
                changed += 1
            elif reason not in reasons:
                reasons.append(reason)
    if not changed:
        return 0, reasons, lambda: None
    return changed, reasons, replace(td.__name__, {"permute": _gathering_permute(td.permute),
                                                   "unpermute": _gathering_unpermute(td.unpermute)})


def why_not_local(layer) -> str | None:
    """None when the MoE layer can use the local dispatcher, else the reason it keeps megatron's."""
    config, d = layer.config, layer.token_dispatcher
    if d.ep_size != 1 or d.tp_size != 1:
        return "experts are spread over several ranks"
    if config.moe_expert_capacity_factor is not None or getattr(config, "moe_pad_expert_input_to_capacity", False):
        return "token dropping needs megatron's capacity handling"
    if getattr(config, "moe_router_padding_for_quantization", False) or getattr(config, "moe_latent_size", None):
        return "routing padding or latent projections"
    if getattr(layer, "shared_expert_overlap", False):
        return "shared-expert overlap runs inside megatron's dispatcher"
    if config.moe_router_topk < 1:
        return "no routed experts"
    return None


def install_local_dispatch(chunks: Iterable[torch.nn.Module], gather: bool = False) -> tuple[int, list[str]]:
    """Swap in the local dispatcher on every MoE layer where it applies; (layers swapped, reasons for the rest).
    gather: permute's backward and the combine as gathers (see the module docstring)."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    cls = _dispatcher_class()
    swapped, reasons = 0, []
    for chunk in chunks:
        for module in chunk.modules():
            if not isinstance(module, MoELayer):
                continue
            reason = why_not_local(module)
            if reason is None:
                module.token_dispatcher = cls(module.token_dispatcher, gather)
                swapped += 1
            elif reason not in reasons:
                reasons.append(reason)
    return swapped, reasons
