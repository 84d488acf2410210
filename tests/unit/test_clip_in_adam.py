"""Gradient clipping folded into fused AdamW (qwen_trainer.engines.megatron.clip_in_adam) against megatron's own
clipping pass followed by the same optimizer step, on CPU (torch's fused AdamW runs there too)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

from megatron.core.optimizer import optimizer as megatron_optimizer  # noqa: E402

from qwen_trainer.engines.megatron import clip_in_adam  # noqa: E402


class _Wrapped:
    """Stands where megatron's mixed-precision optimizer does: `optimizer` is the torch optimizer inside."""

    def __init__(self, inner):
        self.optimizer = inner


def _params_and_optimizer(fused: bool):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(300, 7)), torch.nn.Parameter(torch.randn(129))]
    for p in params:
        p.grad = torch.randn_like(p) * 3.0
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, fused=fused)
    return params, opt


def _norm(params) -> float:
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))


def _megatrons_pass(params, max_norm, norm) -> None:
    """megatron's clip_grad_by_total_norm_fp32 (which accepts CUDA tensors only): the same coefficient and test,
    every gradient multiplied in place."""
    coeff = max_norm / (norm + 1.0e-6)
    if coeff < 1.0:
        torch._foreach_mul_([p.grad for p in params], coeff)


def _clip_and_step(params, opt, max_norm, clip) -> float:
    norm = _norm(params)
    clip(params, max_norm, norm)  # as megatron's clip_grad_norm calls it
    opt.step()
    return norm


@pytest.mark.parametrize("max_norm", [1.0, 1e6])  # clipping, and a norm under the bound (nothing to scale)
def test_clipping_in_fused_adamw_steps_like_megatrons_clipping_pass(max_norm):
    reference, ref_opt = _params_and_optimizer(fused=True)
    norm = _clip_and_step(reference, ref_opt, max_norm, _megatrons_pass)
    assert (norm > max_norm) == (max_norm == 1.0)
    folded, opt = _params_and_optimizer(fused=True)
    undo = clip_in_adam.install(_Wrapped(opt))
    try:
        _clip_and_step(folded, opt, max_norm, megatron_optimizer.clip_grad_by_total_norm_fp32)
        assert opt.grad_scale is None  # for one step only
        for a, b in zip(folded, reference):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        # a second step without clipping is not scaled by the first one's divisor
        for p, r in zip(folded, reference):
            p.grad = torch.ones_like(p)
            r.grad = torch.ones_like(r)
        opt.step()
        ref_opt.step()
        for a, b in zip(folded, reference):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    finally:
        undo()
    assert megatron_optimizer.clip_grad_by_total_norm_fp32 is not None and not clip_in_adam._OWNERS


def test_parameters_outside_fused_adamw_keep_megatrons_pass(monkeypatch):
    calls = []
    monkeypatch.setattr(megatron_optimizer, "clip_grad_by_total_norm_fp32",
                        lambda params, max_norm, norm, decoupled=False: calls.append((params, max_norm, norm)))
    params, opt = _params_and_optimizer(fused=False)
    undo = clip_in_adam.install(_Wrapped(opt))
    try:
        megatron_optimizer.clip_grad_by_total_norm_fp32(params, 1.0, 5.0)
        assert calls == [(params, 1.0, 5.0)]
        assert getattr(opt, "grad_scale", None) is None
    finally:
        undo()
