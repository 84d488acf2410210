"""The MoE experts' weight gradients of one optimizer step alone, one GPU, same inputs, same run: the per-micro-batch
path (for each micro-batch torch's grouped GEMM into a bf16 gradient, then the engine's add into the zeroed fp32
buffer: what autograd and the accumulation hook do) against the engine's deferral (`expert_wgrad`:
`accumulate_expert_wgrad`, the function the grouped GEMM's backward calls, with megatron's last-micro-batch flag
set as the schedule sets it): operands kept, regrouped by expert, one grouped GEMM and one add, and with
`expert_grad_overwrite` one cast copy into the never-zeroed buffer; and with `expert_wgrad_into_buffer`, the Triton
kernel summing the kept micro-batches straight into the buffer (no regrouping, no bf16 product), in several tiles.
Prints times per step and layer, and ratios.

    python benchmarks/gpu/expert_wgrad_defer_bench.py      # the A2.7B and Qwen3-30B-A3B expert shapes
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from qwen_trainer.engines.megatron import expert_wgrad  # noqa: E402
from qwen_trainer.engines.megatron.triton_kernels import accumulate_  # noqa: E402

from expert_wgrad_bench import TILES, cuda_time  # noqa: E402  (this script's folder is on the path)

# name: (experts, top-k, hidden, expert ffn), 4096 tokens per micro-batch, 4 micro-batches (the benchmark's cases)
SHAPES = {"qwen1.5-a2.7b": (60, 4, 2048, 1408), "qwen3-30b-a3b": (128, 8, 2048, 768)}
TOKENS, MICRO_BATCHES = 4096, 4


def _ends(experts: int, rows: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(experts, generator=g) + 0.3  # uneven routing, as a trained router gives
    sizes = (weights / weights.sum() * rows).floor().long()
    sizes[0] += rows - int(sizes.sum())
    return torch.cumsum(sizes, 0).to(torch.int32).cuda()


def main() -> int:
    torch.manual_seed(0)
    print(f"card: {torch.cuda.get_device_name()}; {MICRO_BATCHES} micro-batches of {TOKENS} tokens")
    expert_wgrad.STASH.limit = 1 << 40
    for name, (experts, topk, hidden, ffn) in SHAPES.items():
        rows = TOKENS * topk
        for layer, (k, n) in {"fc1": (hidden, 2 * ffn), "fc2": (ffn, hidden)}.items():
            parts = [(torch.randn(rows, k, device="cuda", dtype=torch.bfloat16),
                      torch.randn(rows, n, device="cuda", dtype=torch.bfloat16), _ends(experts, rows, i))
                     for i in range(MICRO_BATCHES)]
            flat = torch.zeros(experts * k * n, device="cuda")
            group = SimpleNamespace(is_last_microbatch=False)
            param = SimpleNamespace(main_grad=flat)

            def per_micro_batch():
                flat.zero_()  # the step's buffer zeroing
                for x, dy, ends in parts:
                    accumulate_(flat, torch._grouped_mm(x.t(), dy, offs=ends))

            def deferred(overwrite: bool, kernel: bool = False):
                def step():
                    setattr(param, expert_wgrad.DEFER, group)
                    setattr(param, expert_wgrad.OVERWRITE, overwrite)
                    setattr(param, expert_wgrad.KERNEL, kernel)
                    expert_wgrad.reset_deferred()
                    if not overwrite:
                        flat.zero_()
                    for i, (x, dy, ends) in enumerate(parts):
                        group.is_last_microbatch = i == len(parts) - 1
                        expert_wgrad.accumulate_expert_wgrad(param, x, dy, ends, (experts, k, n))
                return step

            per_micro_batch()
            reference = flat.clone()
            results = {}
            for label, fn in (("deferred", deferred(False)), ("deferred+overwrite", deferred(True)),
                              ("kernel", deferred(True, kernel=True))):
                fn()
                results[label] = float((flat - reference).norm() / reference.norm())
            t_base = cuda_time(per_micro_batch, reps=10)
            t_defer = cuda_time(deferred(False), reps=10)
            t_over = cuda_time(deferred(True), reps=10)
            print(f"{name} {layer} [{experts} x {k} x {n}], {rows} rows a micro-batch: per micro-batch {t_base:.3f} ms, "
                  f"deferred {t_defer:.3f} ms ({t_base / t_defer:.2f}x), deferred+overwrite {t_over:.3f} ms "
                  f"({t_base / t_over:.2f}x); relative difference of the summed gradient "
                  f"{results['deferred']:.1e} / {results['deferred+overwrite']:.1e}")
            default = dict(expert_wgrad.CONFIG)
            for bk, bn, bt, warps, stages in TILES:
                expert_wgrad.CONFIG.update(BLOCK_K=bk, BLOCK_N=bn, BLOCK_T=bt, num_warps=warps, num_stages=stages)
                try:
                    t_kernel = cuda_time(deferred(True, kernel=True), reps=10)
                except Exception as e:  # a tile this card's shared memory cannot hold
                    print(f"  kernel tiles {bk}x{bn}x{bt}/{warps}w/{stages}s: {type(e).__name__}")
                    continue
                print(f"  kernel into the buffer, tiles {bk}x{bn}x{bt}/{warps}w/{stages}s: {t_kernel:.3f} ms, "
                      f"{t_over / t_kernel:.2f}x deferred+overwrite; relative difference {results['kernel']:.1e}")
            expert_wgrad.CONFIG.update(default)
    return 0


if __name__ == "__main__":
    sys.exit(main())
