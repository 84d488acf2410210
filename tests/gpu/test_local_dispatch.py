"""On the GPU, the local MoE dispatcher with torch's grouped GEMM runs forward and backward without a single
device-to-host synchronisation, and matches megatron's permute/unpermute."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                                reason="needs a Hopper GPU (torch grouped GEMM)")


@pytest.mark.parametrize("gather", [False, True], ids=["scatter", "gather"])
def test_dispatch_and_grouped_experts_never_synchronise(gather):
    from megatron.core.transformer.moe.moe_utils import permute, unpermute

    from qwen_trainer.engines.megatron.dispatch import CombineRows, PermuteRows, combine, local_permutation, token_slots
    from qwen_trainer.engines.megatron.kernels import grouped_mm

    tokens, experts, topk, hidden, ffn = 4096, 60, 4, 2048, 1408
    torch.manual_seed(0)
    logits = torch.randn(tokens, experts, device="cuda")
    top = logits.softmax(-1).topk(topk, dim=1)
    routing_map = torch.zeros(tokens, experts, dtype=torch.bool, device="cuda").scatter_(1, top.indices, True)
    probs = torch.zeros(tokens, experts, device="cuda").scatter_(1, top.indices, top.values)
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(experts, hidden, ffn, device="cuda", dtype=torch.bfloat16) / 50).requires_grad_(True)
    torch.cuda.synchronize()

    torch.cuda.set_sync_debug_mode("error")
    try:
        token, row_probs, per_expert = local_permutation(routing_map, probs, topk)
        if gather:
            slots = token_slots(token, topk)
            permuted, combined = PermuteRows.apply(x, token, slots), (lambda r: CombineRows.apply(r, token, slots))
        else:
            permuted, combined = x.index_select(0, token), (lambda r: combine(r, token, x.shape))
        rows = grouped_mm(permuted, w, per_expert) * row_probs.unsqueeze(1).to(torch.bfloat16)
        out = combined(rows @ w[0].t())
        out.float().square().mean().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")

    ref_rows, ref_probs, ref_index = permute(x.detach(), routing_map, probs=probs, num_out_tokens=tokens * topk)
    assert torch.equal(token, ref_index) and torch.equal(row_probs, ref_probs)
    assert torch.equal(per_expert.cpu(), routing_map.sum(0).cpu())
    restored = unpermute(ref_rows, ref_index, x.shape, routing_map=routing_map)
    assert torch.equal(x.detach().index_select(0, token), ref_rows)
    # both add each token's rows with atomics (bf16, order not fixed); the gather sums in fp32, rounds once
    torch.testing.assert_close(combine(ref_rows, token, x.shape), restored, rtol=1e-2, atol=1e-2)
    exact = torch.zeros(x.shape, dtype=torch.float64, device="cuda").index_add_(0, token, ref_rows.double())
    gathered = CombineRows.apply(ref_rows, token, token_slots(token, topk))
    torch.testing.assert_close(gathered, exact.to(torch.bfloat16), rtol=8e-3, atol=1e-6)
    assert x.grad is not None and w.grad is not None and torch.isfinite(w.grad.float()).all()
