"""One optimizer step over the MoE benchmark's parameter shapes alone, one GPU, same tensors, same run: torch's
fused AdamW with the clip divisor followed by megatron's copy of the fp32 main weights into the bf16 model weights
(what the engine does by default) against `adamw_kernel.ParamGroupStepper` (`adamw_writes_model_params`, the class
the engine's optimizer step calls), which does both in one pass. Prints milliseconds per step, the bytes each
moves per parameter and the memory bandwidth that implies, and the ratio; the kernel with its default tiles and a
few others.

    python benchmarks/gpu/adamw_bench.py        # Qwen1.5-MoE-A2.7B with 3 layers, the benchmark's A2.7B case
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from qwen_trainer.engines.megatron import adamw_kernel  # noqa: E402

from expert_wgrad_bench import cuda_time  # noqa: E402  (this script's folder is on the path)

CONFIGS = [(adamw_kernel.CHUNK, adamw_kernel.BLOCK, adamw_kernel.NUM_WARPS), (1 << 16, 2048, 8), (1 << 14, 1024, 4),
           (1 << 18, 1024, 4), (1 << 16, 512, 4), (1 << 16, 4096, 8)]
HIDDEN, VOCAB, EXPERTS, EXPERT_FFN, SHARED_FFN, LAYERS = 2048, 151936, 60, 1408, 5632, 3


def _shapes() -> list[tuple[int, ...]]:
    layer = [(3 * HIDDEN, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN,), (HIDDEN,), (EXPERTS, HIDDEN),
             (EXPERTS * HIDDEN, 2 * EXPERT_FFN), (EXPERTS * EXPERT_FFN, HIDDEN),
             (2 * SHARED_FFN, HIDDEN), (HIDDEN, SHARED_FFN), (1, HIDDEN)]
    return [(VOCAB, HIDDEN), (VOCAB, HIDDEN), (HIDDEN,)] + layer * LAYERS


def _state(seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    mains = [torch.randn(s, device="cuda", generator=gen) * 0.02 for s in _shapes()]
    for m in mains:
        m.grad = torch.randn(m.shape, device="cuda", generator=gen) * 1e-3
    halves = [m.to(torch.bfloat16) for m in mains]
    opt = torch.optim.AdamW([{"params": [m for m in mains if m.dim() > 1], "weight_decay": 0.1},
                             {"params": [m for m in mains if m.dim() == 1], "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)
    return mains, halves, opt


def main() -> int:
    torch.manual_seed(0)
    mains, halves, opt = _state(0)
    n = sum(m.numel() for m in mains)
    print(f"card: {torch.cuda.get_device_name()}; {n / 1e9:.2f}B parameters in {len(mains)} tensors")
    divisor = torch.tensor(2.0, device="cuda")

    def torch_step():
        opt.grad_scale = divisor  # clip_in_adam's divisor (torch's fused kernel writes the divided gradient back)
        opt.step()
        torch._foreach_copy_(halves, mains)  # megatron's copy of the main weights into the model weights

    baseline = cuda_time(torch_step, reps=10)
    del opt, mains, halves, torch_step  # both sets at once would not fit an 80 GB card
    torch.cuda.empty_cache()
    mains, halves, opt = _state(0)
    rows = [("torch fused AdamW + copy", baseline, 4 * 8 + 6)]
    for chunk, block, warps in CONFIGS:  # the module's defaults first
        adamw_kernel.CHUNK, adamw_kernel.BLOCK, adamw_kernel.NUM_WARPS = chunk, block, warps
        stepper = adamw_kernel.ParamGroupStepper(opt, {id(m): h for m, h in zip(mains, halves)})

        def kernel_step():
            opt.grad_scale = divisor
            stepper.step()

        rows.append((f"kernel chunk {chunk} block {block} warps {warps}", cuda_time(kernel_step, reps=10), 30))
    for name, ms, per_param in rows:
        print(f"{name:40s} {ms:8.2f} ms  {per_param:2d} B/param  {n * per_param / ms / 1e6:7.0f} GB/s  "
              f"{baseline / ms:5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
