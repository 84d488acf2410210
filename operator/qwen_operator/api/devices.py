"""Does a training stage's estimated memory fit the GPUs it will get?

The card comes from the standard GPU feature discovery label in `spec.scheduling.nodeSelector`
(`nvidia.com/gpu.product`, e.g. `NVIDIA-H100-80GB-HBM3`), else from the operator's `--gpu-memory-gib` (the
cluster's usual card). The estimate is `qwenctl explain`'s (weights, gradients and Adam state exact, activations by
formula, no allocator overhead), so a miss is a warning condition, not a refusal.
"""

from __future__ import annotations

from typing import Optional

PRODUCT_LABEL = "nvidia.com/gpu.product"

# gpu.product label values -> memory per card, GiB (what torch.cuda.mem_get_info reports, rounded down)
GPU_MEMORY_GIB = {
    "NVIDIA-H100-80GB-HBM3": 79,
    "NVIDIA-H100-PCIe": 79,
    "NVIDIA-H100-NVL": 93,
    "NVIDIA-H200": 139,
    "NVIDIA-H200-NVL": 139,
    "NVIDIA-H20": 95,
    "NVIDIA-B200": 178,
    "NVIDIA-A100-SXM4-80GB": 79,
    "NVIDIA-A100-80GB-PCIe": 79,
    "NVIDIA-A100-SXM4-40GB": 39,
    "NVIDIA-A100-PCIE-40GB": 39,
    "NVIDIA-L40S": 44,
    "NVIDIA-A10G": 22,
    "NVIDIA-L4": 22,
}

FITS = "WithinDeviceMemory"
EXCEEDS = "MemoryEstimateExceedsDevice"
NOT_ESTIMATED = "NotEstimated"


def device_memory(node_selector: dict[str, str], default_gib: Optional[float]) -> tuple[Optional[float], str]:
    """(GiB per card, where that figure comes from)."""
    product = node_selector.get(PRODUCT_LABEL)
    if product in GPU_MEMORY_GIB:
        return float(GPU_MEMORY_GIB[product]), f"{product} ({PRODUCT_LABEL} in spec.scheduling.nodeSelector)"
    if default_gib:
        why = f"unknown {PRODUCT_LABEL} {product!r}; " if product else ""
        return float(default_gib), f"{why}the operator's --gpu-memory-gib"
    return None, "no card known"


def memory_fit(spec, default_gib: Optional[float]) -> tuple[str, str, str]:
    """(status, reason, message) of the MemoryFits condition of a single-stage resource spec."""
    from qwen_trainer.spec.resolve import job_memory_per_gpu

    if spec.stage not in ("pretrain", "finetune") or spec.resources.gpus_per_node == 0:
        return "True", NOT_ESTIMATED, "not a training stage on GPUs"
    have, source = device_memory(spec.scheduling.node_selector, default_gib)
    if have is None:
        return "Unknown", NOT_ESTIMATED, "the card is not known: set nvidia.com/gpu.product in nodeSelector"
    need = job_memory_per_gpu(spec.job_spec(), spec.world_size()).total_gib
    p = spec.parallelism
    layout = (f"tensor {p.tensor} x pipeline {p.pipeline} x expert {p.expert}, micro batch "
              f"{spec.training.micro_batch_size}, sequence {spec.training.seq_length}, activation checkpointing "
              f"{spec.training.activation_checkpointing.mode}")
    if need > have:
        return ("False", EXCEEDS, f"estimated {need:.1f} GiB per GPU ({layout}) exceeds the {have:.0f} GiB of "
                f"{source}; raise tensor/pipeline parallelism, turn on the distributed optimizer or activation "
                "checkpointing, or lower the micro batch (qwenctl explain shows the estimate)")
    return "True", FITS, f"estimated {need:.1f} GiB per GPU of {have:.0f} GiB ({source})"
