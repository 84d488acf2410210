"""The local MoE token dispatcher against megatron-core's own permute/unpermute: same order, same probabilities,
same per-expert counts, same combined output and gradients."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from megatron.core.transformer.moe.moe_utils import permute, unpermute  # noqa: E402

from qwen_trainer.engines.megatron.dispatch import (  # noqa: E402
    CombineRows,
    PermuteRows,
    combine,
    local_permutation,
    token_slots,
)


def _routing(tokens: int, experts: int, topk: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(tokens, experts, generator=g)
    top = scores.topk(topk, dim=1)
    routing_map = torch.zeros(tokens, experts, dtype=torch.bool).scatter_(1, top.indices, True)
    probs = torch.zeros(tokens, experts).scatter_(1, top.indices, top.values.softmax(dim=1))
    return routing_map, probs


@pytest.mark.parametrize("tokens,experts,topk", [(37, 8, 2), (64, 60, 4), (5, 4, 4), (1, 3, 1)])
def test_permutation_matches_megatron(tokens, experts, topk):
    routing_map, probs = _routing(tokens, experts, topk, seed=tokens)
    hidden = torch.randn(tokens, 16)
    ref_rows, ref_probs, ref_index = permute(hidden, routing_map, probs=probs, num_out_tokens=tokens * topk)
    token, permuted_probs, per_expert = local_permutation(routing_map, probs, topk)
    assert torch.equal(token, ref_index)
    assert torch.equal(permuted_probs, ref_probs)
    assert torch.equal(hidden.index_select(0, token), ref_rows)
    assert per_expert.tolist() == routing_map.sum(0).tolist() and int(per_expert.sum()) == tokens * topk


@pytest.mark.parametrize("tokens,experts,topk", [(37, 8, 2), (64, 60, 4), (5, 4, 4), (1, 3, 1), (300, 128, 8)])
def test_token_slots_list_each_tokens_rows_in_expert_order(tokens, experts, topk):
    routing_map, probs = _routing(tokens, experts, topk, seed=tokens + 1)
    token, _, per_expert = local_permutation(routing_map, probs, topk)
    slots = token_slots(token, topk)
    assert slots.shape == (tokens, topk)
    assert torch.equal(token[slots], torch.arange(tokens).unsqueeze(1).expand(-1, topk))  # each row t holds token t
    assert bool((slots[:, 1:] > slots[:, :-1]).all())  # ascending rows, so ascending experts
    assert sorted(slots.reshape(-1).tolist()) == list(range(tokens * topk))  # every permuted row exactly once
    # the expert of each slot, from the row's position among the per-expert blocks, is the token's chosen expert
    expert_of_row = torch.repeat_interleave(torch.arange(experts), per_expert)
    assert torch.equal(routing_map.nonzero()[:, 1].view(tokens, topk), expert_of_row[slots])


def test_gather_sum_rounds_once_where_scatter_add_rounds_per_add():
    """bf16 rows: the gather sums in fp32 and rounds once, so it equals the fp64 sum rounded to bf16; the atomic
    scatter-add path rounds after every add."""
    tokens, experts, topk, width = 256, 16, 8, 64
    routing_map, probs = _routing(tokens, experts, topk, seed=11)
    token, _, _ = local_permutation(routing_map, probs, topk)
    rows = torch.randn(tokens * topk, width).to(torch.bfloat16)
    gathered = CombineRows.apply(rows, token, token_slots(token, topk))
    exact = torch.zeros(tokens, width, dtype=torch.float64).index_add_(0, token, rows.double())
    assert torch.equal(gathered, exact.to(torch.float32).to(torch.bfloat16))
    scattered = combine(rows, token, (tokens, width))
    assert (scattered.double() - exact).abs().max() >= (gathered.double() - exact).abs().max()


@pytest.mark.parametrize("path", ["scatter", "scatter-deterministic", "gather"])
def test_round_trip_and_gradients_match_megatron(path):
    deterministic, gather = path == "scatter-deterministic", path == "gather"
    tokens, experts, topk, width = 48, 6, 2, 8
    routing_map, probs = _routing(tokens, experts, topk, seed=3)
    base = torch.randn(tokens, width, dtype=torch.float64)
    weight = torch.randn(experts, width, width, dtype=torch.float64)
    grad_out = torch.randn(tokens, width, dtype=torch.float64)

    def experts_apply(rows, per_expert, row_probs):
        bounds = torch.cumsum(per_expert, 0).tolist()  # host copy is fine in a CPU reference
        parts = [rows[s:e] @ weight[i] for i, (s, e) in enumerate(zip([0] + bounds[:-1], bounds))]
        return torch.cat(parts) * row_probs.unsqueeze(1)

    def run(local: bool):
        x = base.clone().requires_grad_(True)
        p = probs.to(torch.float64).clone().requires_grad_(True)
        if local:
            token, row_probs, per_expert = local_permutation(routing_map, p, topk)
            if gather:
                slots = token_slots(token, topk)
                out = CombineRows.apply(experts_apply(PermuteRows.apply(x, token, slots), per_expert, row_probs),
                                        token, slots)
            else:
                out = combine(experts_apply(x.index_select(0, token), per_expert, row_probs), token, x.shape)
        else:
            rows, row_probs, index = permute(x, routing_map, probs=p, num_out_tokens=tokens * topk)
            out = unpermute(experts_apply(rows, routing_map.sum(0), row_probs), index, x.shape,
                            routing_map=routing_map)
        out.backward(grad_out)
        return out.detach(), x.grad, p.grad

    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        mine, ref = run(True), run(False)
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def _layer(ep=1, tp=1, capacity=None, overlap=False, topk=2):
    from types import SimpleNamespace

    config = SimpleNamespace(moe_expert_capacity_factor=capacity, moe_pad_expert_input_to_capacity=False,
                             moe_router_padding_for_quantization=False, moe_latent_size=None, moe_router_topk=topk)
    return SimpleNamespace(config=config, token_dispatcher=SimpleNamespace(ep_size=ep, tp_size=tp),
                           shared_expert_overlap=overlap)


def test_layers_that_keep_megatrons_dispatcher_say_why():
    from qwen_trainer.engines.megatron.dispatch import why_not_local

    assert why_not_local(_layer()) is None
    assert "several ranks" in why_not_local(_layer(ep=2))
    assert "several ranks" in why_not_local(_layer(tp=2))
    assert "token dropping" in why_not_local(_layer(capacity=1.25))
    assert "overlap" in why_not_local(_layer(overlap=True))
