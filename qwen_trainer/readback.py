"""When the training loop reads a launched step back.

An engine may leave a step's figures on the device (`launch_step`, qwen_trainer.engines.base); reading them makes
the host wait for that step's end. The loop reads each step once the next one is launched, so that wait finds
the step long done, and reads at once a step after which it logs, evaluates or saves.
"""

from __future__ import annotations

from typing import Any, Callable, Optional


class StepReader:
    """`account(iteration, lr, step)` is called once per launched step, in launch order."""

    def __init__(self, account: Callable[[int, float, Any], None]):
        self._account = account
        self._pending: Optional[tuple[int, float, Any]] = None

    def launched(self, iteration: int, lr: float, step: Any) -> None:
        """Step `iteration` was just launched: the one before it is read now."""
        self.flush()
        self._pending = (iteration, lr, step)

    def flush(self) -> None:
        """Read the last launched step now (before a log, an evaluation or a save, and at the end)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self._account(*pending)
