"""Progress reporting: one log line per log interval, TensorBoard scalars and a JSON-lines metrics file.

Throughput: tokens/s of the whole job; model TFLOPS per device from Megatron's formula
(`qwen_trainer.spec.estimate.flops_per_token`, forward+backward, causal half) times tokens per second divided by
the number of processes; MFU = TFLOPS per device / the card's dense bf16 peak, taken from `QWEN_PEAK_TFLOPS` or,
for the cards in CARD_PEAK_TFLOPS, from the device name. On CPU and on cards not listed both are n/a.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

PEAK_ENV = "QWEN_PEAK_TFLOPS"


# Dense bf16 tensor-core peaks from the vendor's data sheets, by a piece of torch.cuda.get_device_name(); the
# first match wins, so more specific names come first.
CARD_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("H800", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
)


def peak_tflops(device_name: Optional[str] = None) -> Optional[float]:
    raw = os.environ.get(PEAK_ENV)
    try:
        if raw:
            return float(raw)
    except ValueError:
        return None
    for piece, peak in CARD_PEAK_TFLOPS:
        if device_name and piece in device_name:
            return peak
    return None


class Metrics:
    """Rank 0 writes; other ranks hold a no-op instance."""

    def __init__(self, out_dir: Optional[Path], enabled: bool, engine: str, world: int, flops_per_token: float,
                 run_info: dict, log: Callable[[str], None], device_name: Optional[str] = None):
        self.enabled = enabled
        self.engine = engine
        self.world = world
        self.flops_per_token = flops_per_token
        self.log = log
        self.peak = peak_tflops(device_name) if engine != "cpu" else None
        self._tb = None
        self._jsonl = None
        if enabled and out_dir is not None:
            (out_dir / "logs").mkdir(parents=True, exist_ok=True)
            self.jsonl_path = out_dir / "logs" / "metrics.jsonl"
            self._jsonl = open(self.jsonl_path, "a", buffering=1, encoding="utf-8")
            self._write({"event": "start", "time": time.time(), **run_info})
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(out_dir / "tensorboard"), max_queue=1, flush_secs=5)
            except Exception as err:  # TensorBoard is optional
                log(f"tensorboard disabled: {err}")

    def _write(self, record: dict) -> None:
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")

    def train(self, iteration: int, train_iters: int, consumed: int, loss: float, aux_loss: Optional[float], lr: float,
              grad_norm: float, step_seconds: float, tokens: int, loss_tokens: int) -> dict:
        tps = tokens / step_seconds if step_seconds > 0 else float("nan")
        tflops = self.flops_per_token * tps / self.world / 1e12
        mfu = tflops / self.peak if self.peak else None
        record = {"event": "train", "iteration": iteration, "train_iters": train_iters, "consumed_samples": consumed,
                  "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_second": tps,
                  "tflops_per_device": tflops, "mfu": mfu, "step_seconds": step_seconds, "loss_tokens": loss_tokens,
                  "engine": self.engine, "time": time.time()}
        if aux_loss is not None:
            record["aux_loss"] = aux_loss
        if not self.enabled:
            return record
        self._write(record)
        if self._tb is not None:
            self._tb.add_scalar("lm loss", loss, iteration)
            self._tb.add_scalar("learning-rate", lr, iteration)
            self._tb.add_scalar("grad-norm", grad_norm, iteration)
            self._tb.add_scalar("throughput/tokens-per-second", tps, iteration)
            self._tb.add_scalar("throughput/tflops-per-device", tflops, iteration)
            if aux_loss is not None:
                self._tb.add_scalar("load-balancing loss", aux_loss, iteration)
        device = "GPU" if self.engine != "cpu" else "process"
        parts = [
            f"iteration {iteration:>6}/{train_iters}",
            f"consumed samples {consumed}",
            f"loss {loss:.6f}",
        ]
        if aux_loss is not None:
            parts.append(f"load-balancing loss {aux_loss:.4f}")
        parts += [
            f"lr {lr:.4e}",
            f"grad norm {grad_norm:.4f}",
            f"tokens/s {tps:,.0f}",
            f"TFLOPS/{device} {tflops:.4f}",
            f"MFU {mfu:.1%}" if mfu is not None else "MFU n/a",
            f"step {step_seconds * 1000:.0f} ms",
            f"engine={self.engine}",
        ]
        self.log(" | ".join(parts))
        return record

    def valid(self, iteration: int, loss: float, tokens: int) -> None:
        if not self.enabled:
            return
        ppl = math.exp(min(loss, 50.0))
        self._write({"event": "valid", "iteration": iteration, "loss": loss, "ppl": ppl, "tokens": tokens,
                     "time": time.time()})
        if self._tb is not None:
            self._tb.add_scalar("lm loss validation", loss, iteration)
            self._tb.add_scalar("lm loss validation ppl", ppl, iteration)
        self.log(f"validation at iteration {iteration} | loss {loss:.6f} | ppl {ppl:.3f} | tokens {tokens}")

    def event(self, name: str, **fields: Any) -> None:
        if self.enabled:
            self._write({"event": name, "time": time.time(), **fields})

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()


def read_metrics(path: str | Path, event: str = "train") -> list[dict]:
    """Records of one event kind; for iterations logged twice (a run resumed from an earlier checkpoint) the
    later record wins."""
    by_iter: dict[int, dict] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r.get("event") == event:
                by_iter[r["iteration"]] = r
    return [by_iter[k] for k in sorted(by_iter)]
