"""How far a training stage is and how long it still needs, for `status.progress` and `kubectl get`
(the fields Kubeflow Trainer v2 reports as progressPercentage and estimatedRemainingSeconds)."""

from __future__ import annotations

from typing import Optional


def progress_fields(iteration: int, train_iters: int, started: float, now: float,
                    start_iteration: int) -> dict:
    """percentage, elapsedSeconds (this run of the stage) and estimatedRemainingSeconds (the remaining steps at the
    mean time of the steps this run made, checkpoints and evaluations included; absent before the first step)."""
    out: dict = {"percentage": round(100.0 * iteration / max(train_iters, 1), 1),
                 "elapsedSeconds": int(max(now - started, 0.0))}
    done = iteration - start_iteration
    if done > 0:
        out["estimatedRemainingSeconds"] = int(round((now - started) / done * max(train_iters - iteration, 0)))
    return out


def duration(seconds: Optional[int]) -> str:
    """1h05m, 12m30s, 45s."""
    if seconds is None:
        return "?"
    h, rest = divmod(int(seconds), 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m:02d}m"
    return f"{m}m{s:02d}s" if m else f"{s}s"


def summary(iteration: int, train_iters: int, loss: float, fields: dict) -> str:
    """The one line `kubectl get` shows: 120/1000 (12.0%) loss 3.2140 ETA 1h05m."""
    eta = fields.get("estimatedRemainingSeconds")
    tail = f" ETA {duration(eta)}" if eta is not None and iteration < train_iters else ""
    return f"{iteration}/{train_iters} ({fields['percentage']:.1f}%) loss {loss:.4f}{tail}"
