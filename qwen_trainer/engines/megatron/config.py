"""From the job spec to megatron-core objects: `TransformerConfig` arguments, the layer spec and `GPTModel` arguments.

Pure functions of the resolved architecture, the spec and `EngineOptions` (plus what is installed, passed in as
`Capabilities`), so they are unit-tested on a CPU. Nothing here touches CUDA or process groups.

Family traits map as Megatron-Bridge maps them: RMSNorm, SwiGLU (`gated_linear_unit` + silu), no linear biases
except the qkv bias of Qwen1.5/2/2.5, q/k RMSNorm for Qwen3, rotary base from the family, untied output layer
unless the preset ties it. MoE: `moe_router_pre_softmax = not norm_topk_prob` (softmax over all experts then top-k
without renormalisation is Qwen2-MoE; top-k then softmax over the k is `norm_topk_prob=True`), the shared expert's
sigmoid gate through `moe_shared_expert_gate`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from qwen_trainer.errors import UserError
from qwen_trainer.spec.resolve import ResolvedArchitecture, init_method_std

ATTENTION_CHOICES = ("auto", "te", "flash-attn", "sdpa", "local")
EXPERT_CHOICES = ("auto", "te", "grouped-gemm", "torch-grouped", "sequential")


@dataclass(frozen=True)
class Capabilities:
    """What this process can use. `probe()` fills it from the installed packages and the GPU."""

    cuda: bool = False
    transformer_engine: bool = False
    flash_attn: bool = False
    grouped_gemm: bool = False  # the grouped_gemm package (CUTLASS), used by megatron's legacy GroupedMLP
    torch_grouped_mm: bool = False  # torch._grouped_mm runs on this GPU (bf16, Hopper)
    megablocks: bool = False
    device_name: str = "cpu"

    @classmethod
    def probe(cls) -> "Capabilities":
        import importlib.util

        def has(mod: str) -> bool:
            try:
                return importlib.util.find_spec(mod) is not None
            except (ImportError, ValueError):
                return False

        cuda = torch.cuda.is_available()
        te = has("transformer_engine") and cuda
        if te:
            try:
                import transformer_engine.pytorch  # noqa: F401
            except Exception:  # a broken TE install is treated as absent
                te = False
        grouped_mm = False
        if cuda and hasattr(torch, "_grouped_mm"):
            major, _ = torch.cuda.get_device_capability()
            grouped_mm = major >= 9
        return cls(
            cuda=cuda,
            transformer_engine=te,
            flash_attn=has("flash_attn") and cuda,
            grouped_gemm=has("grouped_gemm") and cuda,
            torch_grouped_mm=grouped_mm,
            megablocks=has("megablocks") and cuda,
            device_name=torch.cuda.get_device_name() if cuda else "cpu",
        )


@dataclass(frozen=True)
class EngineOptions:
    """Performance levers of the megatron engine. Defaults are the fastest choice that is exact; each can be turned
    off on its own (the GPU benchmark's ablation list does exactly that)."""

    attention: str = "auto"
    """te | flash-attn | sdpa (torch scaled_dot_product_attention, flash backend) | local (megatron's unfused)."""
    sdpa_backend: Optional[str] = "cudnn"
    """Backend SDPA is pinned to (cudnn, falling back to flash | flash | efficient | math), or None to let torch
    pick. cuDNN's fused attention runs the backward pass about twice as fast as torch's flash kernels on Hopper."""
    fused_rope: bool = True
    """Apply rotary embeddings inside the SDPA attention module with one compiled kernel (sdpa only)."""
    fused_qkv_rope: bool = True
    """With fused_rope and no q/k norm: split the fused QKV projection, rotate q and k and lay q, k, v out for
    SDPA in one Triton kernel; its backward writes the QKV gradient in one pass (no concatenation, no copies)."""
    fused_rmsnorm: bool = True
    """Compiled RMSNorm (one kernel forward, one backward) instead of torch.nn.RMSNorm."""
    fused_swiglu: bool = True
    """megatron's fused SwiGLU (`bias_activation_fusion`)."""
    triton_swiglu: bool = True
    """With fused_swiglu: SwiGLU forward and backward as one-pass Triton kernels instead of megatron's compiled
    functions (whose backward reads the gradient and the gate twice)."""
    chunked_cross_entropy: bool = True
    """Output layer + cross-entropy in token chunks with the gradient computed in the forward pass, so the fp32
    logits of the whole micro-batch never exist at once."""
    cross_entropy_chunk_tokens: int = 2048
    fused_cross_entropy: bool = True
    """Without tensor parallelism, each chunk's softmax, loss and logits gradient as one compiled function."""
    output_grad_into_buffer: bool = True
    """bf16, chunked loss, output weight not tied to the embedding: its gradient goes from each chunk's GEMM
    straight into the fp32 gradient buffer, scaled by the schedule's known loss normalisation (no bf16 gradient,
    no separate scale and add)."""
    experts: str = "auto"
    """MoE expert implementation: te | grouped-gemm | torch-grouped | sequential."""
    local_dispatch: bool = True
    """With torch-grouped experts, every expert on this rank and no token dropping: permute and combine tokens
    on the device without megatron's host copies of the per-expert token counts (no GPU-idle waits)."""
    gather_permute: bool = True
    """MoE token combine and the permutation's backward as gathers over each token's expert rows (fp32 sum, one
    rounding) instead of atomic bf16 scatter-adds into a zeroed tensor: in the local dispatcher and, under expert
    parallelism, in megatron's all-to-all dispatcher (dropless routing). About 3 ms less GPU work per step of the
    A2.7B benchmark shape on an H100 (benchmarks/gpu/RESULTS.md)."""
    grad_accum_fusion: bool = True
    """Accumulate weight gradients straight into the fp32 gradient buffer (one GEMM with fp32 output)."""
    expert_wgrad_into_buffer: bool = False
    """With torch-grouped experts: each expert's weight gradient accumulated in fp32 straight into the gradient
    buffer by one Triton grouped GEMM (expert_wgrad), instead of a bf16 gradient added in a separate pass; with
    defer_expert_wgrad, one launch reads every kept micro-batch where it lies (no regrouping, no bf16 product).
    Off: on an H100 the kernel alone (per micro-batch) took 1.15-1.4x the time of torch's grouped GEMM plus the
    add; over the deferred micro-batches it took 0.92-1.21x the time of the deferral's regrouping, grouped GEMM
    and cast copy (benchmarks/gpu/expert_wgrad_defer_bench.py), and whole steps moved by -1.0% to +0.6%
    (benchmarks/gpu/RESULTS.md). Its 50-step GPU loss curve stays within the lever test's bound."""
    defer_expert_wgrad: bool = True
    """With torch-grouped experts: each expert weight's gradient operands (its tokens and their output gradient)
    kept from micro-batch to micro-batch and multiplied once, in the step's last backward, by one grouped GEMM over
    every micro-batch's tokens, then added into the fp32 gradient buffer once, instead of a bf16 gradient the size
    of every expert's weights written and added per micro-batch. Costs the kept operands' memory, capped by
    expert_wgrad_stash_mib / the spec's training.expertGradientMemoryMiB (past it, the kept micro-batches are
    flushed early); not applied where whole MoE layers are captured as CUDA graphs. +7.6% (A2.7B) / +8.2%
    (Qwen3-30B-A3B) tokens/s on an H100 (the `expert-wgrad-deferred` benchmark variant). One bf16 rounding of the
    sum instead of one per micro-batch: the 50-step GPU loss curve stays within the distance two runs of the
    previous default keep from each other (8.8e-4 on an H200; tests/gpu/curve_spread.py)."""
    expert_grad_overwrite: bool = True
    """With defer_expert_wgrad: each expert weight's first product of a step is written into the fp32 gradient
    buffer (a cast copy) instead of added, and the buffer's zeroing as the step starts leaves those ranges out:
    no read of the old gradient, no fill (exact: the same bits as adding into zeros)."""
    expert_wgrad_stash_mib: Optional[int] = None
    """Memory the deferred expert operands may hold over all layers of this rank (MiB); the flush briefly needs
    as much again for the regrouped copy. None follows the spec's training.expertGradientMemoryMiB (0 there or
    here turns the deferral off)."""
    embedding_grad_into_buffer: bool = True
    """Untied word embedding without tensor parallelism: each token's gradient row added straight into the fp32
    gradient buffer (embedding_grad) instead of a vocabulary-sized bf16 gradient added in a separate pass (about
    4.5 ms less GPU work per step of the A2.7B benchmark shape on an H100)."""
    triton_grad_accumulation: bool = True
    """Every other gradient (embeddings, norms, biases, router, MoE experts) added into the fp32 buffer by a
    vectorised Triton kernel instead of torch's mixed-dtype add."""
    fused_adam: bool = True
    """torch's fused AdamW kernel (megatron falls back to the multi-kernel foreach AdamW without TE/Apex)."""
    clip_in_adam: bool = True
    """With fused_adam: gradient clipping applied by the fused AdamW kernel as it reads each gradient (its
    grad_scale divisor) instead of a separate scaling pass over the fp32 gradients (clip_in_adam). On an H100, a
    clipped step of the A2.7B benchmark shape: the 6.9 ms pass gone, fused AdamW 4.1 ms slower."""
    read_back_next_step: bool = False
    """`launch_step` leaves the step's loss, gradient norm and checks on the device for the caller to read after
    it has launched the next step (the training loop does; pending_step.PendingStep), instead of reading them back as
    the step ends: the host no longer waits for the optimizer before it launches the next step's first kernels.
    An unread step is read back before anything saves, evaluates or gathers weights. The same figures bit for bit
    (CPU tests at DP 2 and EP 2). Off: on an H100 the MoE benchmark shapes ran no faster with it (+0.1% / -0.5%
    on a warm card, variant `readback-next-step`): the host launches the step as slowly as the GPU runs it."""
    grad_norm_on_device: bool = True
    """With clip_in_adam: the gradient norm and the clip divisor computed on the GPU and read back with the loss,
    instead of megatron's read of the norm between the backward and the optimizer step (the host waited there for
    the whole backward, then the GPU waited for the host to launch the step). The same divisor: the norm's square
    root in float64, as megatron takes it on the host."""
    adamw_writes_model_params: bool = True
    """With fused_adam and bf16 weights, under megatron's distributed or mixed-precision optimizer: one Triton pass
    per parameter group runs AdamW over the fp32 main weights and writes the bf16 weights too (adamw_kernel; under
    the distributed optimizer, this rank's slice of the parameter buffer the all-gather sends), instead of torch's
    fused AdamW (which, clipping, also writes the divided gradient back) and megatron's separate copy pass. torch
    2.11's fused-AdamW arithmetic in its precisions, and its optimizer state. On an H100, the 3-layer benchmark
    shapes: +4.7% and +8.4% tokens/s (A2.7B), +1.4% and +10.4% (Qwen3-30B-A3B, whose runs vary as much)."""
    foreach_grad_norm: bool = True
    """Gradient norm and clipping with torch._foreach ops (megatron's fallback syncs once per tensor)."""
    cuda_graphs: Optional[bool] = None
    """Capture each transformer layer's forward and backward as CUDA graphs after the first step (megatron-core's
    own capture, no Transformer Engine needed); MoE layers capture attention, router and token permutation, the
    experts stay eager. Removes the host's kernel-launch time where it exceeds the GPU's work (small models).
    None follows the spec's training.cudaGraphs; cuda_graph_blocker lists where capture is refused."""
    graph_moe_experts: bool = False
    """With CUDA graphs on MoE layers: capture the whole layer, the experts' grouped GEMMs and the combine
    included (with the local dispatcher nothing in it waits for the host or changes shape), instead of the
    router and permutation only. Trains like eager on an H100 (tests/gpu/test_cuda_graphs.py); off until it is
    measured against the router-only capture in one run. The experts' weight gradients then go through autograd
    (neither defer_expert_wgrad nor expert_wgrad_into_buffer: a replayed backward runs no Python)."""
    whole_step_graph: Optional[bool] = None
    """None: take spec.training.wholeStepGraph (on by default). On one GPU: the forward and backward of all the step's micro-batches captured as one CUDA graph in the
    second step and replayed in later steps whose shapes and loss-token counts are the captured step's (others run
    eagerly); the optimizer step stays eager (step_graph). Replaces the host's launch of every kernel, which on the
    MoE benchmark shapes takes as long as the GPU's work: on an H100 +3.4% (A2.7B) and +5.3% (Qwen3-30B-A3B) tokens/s
    over the eager step, medians of two runs each (benchmarks/gpu/RESULTS.md); trains like eager
    (tests/gpu/test_whole_step_graph.py, test_moe_levers.py). Refused by itself where whole_step_graph_blocker says
    so (the engine's log line names the reason), and a capture that fails falls back to eager steps."""
    overlap_grad_reduce: Optional[bool] = None
    """None: take spec.parallelism.overlapGradReduce."""
    recompute: Optional[str] = None
    """None: take spec.training.activationCheckpointing.mode (selective | full | none)."""
    bucket_size: Optional[int] = None
    use_cpu_initialization: bool = False
    extra_config: dict = field(default_factory=dict)
    """Extra TransformerConfig fields, applied last (for experiments)."""

    def replace(self, **changes) -> "EngineOptions":
        return dataclasses.replace(self, **changes)


def choose_attention(opts: EngineOptions, caps: Capabilities, context_parallel: int, want_te: bool) -> str:
    """`want_te`: the spec's training.transformerEngine. Without it the engine's own layers run even where
    Transformer Engine is installed (the guide's TE=false, megatron's --transformer-impl local)."""
    choice = opts.attention
    if choice not in ATTENTION_CHOICES:
        raise UserError(f"attention must be one of {', '.join(ATTENTION_CHOICES)}, got {choice!r}")
    if choice == "auto":
        choice = "te" if want_te and caps.transformer_engine else "sdpa"
    if choice == "te" and not caps.transformer_engine:
        raise UserError("attention 'te' needs Transformer Engine, which is not installed")
    if choice == "flash-attn" and not caps.flash_attn:
        raise UserError("attention 'flash-attn' needs the flash-attn package, which is not installed")
    if context_parallel > 1 and choice != "te":
        raise UserError("context parallelism needs Transformer Engine's attention", path="spec.parallelism.context")
    return choice


def choose_experts(opts: EngineOptions, caps: Capabilities, use_te: bool) -> str:
    choice = opts.experts
    if choice not in EXPERT_CHOICES:
        raise UserError(f"experts must be one of {', '.join(EXPERT_CHOICES)}, got {choice!r}")
    if choice == "auto":
        # torch's grouped GEMM before the grouped_gemm package: only it takes the per-expert counts on the device
        # (the sync-free dispatch and CUDA graphs build on that); the package serves GPUs before Hopper
        if use_te:
            choice = "te"
        elif caps.torch_grouped_mm:
            choice = "torch-grouped"
        elif caps.grouped_gemm:
            choice = "grouped-gemm"
        else:
            choice = "sequential"
    if choice == "te" and not use_te:
        raise UserError("experts 'te' needs Transformer Engine layers")
    if choice == "grouped-gemm" and not caps.grouped_gemm:
        raise UserError("experts 'grouped-gemm' needs the grouped_gemm package, which is not installed")
    if choice == "torch-grouped" and not caps.torch_grouped_mm:
        raise UserError("experts 'torch-grouped' needs torch._grouped_mm on a Hopper (sm90+) GPU")
    return choice


def recompute_mode(spec, opts: EngineOptions) -> str:
    mode = opts.recompute or spec.training.activation_checkpointing.mode
    if mode == "offload":
        raise UserError("activation offload is not supported by the megatron engine; use selective or full",
                        path="spec.training.activationCheckpointing.mode")
    return mode


def dtype_of(precision: str) -> torch.dtype:
    return torch.float16 if precision == "fp16" else torch.bfloat16


def expert_stash_mib(spec, opts: EngineOptions) -> int:
    """MiB the deferred expert weight-gradient operands may hold (0: no deferral)."""
    if not opts.defer_expert_wgrad:
        return 0
    mib = spec.training.expert_gradient_memory_mib if opts.expert_wgrad_stash_mib is None \
        else opts.expert_wgrad_stash_mib
    return max(int(mib), 0)


def wants_cuda_graphs(spec, opts: EngineOptions) -> bool:
    return spec.training.cuda_graphs if opts.cuda_graphs is None else opts.cuda_graphs


def cuda_graph_blocker(spec, opts: EngineOptions, kw: dict, attention: str, experts: str) -> Optional[str]:
    """Why the layers cannot be captured as CUDA graphs here (None: they can).

    What was checked on the GPU (runs of tests/gpu/cuda_graph_worker.py): megatron's own ops, SDPA, the QKV and
    SwiGLU Triton functions and the RMSNorm train to eager's losses under megatron's capture. The compiled norm
    drifted (1e-2 in the loss after three steps) until it was given a private copy of the layer's input (see
    RMSNorm.copy_input); with it the losses matched eager's bit for bit. Compiled functions that would be traced
    per tensor inside the graphs (megatron's SwiGLU, the compiled rope that q/k norm needs) are refused."""
    from types import SimpleNamespace

    from .triton_kernels import triton_available

    p = spec.parallelism
    if not triton_available():
        return "needs Triton for the graph-safe kernels"
    if attention != "sdpa" or kw.get("recompute_granularity") == "full":
        return "only the SDPA attention path without full recompute is captured"
    if p.tensor > 1 or p.pipeline > 1 or p.context > 1:
        return "only checked without tensor, pipeline or context parallelism"
    shape = SimpleNamespace(num_query_groups=kw["num_query_groups"], num_attention_heads=kw["num_attention_heads"],
                            qk_layernorm=kw["qk_layernorm"], kv_channels=kw["kv_channels"],
                            tensor_model_parallel_size=p.tensor)
    if opts.fused_rope and not fused_qkv_rope_applies(opts, shape):
        return "the rotary embedding would run as compiled kernels (q/k norm or an unsupported head size)"
    if opts.fused_swiglu and not opts.triton_swiglu:
        return "megatron's SwiGLU is a compiled function"
    if kw.get("num_moe_experts") and not moe_graphable(spec, opts, experts):
        return "MoE token permutation waits for the host here (megatron's dispatcher)"
    return None


def whole_step_graph_blocker(spec, opts: EngineOptions, kw: dict, attention: str, experts: str,
                             world_size: int) -> Optional[str]:
    """Why the step's forward and backward cannot be captured whole here (None: they can). Nothing in them may
    wait for the host or change a host-side value between steps that the kernels read (fp16's loss scale is a new
    tensor after each change); what is captured must be what the GPU tests run: SDPA attention, one process (no
    collective but megatron's one-rank gradient reduction inside the graph), selective recompute or none
    (tests/gpu/test_whole_step_graph.py). Compiled functions are captured after the eager first step has compiled
    them for the step's shapes, so they are not traced again inside the capture (megatron's per-layer graphs hand
    each layer new input tensors, which is why cuda_graph_blocker refuses some). Expert parallelism is refused for
    good: megatron's all-to-all dispatch sizes its exchange on the host."""
    p = spec.parallelism
    if world_size != 1:
        return "the whole-step graph runs on one GPU only (collectives inside the captured step are not checked)"
    if kw.get("cuda_graph_impl") == "local":
        return "the whole-step graph and megatron's per-layer graphs (cuda_graphs) exclude each other"
    if spec.training.precision != "bf16":
        return "bf16 only (fp16's dynamic loss scale changes between steps)"
    if attention != "sdpa":
        return "only the SDPA attention path is checked inside the graph"
    if kw.get("recompute_granularity") == "full":
        return "full activation recompute inside the captured step is not checked (selective is)"
    if kw.get("num_moe_experts") and not moe_graphable(spec, opts, experts):
        return "MoE token permutation waits for the host here (megatron's dispatcher)"
    if p.tensor > 1 or p.pipeline > 1 or p.context > 1 or p.expert > 1:
        return "model parallelism inside the captured step is not checked"
    return None


def moe_graphable(spec, opts: EngineOptions, experts: str) -> bool:
    """A CUDA graph can end after an MoE layer's token permutation only when the permutation never waits for the
    host: the local dispatcher (torch grouped experts, every expert on this rank, no token dropping, no
    shared-expert overlap; the spec-level view of megatron_dispatch.why_not_local)."""
    p, moe = spec.parallelism, spec.model.moe
    return (experts == "torch-grouped" and opts.local_dispatch and p.expert == 1 and p.expert_tensor == 1
            and (moe is None or (moe.capacity_factor is None and not moe.shared_expert_overlap)))


def transformer_config_kwargs(arch: ResolvedArchitecture, spec, opts: EngineOptions, caps: Capabilities,
                              *, attention: str, experts: str) -> dict[str, Any]:
    """Keyword arguments of megatron.core.transformer.TransformerConfig for this job."""
    import torch.nn.functional as F

    t, p = spec.training, spec.parallelism
    precision = t.precision
    if precision == "fp8" and not caps.transformer_engine:
        raise UserError("precision fp8 needs Transformer Engine, which is not installed", path="spec.training.precision")
    dtype = dtype_of(precision)
    kw: dict[str, Any] = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_layernorm,
        hidden_dropout=t.hidden_dropout,
        attention_dropout=t.attention_dropout,
        init_method_std=init_method_std(spec),
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        autocast_dtype=dtype,
        tensor_model_parallel_size=p.tensor,
        pipeline_model_parallel_size=p.pipeline,
        context_parallel_size=p.context,
        expert_model_parallel_size=p.expert,
        expert_tensor_parallel_size=p.expert_tensor,
        sequence_parallel=p.sequence_parallel and p.tensor > 1,
        bias_activation_fusion=opts.fused_swiglu,
        bias_dropout_fusion=True,
        masked_softmax_fusion=False,  # needs megatron's CUDA kernels, not in the pip wheel
        apply_rope_fusion=attention == "te",
        persist_layer_norm=False,
        gradient_accumulation_fusion=opts.grad_accum_fusion and caps.cuda,
        calculate_per_token_loss=True,
        cross_entropy_loss_fusion=True,
        use_cpu_initialization=opts.use_cpu_initialization,
        deallocate_pipeline_outputs=True,
        attention_softmax_in_fp32=True,
    )
    if precision == "fp8":
        kw.update(fp8="hybrid" if t.fp8_recipe in ("hybrid", "delayed") else "e4m3",
                  fp8_recipe="blockwise" if t.fp8_recipe == "blockwise" else "delayed")
    if p.pipeline > 1:
        if p.virtual_pipeline_layers:
            stage_layers = (p.first_stage_layers or arch.num_layers // p.pipeline)
            kw["virtual_pipeline_model_parallel_size"] = max(stage_layers // p.virtual_pipeline_layers, 1)
        if p.first_stage_layers:
            kw["num_layers_in_first_pipeline_stage"] = p.first_stage_layers
    mode = recompute_mode(spec, opts)
    if mode == "selective":
        kw.update(recompute_granularity="selective", recompute_modules=["core_attn"])
    elif mode == "full":
        layers = t.activation_checkpointing.layers
        kw.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=layers)
    moe = arch.moe
    if moe is not None:
        kw.update(
            num_moe_experts=moe.num_experts,
            moe_router_topk=moe.top_k,
            moe_ffn_hidden_size=moe.ffn_hidden_size,
            moe_router_pre_softmax=not moe.norm_topk_prob,
            moe_router_score_function="softmax",
            moe_router_dtype="fp32",
            moe_aux_loss_coeff=moe.aux_loss_coeff if moe.load_balancing_type != "none" else 0.0,
            moe_router_load_balancing_type=moe.load_balancing_type,
            moe_expert_capacity_factor=moe.capacity_factor,
            moe_token_dispatcher_type=spec.model.moe.token_dispatcher if spec.model.moe else "alltoall",
            moe_grouped_gemm=experts in ("te", "grouped-gemm", "torch-grouped"),
            moe_use_legacy_grouped_gemm=experts in ("grouped-gemm", "torch-grouped"),
            moe_permute_fusion=caps.transformer_engine,
        )
        if moe.capacity_factor is not None:
            kw["moe_pad_expert_input_to_capacity"] = False
            kw["moe_token_drop_policy"] = "probs"
        if moe.shared_expert_ffn_hidden_size:
            kw.update(moe_shared_expert_intermediate_size=moe.shared_expert_ffn_hidden_size,
                      moe_shared_expert_gate=moe.shared_expert_gate)
            if spec.model.moe is not None and spec.model.moe.shared_expert_overlap:
                kw["moe_shared_expert_overlap"] = True
        if spec.model.moe is not None and spec.model.moe.layer_recompute:
            if kw.get("recompute_granularity") == "selective":
                kw["recompute_modules"] = ["core_attn", "moe"]
            else:
                kw.update(recompute_granularity="selective", recompute_modules=["moe"])
    if attention == "te" and spec.training.flash_attention is not None:
        from megatron.core.transformer.enums import AttnBackend

        # megatron sets NVTE_FLASH_ATTN / NVTE_FUSED_ATTN from this, and stops if the environment disagrees
        kw["attention_backend"] = AttnBackend.flash if spec.training.flash_attention else AttnBackend.fused
    if wants_cuda_graphs(spec, opts) and cuda_graph_blocker(spec, opts, kw, attention, experts) is None:
        kw.update(cuda_graph_impl="local", cuda_graph_warmup_steps=1)
        if moe is not None and not opts.graph_moe_experts:
            kw["cuda_graph_scope"] = ["moe_router", "moe_preprocess"]
    kw.update(opts.extra_config)
    return kw


@dataclass(frozen=True)
class ModelPlan:
    """Everything needed to build the model, decided once per process."""

    config_kwargs: dict
    attention: str
    experts: str
    use_te: bool
    megablocks: bool
    vocab_size: int
    max_sequence_length: int
    tie_word_embeddings: bool
    rotary_base: int
    fused_rope: bool
    options: EngineOptions


def attention_kernels_from_spec(spec, opts: EngineOptions) -> EngineOptions:
    """training.flashAttention, when set, decides SDPA's kernels over the engine's default."""
    flash = spec.training.flash_attention
    return opts if flash is None else opts.replace(sdpa_backend="flash" if flash else "cudnn")


def plan_model(arch: ResolvedArchitecture, spec, opts: EngineOptions, caps: Capabilities) -> ModelPlan:
    opts = attention_kernels_from_spec(spec, opts)
    if opts.whole_step_graph is None:
        opts = opts.replace(whole_step_graph=spec.training.whole_step_graph)
    if spec.training.transformer_engine and not caps.transformer_engine:
        raise UserError("transformerEngine is set but Transformer Engine is not installed",
                        path="spec.training.transformerEngine")
    attention = choose_attention(opts, caps, spec.parallelism.context, spec.training.transformer_engine)
    use_te = attention == "te" or spec.training.precision == "fp8"
    megablocks = spec.model.backend == "megablocks"
    if megablocks:
        from .megablocks_mlp import require_megablocks

        require_megablocks(caps)
        experts = "megablocks"
    else:
        experts = choose_experts(opts, caps, use_te) if arch.moe is not None else "none"
    kwargs = transformer_config_kwargs(arch, spec, opts, caps, attention=attention,
                                       experts=experts if experts != "megablocks" else "sequential")
    return ModelPlan(
        config_kwargs=kwargs,
        attention=attention,
        experts=experts,
        use_te=use_te,
        megablocks=megablocks,
        vocab_size=arch.vocab_size,
        max_sequence_length=max(spec.training.seq_length, 1),
        tie_word_embeddings=arch.tie_word_embeddings,
        rotary_base=arch.rotary_base,
        fused_rope=opts.fused_rope and attention == "sdpa",
        options=opts,
    )


def fused_qkv_rope_applies(opts: EngineOptions, config) -> bool:
    """The one-kernel QKV split + rope (megatron_triton.QKVRope) covers layers without q/k norm, with a
    power-of-two head size and at least one query group per tensor-parallel rank."""
    from .triton_kernels import qkv_rope_supported

    groups = config.num_query_groups or config.num_attention_heads
    return bool(opts.fused_qkv_rope and not config.qk_layernorm and qkv_rope_supported(config.kv_channels)
                and groups >= config.tensor_model_parallel_size)


def layer_spec(plan: ModelPlan, config):
    """The transformer layer spec: megatron's local or TE spec with our modules swapped in where they are faster."""
    from megatron.core.models.gpt import gpt_layer_specs as specs
    from megatron.core.transformer.identity_op import IdentityOp

    from . import kernels as kernels

    num_experts = config.num_moe_experts
    if num_experts:
        kernels.ensure_moe_without_te()
    if plan.use_te:
        return specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=config.moe_grouped_gemm, qk_layernorm=config.qk_layernorm)
    spec = specs.get_gpt_layer_local_spec(
        num_experts=num_experts,
        moe_grouped_gemm=config.moe_grouped_gemm,
        qk_layernorm=config.qk_layernorm,
        moe_use_legacy_grouped_gemm=config.moe_use_legacy_grouped_gemm,
        normalization="RMSNorm",
    )
    sub = spec.submodules
    attn = sub.self_attention.submodules
    opts = plan.options
    # torch.nn.RMSNorm (the local default) refuses sequence parallelism and never marks its weight for the
    # tensor-parallel gradient all-reduce; our RMSNorm does both, compiled or eager.
    if opts.fused_rmsnorm or config.sequence_parallel:
        norm = kernels.rmsnorm_spec(compiled=opts.fused_rmsnorm)
        # a captured layer's input buffer may be reused by later graphs (RMSNorm's copy_input says why)
        graphed = getattr(config, "cuda_graph_impl", "none") == "local"
        sub.input_layernorm = kernels.rmsnorm_spec(compiled=opts.fused_rmsnorm,
                                                   copy_input=graphed and opts.fused_rmsnorm)
        sub.pre_mlp_layernorm = norm
        if config.qk_layernorm:
            attn.q_layernorm = norm
            attn.k_layernorm = norm
    if plan.attention == "sdpa":
        fused_qkv = plan.fused_rope and fused_qkv_rope_applies(opts, config)
        attn.core_attention = kernels.sdpa_attention_spec(
            rope_base=plan.rotary_base if plan.fused_rope else None, backend=opts.sdpa_backend,
            rope_in_qkv=fused_qkv)
        if fused_qkv:
            sub.self_attention.module = kernels.fused_qkv_self_attention()
    elif plan.attention == "flash-attn":
        attn.core_attention = kernels.flash_attn_spec()
    if plan.megablocks:
        from .megablocks_mlp import megablocks_mlp_spec

        sub.mlp = megablocks_mlp_spec()
    if not config.qk_layernorm:
        attn.q_layernorm = IdentityOp
        attn.k_layernorm = IdentityOp
    return spec


def gpt_model_kwargs(plan: ModelPlan) -> dict[str, Any]:
    return dict(
        vocab_size=plan.vocab_size,
        max_sequence_length=plan.max_sequence_length,
        share_embeddings_and_output_weights=plan.tie_word_embeddings,
        # With the fused rope the attention module rotates q and k itself; the model then carries no rotary module.
        position_embedding_type="none" if plan.fused_rope else "rope",
        rotary_base=plan.rotary_base,
        parallel_output=True,
    )
