"""The MoE experts' weight-gradient step alone, one GPU: torch's grouped GEMM into a bf16 gradient followed by the
engine's add into the fp32 buffer (the path before expert_wgrad, what autograd and the accumulation hook do)
against expert_wgrad's one kernel accumulating into the buffer, same inputs, same run. Prints times and ratios.

    python benchmarks/gpu/expert_wgrad_bench.py            # the A2.7B and Qwen3-30B-A3B expert shapes
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from qwen_trainer.engines.megatron import expert_wgrad  # noqa: E402
from qwen_trainer.engines.megatron.expert_wgrad import grouped_wgrad_  # noqa: E402
from qwen_trainer.engines.megatron.triton_kernels import accumulate_  # noqa: E402

# name: (experts, top-k, hidden, expert ffn), 4096 tokens per micro-batch
SHAPES = {"qwen1.5-a2.7b": (60, 4, 2048, 1408), "qwen3-30b-a3b": (128, 8, 2048, 768)}
TOKENS = 4096
# the kernel's tiles: (BLOCK_K, BLOCK_N, BLOCK_T, warps, stages); the first is expert_wgrad.CONFIG's
TILES = [(64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 32, 4, 4), (256, 128, 64, 8, 3),
         (128, 128, 128, 8, 3), (128, 256, 32, 8, 4)]


def cuda_time(fn, reps: int = 20) -> float:
    """Milliseconds per call of `fn` on the GPU (one warm-up call, then `reps` timed by CUDA events)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main() -> int:
    torch.manual_seed(0)
    print(f"card: {torch.cuda.get_device_name()}")
    for name, (experts, topk, hidden, ffn) in SHAPES.items():
        rows = TOKENS * topk
        # uneven routing, as a trained router gives
        weights = torch.rand(experts) + 0.3
        sizes = (weights / weights.sum() * rows).floor().long()
        sizes[0] += rows - int(sizes.sum())
        ends = torch.cumsum(sizes, 0).to(torch.int32).cuda()
        for layer, (k, n) in {"fc1": (hidden, 2 * ffn), "fc2": (ffn, hidden)}.items():
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            dy = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
            buffer = torch.zeros(experts, k, n, device="cuda")

            def before():
                grad = torch._grouped_mm(x.t(), dy, offs=ends)  # autograd's weight gradient of the grouped GEMM
                accumulate_(buffer, grad)

            def after():
                grouped_wgrad_([(x, dy, ends)], buffer)

            check = torch.zeros_like(buffer)
            grouped_wgrad_([(x, dy, ends)], check)
            ref = torch._grouped_mm(x.t(), dy, offs=ends).float()
            err = float((check - ref).abs().max() / ref.abs().max())
            t_before = cuda_time(before)
            gb = buffer.numel() * 4 * 2 / 1e9  # the buffer's read and write, the floor for either path
            default = dict(expert_wgrad.CONFIG)
            for bk, bn, bt, warps, stages in TILES:
                expert_wgrad.CONFIG.update(BLOCK_K=bk, BLOCK_N=bn, BLOCK_T=bt, num_warps=warps, num_stages=stages)
                try:
                    t_after = cuda_time(after)
                except Exception as e:  # a tile this card's shared memory cannot hold
                    print(f"{name} {layer} tiles {bk}x{bn}x{bt}/{warps}w/{stages}s: {type(e).__name__}")
                    continue
                print(f"{name} {layer}: [{experts} x {k} x {n}], {rows} rows: grouped GEMM + add {t_before:.3f} ms, "
                      f"into the buffer (tiles {bk}x{bn}x{bt}/{warps}w/{stages}s) {t_after:.3f} ms, ratio "
                      f"{t_before / t_after:.2f}x; buffer traffic at {gb / (t_after / 1e3):.0f} GB/s; max rel. "
                      f"difference {err:.1e}")
            expert_wgrad.CONFIG.update(default)
    return 0


if __name__ == "__main__":
    sys.exit(main())
