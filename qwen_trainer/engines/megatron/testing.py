"""Small helpers shared by the megatron engine's tests and the GPU benchmark: job specs for model shapes, random
token batches in the trainer's micro-batch form, and an HF model with the same weights."""

from __future__ import annotations

from typing import Any, Optional

import torch

from qwen_trainer.spec.job import JobSpec


def tiny_architecture(num_layers: int = 2, **overrides: Any) -> dict:
    """A model small enough for CPU tests, in the spec's architecture override form."""
    return dict(numLayers=num_layers, hiddenSize=64, numAttentionHeads=4, numQueryGroups=2, ffnHiddenSize=128,
                vocabSize=512, maxPositionEmbeddings=128, **overrides)


def family_cases(num_layers: int = 2) -> dict[str, tuple[str, str, dict]]:
    """name -> (family, size, job_spec keywords): a tiny model of each way the families differ (tied and untied
    embeddings, q/k norm, a MoE with a gated shared expert, a MoE without one)."""
    tiny = tiny_architecture(num_layers)
    return {
        "qwen2.5-tied": ("qwen2.5", "1.5B", dict(architecture=tiny)),
        "qwen2.5-untied": ("qwen2.5", "7B", dict(architecture=dict(tiny, tieWordEmbeddings=False))),
        "qwen3-qk-norm": ("qwen3", "0.6B", dict(architecture=dict(tiny, kvChannels=16))),
        "qwen1.5-moe-shared-gate": ("qwen1.5", "A2.7B", dict(
            architecture=dict(tiny, numQueryGroups=4),
            moe=dict(numExperts=4, topK=2, ffnHiddenSize=32, sharedExpertFfnHiddenSize=64,
                     tokenDispatcher="allgather"))),
        "qwen3-moe": ("qwen3", "A3B", dict(
            architecture=dict(tiny, kvChannels=16),
            moe=dict(numExperts=4, topK=2, ffnHiddenSize=32, normTopkProb=True, tokenDispatcher="allgather"))),
    }


def job_spec(family: str, size: str, *, architecture: Optional[dict] = None, moe: Optional[dict] = None,
             parallelism: Optional[dict] = None, training: Optional[dict] = None, backend: str = "megatron-core",
             checkpoint: Optional[dict] = None) -> JobSpec:
    """A pretrain job spec with the given shape (structural validation only: data paths are not needed here)."""
    model: dict[str, Any] = {"family": family, "size": size, "backend": backend}
    if architecture:
        model["architecture"] = architecture
    if moe:
        model["moe"] = moe
    train = {"trainIters": 10, "lr": 1e-4, "minLr": 1e-5, "globalBatchSize": 8, "microBatchSize": 1,
             "seqLength": 4096}
    train.update(training or {})
    return JobSpec.model_validate({"stage": "pretrain", "model": model, "parallelism": parallelism or {},
                                   "training": train, "checkpoint": checkpoint or {}})


def random_micro_batches(n: int, micro: int, seq: int, vocab: int, seed: int = 0, ignore_first: int = 0):
    """`n` micro-batches of random tokens; targets are the next token (the last position and the first
    `ignore_first` positions carry no loss)."""
    from qwen_trainer.data.batches import IGNORE_INDEX, MicroBatch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        seqs = torch.randint(0, vocab, (micro, seq + 1), generator=g)
        tokens = seqs[:, :-1].contiguous()
        targets = seqs[:, 1:].contiguous()
        targets[:, :ignore_first] = IGNORE_INDEX
        pos = torch.arange(seq).expand(micro, seq).contiguous()
        out.append(MicroBatch(tokens, targets, pos))
    return out


def hf_reference(arch, seed: int = 0, dtype=torch.float32, init_std: float = 0.02):
    """An HF model of the resolved architecture with seeded random weights, and its weights in published naming."""
    from qwen_trainer.engines.hf_model import build_model, checkpoint_state_dict, hf_config

    torch.manual_seed(seed)
    model = build_model(hf_config(arch, init_std=init_std), dtype=dtype, attn_implementation="sdpa")
    try:
        weights = checkpoint_state_dict(model)
    except (ImportError, AttributeError):  # transformers without revert_weight_conversion
        weights = unpack_experts({k: v.detach() for k, v in model.state_dict().items()})
    return model, unpack_experts(weights)


def unpack_experts(sd: dict) -> dict:
    """Packed expert tensors (transformers v5 in-memory layout: gate_up_proj [E, 2I, H], down_proj [E, H, I]) to
    published per-expert names; other tensors pass through."""
    out = {}
    for k, v in sd.items():
        if k.endswith("mlp.experts.gate_up_proj"):
            prefix = k[: -len("gate_up_proj")]
            inter = v.shape[1] // 2
            for e in range(v.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = v[e, :inter].contiguous()
                out[f"{prefix}{e}.up_proj.weight"] = v[e, inter:].contiguous()
        elif k.endswith("mlp.experts.down_proj"):
            prefix = k[: -len("down_proj")]
            for e in range(v.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = v[e].contiguous()
        else:
            out[k] = v
    return out


def hf_loss(model, micro_batches, device) -> float:
    """Token-averaged loss of an HF causal LM over micro-batches (targets already shifted, -100 ignored)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for mb in micro_batches:
            logits = model(input_ids=mb.tokens.to(device), position_ids=mb.position_ids.to(device)).logits.float()
            t = mb.targets.to(device)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), t.reshape(-1),
                                                     ignore_index=-100, reduction="sum")
            total += float(loss)
            count += int((t >= 0).sum())
    return total / max(count, 1)


def built_engine(spec, options=None, log=None):
    """A MegatronEngine built as `qwen_trainer run` builds it (the process group joined first, then build(ctx)), for
    GPU tests and benchmarks that drive steps themselves."""
    from qwen_trainer.distenv import init_process_group, read_env
    from qwen_trainer.engines.base import EngineContext
    from qwen_trainer.spec.resolve import init_method_std, resolve_architecture

    from .engine import MegatronEngine

    env = read_env()
    engine = MegatronEngine(spec, options, env=env)
    init_process_group(env, "nccl")
    engine.build(EngineContext(spec, resolve_architecture(spec), env, init_method_std(spec), spec.training.seed,
                               log or (lambda _m: None)))
    return engine
