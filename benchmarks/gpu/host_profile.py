"""Where the host spends a training step: cProfile over `--steps` steps of `MegatronEngine.train_step` (after
`--warmup`), on one GPU, for a benchmark case and variant. A step whose wall time exceeds its GPU kernel time
(run.py --profile) with no host waits inside it (run.py --syncs) is bounded by the host's launching; this lists the
Python functions that cost it, by own time and by cumulative time.

    python benchmarks/gpu/host_profile.py --case qwen1.5-moe-a2.7b-l3 --variant best --out DIR
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from cases import CASES, VARIANTS  # noqa: E402
from worker import consecutive_steps  # noqa: E402


def _module_paths(report: str) -> str:
    """File names relative to the import path they were found on (no install or checkout directories)."""
    for entry in sorted({str(Path(e).resolve()) for e in sys.path if e}, key=len, reverse=True):
        report = report.replace(entry.rstrip("/") + "/", "")
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", default="qwen1.5-moe-a2.7b-l3", choices=sorted(CASES))
    ap.add_argument("--variant", default="best", choices=sorted(VARIANTS))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--top", type=int, default=45)
    ap.add_argument("--out", default="host-profile")
    a = ap.parse_args(argv)
    from qwen_trainer.engines.megatron import EngineOptions
    from qwen_trainer.engines.megatron.testing import built_engine, job_spec, random_micro_batches
    from qwen_trainer.spec import resolve_architecture

    case = CASES[a.case]
    spec = job_spec(case.family, case.size, **case.spec_args())
    arch = resolve_architecture(spec)
    engine = built_engine(spec, EngineOptions(**VARIANTS[a.variant]))
    batches = random_micro_batches(case.global_batch // case.micro_batch, case.micro_batch, case.seq,
                                   arch.vocab_size, seed=100)
    lr = spec.training.lr
    consecutive_steps(engine, batches, lr, a.warmup)
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    t0 = time.perf_counter()
    profiler.enable()
    consecutive_steps(engine, batches, lr, a.steps)
    torch.cuda.synchronize()
    profiler.disable()
    wall = (time.perf_counter() - t0) / a.steps
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    text.write(f"{a.case} {a.variant} on {torch.cuda.get_device_name()}: {wall * 1e3:.1f} ms a step under cProfile, "
               f"{a.steps} steps\n")
    for key in ("tottime", "cumtime"):
        text.write(f"\n== by {key}\n")
        pstats.Stats(profiler, stream=text).sort_stats(key).print_stats(a.top)
    report = _module_paths(text.getvalue())
    (out / f"host-{a.case}-{a.variant}.txt").write_text(report)
    print(report[:20000])
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
