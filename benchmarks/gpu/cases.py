"""Benchmark cases and the engine variants measured in them (data only).

Each case is one model shape at one GPU count. The Hugging Face baseline runs the same shape with transformers'
best plain settings (bf16 weights, SDPA attention, fused AdamW, its default grouped-GEMM experts; torch DDP on
several GPUs, FSDP2 where a replica does not fit; hf_parallel.py), with the same micro-batch and global batch. `variants` are megatron engine runs: "best" plus, for
the ablation cases, one run per lever turned off.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

# name -> EngineOptions changes, relative to the defaults (the fastest exact choice among what has run on a GPU;
# levers not yet measured there are off by default and turned on by their variants)
VARIANTS: dict[str, dict] = {
    "best": {},
    "attn-local": {"attention": "local", "fused_rope": False},  # megatron's unfused DotProductAttention + its rope
    "rope-unfused": {"fused_rope": False},  # SDPA, rope by megatron's unfused torch ops
    "qkv-split-torch": {"fused_qkv_rope": False},  # megatron's QKV split + the compiled rope kernel per tensor
    "rmsnorm-torch": {"fused_rmsnorm": False},  # torch.nn.RMSNorm (the local spec's default)
    "swiglu-unfused": {"fused_swiglu": False},
    "swiglu-compiled": {"triton_swiglu": False},  # megatron's compiled SwiGLU instead of the Triton kernels
    "grad-add-torch": {"triton_grad_accumulation": False},  # torch's mixed-dtype add into the fp32 buffer
    "expert-wgrad-fused": {"expert_wgrad_into_buffer": True},  # experts' weight gradients into the fp32 buffer
    "grad-norm-host": {"grad_norm_on_device": False},  # megatron's read of the norm before the optimizer step
    "readback-next-step": {"read_back_next_step": True},  # each step read back after the next one is launched
    "no-whole-step-graph": {"whole_step_graph": False},  # each kernel of the forward and backward launched by the host
    "clip-pass": {"clip_in_adam": False},  # megatron's clipping pass instead of fused AdamW's gradient divisor
    "permute-scatter": {"gather_permute": False},  # token combine and permute's backward by atomic scatter-adds
    "embedding-grad-bf16": {"embedding_grad_into_buffer": False},  # vocabulary-sized bf16 gradient, then an add
    # the experts' weight gradients of all micro-batches by one grouped GEMM in the last backward, written into
    # never-zeroed buffer ranges; then the same with the buffer zeroed and the product added
    "expert-wgrad-deferred": {"defer_expert_wgrad": True},
    "expert-wgrad-per-micro-batch": {"defer_expert_wgrad": False},  # the default before 2026-12-07
    "expert-grad-added": {"defer_expert_wgrad": True, "expert_grad_overwrite": False},
    # torch's fused AdamW and megatron's copy into the bf16 weights (the default before 2026-12-07 09:20 UTC)
    "adamw-torch-copy": {"adamw_writes_model_params": False},
    "moe-step-before-2026-12-07": {"defer_expert_wgrad": False, "adamw_writes_model_params": False},
    "moe-levers-off": {"clip_in_adam": False, "gather_permute": False, "embedding_grad_into_buffer": False,
                       "defer_expert_wgrad": False, "adamw_writes_model_params": False, "whole_step_graph": False},
    "ce-unchunked": {"chunked_cross_entropy": False},  # megatron's output layer + fused vocab-parallel CE
    "ce-eager": {"fused_cross_entropy": False},  # chunked CE, each chunk's softmax and gradient as torch ops
    "ce-grad-bf16": {"output_grad_into_buffer": False},  # output weight gradient in bf16, then scaled and added
    "ce-chunk-4096": {"cross_entropy_chunk_tokens": 4096},  # half the passes over the fp32 output-weight gradient
    "sdpa-flash": {"sdpa_backend": "flash"},  # SDPA pinned to torch's flash kernels instead of cuDNN
    "no-wgrad-fusion": {"grad_accum_fusion": False},
    "adam-foreach": {"fused_adam": False, "foreach_grad_norm": False},  # megatron's own Apex-less fallbacks
    "recompute-selective": {"recompute": "selective"},
    "recompute-full": {"recompute": "full"},
    "experts-sequential": {"experts": "sequential"},
    "no-overlap": {"overlap_grad_reduce": False},
    "dispatcher-allgather": {"extra_config": {"moe_token_dispatcher_type": "allgather"}, "local_dispatch": False},
    "cuda-graphs": {"cuda_graphs": True},  # each layer's forward and backward replayed as CUDA graphs
    "graphs-moe-layer": {"cuda_graphs": True, "graph_moe_experts": True},  # MoE layers captured whole, experts too
    "dispatch-megatron": {"local_dispatch": False},  # megatron's alltoall dispatcher (host copies, syncs)
    "stock": {"attention": "local", "fused_rope": False, "fused_rmsnorm": False, "fused_swiglu": False,
              "chunked_cross_entropy": False, "grad_accum_fusion": False, "fused_adam": False,
              "foreach_grad_norm": False, "recompute": "selective", "whole_step_graph": False},
}

# name -> keyword arguments of transformers' from_config for the Hugging Face runs. "baseline" is what a user
# gets (transformers' defaults: grouped-GEMM experts); the others are reference points, never the "vs HF" base.
HF_VARIANTS: dict[str, dict] = {
    "baseline": {},
    "experts-eager": {"experts_implementation": "eager"},  # transformers' per-expert loop (its pre-5.0 MoE path)
}

DENSE_ABLATIONS = ["best", "attn-local", "sdpa-flash", "qkv-split-torch", "rope-unfused", "rmsnorm-torch",
                   "swiglu-unfused", "swiglu-compiled", "grad-add-torch", "ce-unchunked", "ce-eager",
                   "no-wgrad-fusion", "adam-foreach", "recompute-selective", "recompute-full"]


@dataclass(frozen=True)
class Case:
    name: str
    family: str
    size: str
    gpus: int
    seq: int
    micro_batch: int
    global_batch: int
    variants: tuple[str, ...] = ("best",)
    architecture: dict = field(default_factory=dict)
    parallelism: dict = field(default_factory=dict)
    baseline: str = "auto"
    hf_variants: tuple[str, ...] = ("baseline",)
    """The transformers run: auto (one GPU, or DDP on several), ddp, fsdp (FSDP2, for models whose replica does
    not fit a card) or none."""
    note: str = ""
    recompute: str = "none"  # the engine's default recompute for this case (memory permitting)

    def spec_args(self) -> dict:
        return dict(architecture=self.architecture or None, parallelism=self.parallelism or None,
                    training={"seqLength": self.seq, "microBatchSize": self.micro_batch,
                              "globalBatchSize": self.global_batch,
                              "activationCheckpointing": {"mode": self.recompute}})


CASES: dict[str, Case] = {c.name: c for c in [
    Case("qwen2.5-0.5b", "qwen2.5", "0.5B", gpus=1, seq=4096, micro_batch=4, global_batch=16,
         variants=("best", "cuda-graphs", "no-whole-step-graph")),
    Case("qwen2.5-1.5b", "qwen2.5", "1.5B", gpus=1, seq=4096, micro_batch=2, global_batch=8,
         variants=tuple(DENSE_ABLATIONS) + ("stock",)),
    Case("qwen1.5-moe-a2.7b-l3", "qwen1.5", "A2.7B", gpus=1, seq=4096, micro_batch=1, global_batch=4,
         variants=("best", "no-whole-step-graph", "moe-levers-off", "expert-wgrad-per-micro-batch", "expert-grad-added", "adamw-torch-copy",
                   "clip-pass",
                   "permute-scatter", "embedding-grad-bf16", "expert-wgrad-fused", "cuda-graphs", "graphs-moe-layer",
                   "ce-grad-bf16", "dispatch-megatron", "grad-add-torch", "swiglu-compiled", "experts-sequential",
                   "dispatcher-allgather"),
         hf_variants=("baseline", "experts-eager"), architecture={"numLayers": 3},
         note="3 of 24 layers: 14.3B parameters with fp32 gradients and Adam state (18 bytes each) do not fit one "
              "80 GB card; all layers are identical, so per-token cost scales with the layer count"),
    Case("qwen3-30b-a3b-l3", "qwen3", "A3B", gpus=1, seq=4096, micro_batch=1, global_batch=4,
         variants=("best", "no-whole-step-graph", "moe-levers-off", "expert-wgrad-per-micro-batch", "expert-grad-added", "adamw-torch-copy",
                   "clip-pass",
                   "permute-scatter", "embedding-grad-bf16", "expert-wgrad-fused", "cuda-graphs", "graphs-moe-layer"),
         architecture={"numLayers": 3},
         note="3 of 48 layers of Qwen3-30B-A3B (128 experts, top-8) on one card"),
    # the two MoE shapes with four times the tokens a step (65,536): the optimizer's fixed ~25 ms (AdamW over 2.5 B
    # fp32 master weights and moments, memory-bound) spread over more tokens, as a real run's global batch of
    # hundreds of sequences spreads it further; reported beside the 16,384-token cases above, never instead of them
    Case("qwen1.5-moe-a2.7b-l3-gb16", "qwen1.5", "A2.7B", gpus=1, seq=4096, micro_batch=1, global_batch=16,
         variants=("best", "no-whole-step-graph"), architecture={"numLayers": 3},
         note="the A2.7B 3-layer shape with global batch 16 (65,536 tokens a step)"),
    Case("qwen3-30b-a3b-l3-gb16", "qwen3", "A3B", gpus=1, seq=4096, micro_batch=1, global_batch=16,
         variants=("best", "no-whole-step-graph"), architecture={"numLayers": 3},
         note="the Qwen3-30B-A3B 3-layer shape with global batch 16 (65,536 tokens a step)"),
    Case("qwen2.5-1.5b-dp2", "qwen2.5", "1.5B", gpus=2, seq=4096, micro_batch=2, global_batch=16,
         variants=("best", "no-overlap")),
    # small shapes that run every code path in a minute or two (checking a machine before the real runs)
    Case("smoke-dense", "qwen2.5", "0.5B", gpus=1, seq=1024, micro_batch=2, global_batch=4,
         variants=tuple(DENSE_ABLATIONS) + ("stock",), architecture={"numLayers": 2}),
    Case("smoke-moe", "qwen1.5", "A2.7B", gpus=1, seq=1024, micro_batch=1, global_batch=2,
         variants=("best", "dispatch-megatron", "grad-add-torch", "experts-sequential"), architecture={"numLayers": 1}),
    Case("smoke-dense-dp2", "qwen2.5", "0.5B", gpus=2, seq=1024, micro_batch=2, global_batch=8,
         variants=("best", "no-overlap"), architecture={"numLayers": 2}),
    # four-GPU cases: need a 4-GPU machine
    Case("qwen2.5-1.5b-dp4", "qwen2.5", "1.5B", gpus=4, seq=4096, micro_batch=2, global_batch=32),
    Case("qwen2.5-7b-dp4", "qwen2.5", "7B", gpus=4, seq=4096, micro_batch=1, global_batch=16,
         note="pure data parallel with the distributed optimizer (ZeRO-1): bf16 weights and fp32 gradients "
              "replicated, fp32 master weights and Adam state sharded over the four ranks"),
    Case("qwen2.5-7b-tp2-dp2", "qwen2.5", "7B", gpus=4, seq=4096, micro_batch=1, global_batch=16,
         parallelism={"tensor": 2, "sequenceParallel": True}, recompute="selective"),
    Case("qwen1.5-moe-a2.7b-l3-dp4", "qwen1.5", "A2.7B", gpus=4, seq=4096, micro_batch=1, global_batch=16,
         architecture={"numLayers": 3}, variants=("best", "dispatch-megatron"),
         note="the one-GPU MoE shape data-parallel on four cards, against transformers under torch DDP"),
    Case("qwen1.5-moe-a2.7b-ep4", "qwen1.5", "A2.7B", gpus=4, seq=4096, micro_batch=1, global_batch=8,
         parallelism={"expert": 4}, architecture={"numLayers": 12}, baseline="fsdp",
         note="12 of 24 layers to fit four 80 GB cards with fp32 optimizer state; transformers under FSDP2"),
    Case("qwen3-30b-a3b-ep4-l12", "qwen3", "A3B", gpus=4, seq=4096, micro_batch=1, global_batch=8,
         parallelism={"expert": 4}, architecture={"numLayers": 12}, baseline="fsdp",
         note="Qwen3-30B-A3B shape with 12 of 48 layers, EP 4; transformers under FSDP2"),

    # four-GPU layouts at toy sizes: every parallel code path in a minute
    Case("smoke-dense-dp4", "qwen2.5", "0.5B", gpus=4, seq=1024, micro_batch=1, global_batch=8,
         architecture={"numLayers": 2}, baseline="none"),
    Case("smoke-dense-tp2dp2", "qwen2.5", "0.5B", gpus=4, seq=1024, micro_batch=1, global_batch=8,
         parallelism={"tensor": 2, "sequenceParallel": True}, architecture={"numLayers": 2}, baseline="none",
         variants=("best", "no-overlap", "no-wgrad-fusion")),
    Case("smoke-moe-ep4", "qwen1.5", "A2.7B", gpus=4, seq=1024, micro_batch=1, global_batch=8,
         parallelism={"expert": 4}, architecture={"numLayers": 2}, baseline="none",
         variants=("best", "no-overlap")),
    Case("smoke-moe-ep2dp2", "qwen1.5", "A2.7B", gpus=4, seq=1024, micro_batch=1, global_batch=8,
         parallelism={"expert": 2}, architecture={"numLayers": 2}, baseline="none"),
]}

ONE_GPU = [n for n, c in CASES.items() if c.gpus == 1 and not n.startswith("smoke")]
TWO_GPU = [n for n, c in CASES.items() if c.gpus == 2 and not n.startswith("smoke")]
FOUR_GPU = [n for n, c in CASES.items() if c.gpus == 4]


def variant_options(name: str, base: Optional[dict] = None) -> dict:
    out = dict(base or {})
    out.update(VARIANTS[name])
    return out
