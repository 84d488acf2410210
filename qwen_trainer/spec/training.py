"""Optimisation, schedule, precision, kernels and intervals."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from .base import PositiveInt, SpecModel


class ActivationCheckpointing(SpecModel):
    """Recompute activations in the backward pass to save memory."""

    mode: Literal["selective", "full", "offload", "none"] = "selective"
    """selective (attention core only), full (whole layers), offload (activations to host memory) or none."""
    layers: PositiveInt = 1
    """Layers per recompute or offload block (full and offload modes)."""


class Training(SpecModel):
    """Batch, schedule and optimiser. Exactly one of trainTokens, trainIters or epochs sets the length."""

    precision: Literal["fp16", "bf16", "fp8"] = "bf16"
    """Parameter and compute precision; fp8 runs bf16 with FP8 GEMMs through Transformer Engine."""
    fp8_recipe: Literal["hybrid", "blockwise", "delayed"] = "hybrid"
    """FP8 scaling recipe (fp8 only)."""
    micro_batch_size: PositiveInt = 1
    """Sequences per GPU per forward pass."""
    global_batch_size: PositiveInt = 8
    """Sequences per optimiser step over all data-parallel ranks."""
    seq_length: PositiveInt = 2048
    """Tokens per sequence."""
    pad_length: Optional[PositiveInt] = None
    """Pad SFT samples to this many tokens (defaults to seqLength)."""
    extra_vocab_size: Optional[int] = Field(default=None, ge=0)
    """Rows added to the 151643-entry vocabulary (293 -> 151936, 421 -> 152064); defaults to the preset's."""
    lr: float = Field(default=1e-5, gt=0)
    """Peak learning rate."""
    min_lr: float = Field(default=1e-6, ge=0)
    """Learning rate at the end of the decay."""
    lr_decay_style: Optional[Literal["cosine", "linear", "constant"]] = None
    """Decay after warmup; defaults to linear for megatron-lm (as its scripts do) and cosine otherwise."""
    weight_decay: float = Field(default=0.1, ge=0)
    """AdamW weight decay."""
    adam_beta1: float = Field(default=0.9, gt=0, lt=1)
    """AdamW beta1."""
    adam_beta2: float = Field(default=0.95, gt=0, lt=1)
    """AdamW beta2."""
    adam_eps: float = Field(default=1e-8, gt=0)
    """AdamW epsilon."""
    clip_grad: float = Field(default=1.0, ge=0)
    """Gradient-norm clipping (0 disables)."""
    init_method_std: Optional[float] = Field(default=None, gt=0)
    """Std of weight init for fresh parameters; defaults to 0.006 (megatron-lm) or 0.008."""
    attention_dropout: float = Field(default=0.0, ge=0, lt=1)
    """Dropout on attention probabilities."""
    hidden_dropout: float = Field(default=0.0, ge=0, lt=1)
    """Dropout on hidden states."""
    seed: int = 1234
    """Random seed for initialisation, data order and dropout."""
    train_tokens: Optional[PositiveInt] = None
    """Train for this many tokens (iterations = tokens / globalBatchSize / seqLength)."""
    warmup_tokens: Optional[int] = Field(default=None, ge=0)
    """Warm the learning rate up over this many tokens (with trainTokens)."""
    train_iters: Optional[PositiveInt] = None
    """Train for this many optimiser steps."""
    warmup_iters: Optional[int] = Field(default=None, ge=0)
    """Warmup steps (with trainIters or epochs)."""
    epochs: Optional[PositiveInt] = None
    """Train for this many passes over the SFT data."""
    activation_checkpointing: ActivationCheckpointing = Field(default_factory=ActivationCheckpointing)
    """Activation recomputation."""
    flash_attention: Optional[bool] = None
    """Attention kernels (the guide's FL switch): true pins flash attention (Transformer Engine's flash backend,
    else torch SDPA's flash kernels), false pins cuDNN's fused attention (TE's fused backend, SDPA's cuDNN
    kernels); unset lets the engine choose, which on Hopper is cuDNN's (its backward runs about twice as fast)."""
    transformer_engine: bool = False
    """Use Transformer Engine layers (needed for fp8). false runs the engine's own layers (SDPA attention, its
    Triton kernels) even where Transformer Engine is installed, as the guide's TE=false does."""
    cuda_graphs: bool = False
    """Capture each transformer layer's forward and backward as CUDA graphs after the first step (megatron-core's
    local capture; MoE layers up to the token permutation). Applies on Hopper-class GPUs with data parallelism
    only (no tensor, pipeline or context parallelism, no full recompute, no q/k norm as in Qwen3); elsewhere
    the run goes on without graphs and logs why."""
    whole_step_graph: bool = True
    """On one GPU, capture the step's forward and backward (every micro-batch) as one CUDA graph in the second step
    and replay it in every later step of the same shapes and loss-token counts, so that the host's launching of
    each kernel leaves the step (3-5% more tokens/s on the MoE benchmark shapes on an H100); steps that differ run
    as before. Applies with one process, bf16, SDPA attention, no full recompute, no model parallelism and, for
    MoE, the engine's own token dispatch; elsewhere, with cudaGraphs, or when a capture fails, the run goes on
    without it and logs why. false runs every step's kernels from the host."""
    expert_gradient_memory_mib: int = Field(default=4096, ge=0)
    """MoE with grouped experts: memory per GPU (MiB) that may keep the experts' weight-gradient operands (their
    tokens and output gradients) from micro-batch to micro-batch, so that one grouped GEMM in the step's last
    backward computes each expert weight's gradient instead of one per micro-batch (7.6-8.2% more tokens/s for the
    Qwen MoE benchmark shapes on an H100, for 2.3-3.5 GiB more peak memory there). Past this much, the kept
    micro-batches are added early; the flush briefly needs as much again. 0 computes them per micro-batch."""
    optimizer_offload_fraction: float = Field(default=0.0, ge=0, le=1)
    """Fraction of optimizer state kept in host memory (0 = none; anything else is not carried out by this
    trainer yet, so a resource that sets it is refused)."""
    save_interval: PositiveInt = 1000
    """Save a checkpoint every this many steps (and at the end)."""
    eval_interval: PositiveInt = 10000
    """Evaluate on the validation split every this many steps."""
    eval_iters: int = Field(default=10, ge=0)
    """Validation batches per evaluation."""
    log_interval: PositiveInt = 1
    """Log a line every this many steps."""
    keep_last_n: Optional[PositiveInt] = None
    """Keep only this many most recent checkpoints (unset keeps all)."""
    num_workers: int = Field(default=2, ge=0)
    """Threads per rank that read the coming steps' batches ahead of the GPU (0 reads each step when it starts)."""
