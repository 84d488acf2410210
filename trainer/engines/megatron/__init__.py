"""The megatron engine: trains on CUDA with the megatron-core pip package (no Megatron-LM repository)."""

from .engine import Capabilities, EngineOptions, MegatronEngine, StepResult, create_engine, data_parallel_info

__all__ = ["MegatronEngine", "EngineOptions", "Capabilities", "StepResult", "create_engine", "data_parallel_info"]
