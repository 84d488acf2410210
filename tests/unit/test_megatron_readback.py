"""A launched step's figures read back later (qwen_trainer.engines.megatron.pending_step.PendingStep): the one device
tensor is split into loss, output-layer scales, gradient norm and load-balancing loss as the engine packed it, and a
step that must stop the run raises when read, every time it is read."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

from qwen_trainer.engines.base import ReadyStep, StepResult, launch_step  # noqa: E402
from qwen_trainer.engines.megatron.pending_step import PendingStep  # noqa: E402


def _pending(values, *, assumed=(), norm=None, norm_on_device=True, aux_on_device=True, moe=True, stepped=True,
             log=None):
    return PendingStep(torch.tensor(values, dtype=torch.float64), assumed=list(assumed), norm=norm,
                       norm_on_device=norm_on_device, aux_on_device=aux_on_device, moe=moe, stepped=stepped,
                       global_tokens=4096, log=log or (lambda _m: None))


def test_the_figures_come_back_in_their_places():
    step = _pending([6.0, 2.0, 0.25, 0.5, 1.75, 0.011], assumed=[0.25, 0.5])
    assert not step.read
    got = step.result()
    assert step.read and step.result() is got
    assert (got.loss, got.grad_norm, got.aux_loss, got.loss_tokens) == (3.0, 1.75, 0.011, 4096)


def test_a_host_norm_and_no_aux_loss():
    got = _pending([6.0, 3.0], norm=0.5, norm_on_device=False, aux_on_device=False, moe=False).result()
    assert (got.loss, got.grad_norm, got.aux_loss) == (2.0, 0.5, None)
    assert _pending([6.0, 3.0, 0.7], aux_on_device=False, moe=True).result().aux_loss == 0.0


@pytest.mark.parametrize("values", [[math.nan, 1.0, 0.5, 0.0], [1.0, 1.0, math.inf, 0.0]], ids=["loss", "norm"])
def test_a_step_that_is_not_finite_raises_each_time_it_is_read(values):
    step = _pending(values)
    for _ in range(2):
        with pytest.raises(FloatingPointError, match="not finite"):
            step.result()
    assert step.read


def test_a_wrong_output_layer_scale_raises():
    with pytest.raises(RuntimeError, match="output-layer gradient scaled by 0.25"):
        _pending([1.0, 1.0, 0.5, 1.0, 0.0], assumed=[0.25]).result()


def test_a_skipped_fp16_step_is_logged_not_raised():
    said = []
    got = _pending([1.0, 1.0], norm=None, norm_on_device=False, aux_on_device=False, moe=False, stepped=False,
                   log=said.append).result()
    assert said == ["fp16 loss-scale overflow: the optimizer step was skipped"] and math.isnan(got.grad_norm)


def test_engines_without_launch_step_give_a_ready_step():
    class Stepper:
        def train_step(self, micro_batches, lr, loss_mode):
            return StepResult(float(lr), None, 0.0, len(micro_batches))

    step = launch_step(Stepper(), [1, 2], 0.5, "mean")
    assert isinstance(step, ReadyStep) and step.result() == StepResult(0.5, None, 0.0, 2)
