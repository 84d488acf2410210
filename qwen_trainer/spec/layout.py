"""The Megatron checkpoint layout a spec asks for, worked out in one place.

The convert step and every gathered training save (MegaBlocks, the checkpoint benchmark's baseline) write Megatron
checkpoints through qwen_trainer.convert; both take these arguments, so one spec never produces two layouts: the
parallel split (tensor, pipeline, expert, expert-tensor, virtual pipeline chunks per stage), the padded vocabulary,
the Transformer Engine key names and the expert layout (grouped GEMM or one module per expert).
"""

from __future__ import annotations

from qwen_trainer.spec.job import JobSpec
from qwen_trainer.spec.resolve import resolve_architecture


def virtual_chunks(spec: JobSpec, num_layers: int) -> int:
    """The spec counts layers per virtual stage; the converter counts model chunks per pipeline stage."""
    v = spec.parallelism.virtual_pipeline_layers
    return 1 if v is None else num_layers // spec.parallelism.pipeline // v


def megatron_layout(spec: JobSpec) -> dict:
    """Keyword arguments of qwen_trainer.convert.convert that fix the layout of a Megatron checkpoint of `spec`."""
    from qwen_trainer.convert import ParallelLayout

    arch = resolve_architecture(spec)
    p = spec.parallelism
    out = dict(layout=ParallelLayout(tp=p.tensor, pp=p.pipeline, ep=p.expert, etp=p.expert_tensor,
                                     vpp=virtual_chunks(spec, arch.num_layers)),
               padded_vocab_size=arch.vocab_size, transformer_engine_keys=spec.training.transformer_engine)
    moe = spec.model.moe
    if arch.moe is not None and moe is not None:
        out["expert_layout"] = "grouped" if moe.grouped_gemm and spec.training.transformer_engine else "sequential"
    return out
