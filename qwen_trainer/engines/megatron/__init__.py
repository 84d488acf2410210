"""The megatron engine: trains on CUDA with the megatron-core pip package (no Megatron-LM repository).

    engine.py          MegatronEngine, the qwen_trainer.engines.base.Engine that `qwen_trainer run` and the benchmarks drive
    build.py           parallel groups, GPTModel chunks, DDP, optimizer
    config.py          the spec -> megatron TransformerConfig and layer specs, and the engine's option switches
    loss.py            chunked output-layer cross-entropy and the step's loss normalisation
    state.py           what a checkpoint holds: sharded state dicts, or weights and optimizer gathered on rank 0
    weights.py         Hugging Face tensors <-> the built model's tensors
    layout.py          this process's place in megatron's rank order
    kernels.py, triton_kernels.py, dispatch.py, patches.py   the engine's faster modules and megatron-core patches
    megablocks_mlp.py  the megablocks backend's MoE layer
    testing.py         small specs and random batches for tests and benchmarks
"""

from .config import Capabilities, EngineOptions
from .engine import MegatronEngine, create_engine, data_parallel_info

__all__ = ["MegatronEngine", "EngineOptions", "Capabilities", "create_engine", "data_parallel_info"]
