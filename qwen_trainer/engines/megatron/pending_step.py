"""A launched training step whose figures are still on the device (EngineOptions.read_back_next_step).

Reading the step's loss back makes the host wait for the whole step, the optimizer included, before it can start
launching the next one: the GPU then idles through the next step's first launches, the stretch where the host
is furthest behind (the forward's many small launches; benchmarks/gpu/host_profile.py). A `PendingStep` holds
the step's figures as one device tensor; `result()` reads it back, checks it and returns the `StepResult`. The
training loop asks for it after it has launched the next step (qwen_trainer.readback), so that read waits for
nothing. Nothing is lost by the delay: the engine settles an unread step before anything that saves, evaluates or reads the weights, so a
step whose loss or gradient norm is not finite, or whose output-layer gradient scale was wrong, still stops the
run before its weights can be written.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from ..base import StepResult
from .loss import verify_output_grad_scales


class PendingStep:
    """`figures` (float64, on the device): loss numerator and denominator, then the output layer's gradient
    scales (as many as `assumed`), then the gradient norm if `norm_on_device`, then the load-balancing loss if
    `aux_on_device`."""

    def __init__(self, figures: torch.Tensor, *, assumed: list[float], norm: Optional[float], norm_on_device: bool,
                 aux_on_device: bool, moe: bool, stepped: bool, global_tokens: int, log: Callable[[str], None]):
        self._figures = figures
        self._assumed = assumed
        self._norm = norm
        self._norm_on_device = norm_on_device
        self._aux_on_device = aux_on_device
        self._moe = moe
        self._stepped = stepped
        self._global_tokens = global_tokens
        self._log = log
        self._result: Optional[StepResult] = None
        self._error: Optional[BaseException] = None

    @property
    def read(self) -> bool:
        return self._result is not None or self._error is not None

    def result(self) -> StepResult:
        """Read the figures back (once) and check them; raises for a step that must stop the run, every time."""
        if self._error is not None:
            raise self._error
        if self._result is None:
            try:
                self._result = self._finish()
            except BaseException as err:
                self._error = err
                raise
        return self._result

    def _finish(self) -> StepResult:
        num, den, *rest = self._figures.tolist()
        aux = rest.pop() if self._aux_on_device else (0.0 if self._moe else None)
        norm = rest.pop() if self._norm_on_device else self._norm
        verify_output_grad_scales(rest, self._assumed)
        loss = num / max(den, 1e-12)
        norm = float(norm) if norm is not None else float("nan")
        if not self._stepped:
            self._log("fp16 loss-scale overflow: the optimizer step was skipped")
        elif not math.isfinite(norm) or not math.isfinite(loss):
            raise FloatingPointError(f"loss {loss} / grad norm {norm} is not finite")
        return StepResult(loss, aux, norm, self._global_tokens)

