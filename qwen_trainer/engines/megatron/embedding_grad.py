"""The word embedding's gradient added row by row into its fp32 gradient buffer.

Through autograd, the gradient of megatron's VocabParallelEmbedding is a dense bf16 tensor the size of the whole
vocabulary (151,936 x 2,048 for the Qwen MoE shapes: 622 MB), zero-filled and scattered into for every
micro-batch, which the accumulation hook then adds into the fp32 `main_grad` (a read of 2 bytes and a read and
write of 8 per vocabulary entry), although a micro-batch touches only its few thousand distinct tokens. Here the
backward adds each token's gradient row straight into `main_grad` in fp32 (rows of repeated tokens summed there,
one rounding fewer than the bf16 gradient), and autograd gets megatron's kind of placeholder with the parameter
marked `grad_added_to_main_grad`, as the experts' grouped GEMM does (expert_wgrad).

Only for an embedding whose weight no other layer uses (untied output layer: a tied one would add its own
gradient through autograd) and without tensor parallelism (each rank would hold only its vocabulary slice).
With torch's deterministic algorithms on, the rows are added by the sort-based `index_put_` instead of atomics.
"""

from __future__ import annotations

import functools
from typing import Iterable

import torch
import torch.nn.functional as F

from .triton_kernels import WGRAD_IN_MAIN_GRAD as MARK


class EmbeddingIntoMainGrad(torch.autograd.Function):
    """weight[ids], whose gradient goes into weight.main_grad (fp32) instead of autograd."""

    @staticmethod
    def forward(ctx, ids, weight):
        ctx.save_for_backward(ids)
        ctx.weight = weight
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        weight = ctx.weight
        rows, flat = grad.reshape(-1, grad.shape[-1]).float(), ids.reshape(-1)
        if torch.are_deterministic_algorithms_enabled():
            weight.main_grad.index_put_((flat,), rows, accumulate=True)
        else:
            weight.main_grad.index_add_(0, flat, rows)
        weight.grad_added_to_main_grad = True
        # a placeholder, as megatron's fused linear layers return: DDP's hook still sees the parameter, skips the add
        return None, torch.empty_like(weight)


def _forward(module, input_):
    return EmbeddingIntoMainGrad.apply(input_, module.weight)


NO_EMBEDDING, TIED = "no word embedding on this pipeline stage", "the output layer shares the embedding's weight"


def why_not(model) -> str | None:
    """None when the model's word embedding can take this path (call after DDP created main_grad)."""
    embedding = getattr(getattr(model, "embedding", None), "word_embeddings", None)
    if embedding is None:
        return NO_EMBEDDING
    if getattr(model, "share_embeddings_and_output_weights", False):
        return TIED
    if embedding.tp_group.size() > 1 or getattr(embedding, "reduce_scatter_embeddings", False):
        return "tensor parallelism splits the vocabulary"
    if not hasattr(embedding.weight, "main_grad"):
        return "no fp32 gradient buffer"
    return None


def install(models: Iterable[torch.nn.Module]) -> tuple[int, list[str]]:
    """Route the word embedding's gradient of each (unwrapped) model into main_grad where it applies: (embeddings
    changed, reasons worth a note for the others: not a later pipeline stage or a tied embedding, which are the
    design). Before install_grad_accumulation, whose hook must leave the weight alone."""
    changed, reasons = 0, []
    for model in models:
        reason = why_not(model)
        if reason is not None:
            if reason not in reasons and reason not in (NO_EMBEDDING, TIED):
                reasons.append(reason)
            continue
        embedding = model.embedding.word_embeddings
        setattr(embedding.weight, MARK, True)
        embedding.forward = functools.partial(_forward, embedding)
        changed += 1
    return changed, reasons
