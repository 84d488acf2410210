"""Run the stage a job spec names."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from qwen_trainer.distenv import DistEnv
from qwen_trainer.errors import UserError
from qwen_trainer.spec import JobSpec, resolve_architecture
from qwen_trainer.spec.layout import megatron_layout
from qwen_trainer.spec.resolve import checkpoint_formats


def run_stage(spec: JobSpec, d: DistEnv, log: Callable[[str], None]) -> int:
    if spec.stage in ("pretrain", "finetune"):
        from qwen_trainer.train import run_training

        return run_training(spec, d, log)
    if spec.stage in ("convert", "export"):
        return run_conversion(spec, d, log)
    if spec.stage == "evaluate":
        from qwen_trainer.evaluate import run_evaluation

        return run_evaluation(spec, d, log)
    raise UserError(f"unknown stage {spec.stage!r}", path="stage")


def run_conversion(spec: JobSpec, d: DistEnv, log: Callable[[str], None]) -> int:
    """convert (HF -> Megatron) and export (Megatron -> HF) through qwen_trainer.convert, on rank 0 only."""
    if not d.is_main:
        return 0
    from qwen_trainer.convert import ConversionError, convert

    src_fmt, out_fmt = checkpoint_formats(spec)
    source, target = Path(spec.checkpoint.source.path), Path(spec.checkpoint.output.path)
    kwargs = {}
    if spec.stage == "convert":
        arch = resolve_architecture(spec)
        kwargs = megatron_layout(spec)
        moe = spec.model.moe
        if moe is not None and moe.upcycling.enabled:
            from qwen_trainer.convert import UpcycleOptions

            kwargs["upcycle"] = UpcycleOptions(num_experts=arch.moe.num_experts, top_k=arch.moe.top_k,
                                            router_std=moe.upcycling.router_init_std, seed=moe.upcycling.seed,
                                            norm_topk_prob=arch.moe.norm_topk_prob)
    log(f"{spec.stage}: {source} ({src_fmt}) -> {target} ({out_fmt}), dtype {spec.checkpoint.dtype}")
    try:
        result = convert(source, src_fmt, target, out_fmt, dtype=spec.checkpoint.dtype,
                         overwrite=spec.checkpoint.overwrite, verify=spec.checkpoint.verify, progress=False, **kwargs)
    except ConversionError as err:
        from qwen_trainer.errors import UserErrors

        raise UserErrors([f"checkpoint: {p}" for p in err.problems]) from None
    log(f"wrote {result.target}: {result.files} files, {result.bytes / 1e6:.1f} MB in {result.seconds:.1f}s")
    return 0
