"""The local MoE token dispatcher against megatron-core's own permute/unpermute: same order, same probabilities,
same per-expert counts, same combined output and gradients."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from megatron.core.transformer.moe.moe_utils import permute, unpermute  # noqa: E402

from qwen_trainer.engines.megatron.dispatch import combine, local_permutation  # noqa: E402


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


@pytest.mark.parametrize("deterministic", [False, True])
def test_round_trip_and_gradients_match_megatron(deterministic):
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
