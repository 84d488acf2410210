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


# ---------------------------------------------------------------- the norm kept on the device (grad_norm_on_device)


@pytest.fixture()
def one_process_group(tmp_path):
    """A gloo group of one: the device norm reduces over megatron's statistics group as megatron does."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture()
def megatron_on_cpu():
    """megatron's own norm runs on CPU with the engine's foreach stand-ins for Apex and its 'cuda' buffers on CPU."""
    from qwen_trainer.engines.megatron.kernels import install_foreach_grad_ops
    from tests.unit.megatron_resume_worker import cpu_stand_ins

    undo = install_foreach_grad_ops()
    try:
        with cpu_stand_ins():
            yield
    finally:
        undo()


@pytest.mark.parametrize("scale", [1e-3, 0.37, 1.0, 3.0, 4e4])
def test_the_device_norm_is_megatrons_norm(scale, one_process_group, megatron_on_cpu):
    from megatron.core.optimizer import clip_grads

    torch.manual_seed(int(scale * 1000) % 97)
    grads = [torch.randn(517, 33) * scale, torch.randn(9) * scale, torch.randn(2048) * scale]
    host = clip_grads.get_grad_norm_fp32(grads)
    device = clip_in_adam.norm_on_device(clip_grads.get_grad_norm_fp32)(grads)
    assert isinstance(host, float) and isinstance(device, torch.Tensor)
    assert device.dtype == torch.float64 and device.shape == ()
    assert float(device) == host


def test_an_empty_gradient_list_has_norm_zero(one_process_group, megatron_on_cpu):
    from megatron.core.optimizer import clip_grads

    assert float(clip_in_adam.norm_on_device(clip_grads.get_grad_norm_fp32)([])) == 0.0


class _Holder:
    def __init__(self):
        self.param_groups = [{"params": [torch.zeros(1)]}]
        self.grad_scale = None


@pytest.mark.parametrize("norm", [0.25, 0.999998, 0.999999, 1.0, 1.0000001, 1.5, 123.456789, 7.1e5])
def test_the_device_divisor_is_the_hosts(norm):
    """The divisor set from a device norm equals, bit for bit, the one the host sets from the same float (1 where
    the host sets none: dividing by it is exact)."""
    max_norm = 1.0
    on_host, on_device = _Holder(), _Holder()
    coeff = max_norm / (norm + 1.0e-6)
    if coeff < 1.0:
        clip_in_adam._set_grad_scale(on_host, 1.0 / coeff)
    clip_in_adam._set_grad_scale_on_device([on_device], max_norm, torch.tensor(norm, dtype=torch.float64))
    want = on_host.grad_scale if on_host.grad_scale is not None else torch.ones((), dtype=torch.float32)
    assert on_device.grad_scale.dtype == torch.float32
    assert torch.equal(on_device.grad_scale, want), (norm, float(on_device.grad_scale), float(want))


def test_clipping_from_a_device_norm_steps_like_the_hosts():
    reference, ref_opt = _params_and_optimizer(fused=True)
    _clip_and_step(reference, ref_opt, 1.0, _megatrons_pass)
    folded, opt = _params_and_optimizer(fused=True)
    undo = clip_in_adam.install(_Wrapped(opt), norm_on_device_too=True)
    try:
        norm = torch.tensor(_norm(folded), dtype=torch.float64)
        megatron_optimizer.clip_grad_by_total_norm_fp32(folded, 1.0, norm)
        opt.step()
        for a, b in zip(folded, reference):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert megatron_optimizer.get_grad_norm_fp32.__module__ == clip_in_adam.__name__
    finally:
        undo()
    assert megatron_optimizer.get_grad_norm_fp32.__module__ != clip_in_adam.__name__
