"""Checkpoint conversion between Hugging Face and Megatron formats (Megatron-LM legacy, Megatron-Core per-rank
torch and torch_dist, MegaBlocks) for the Qwen families, with TP/PP/EP/ETP sharding and dense -> MoE upcycling.

    from qwen_trainer.convert import convert, ParallelLayout
    convert("Qwen2.5-7B", "hf", "ckpt/mcore-tp2-pp2", "mcore", layout=ParallelLayout(tp=2, pp=2))
"""

from .api import ConversionResult, convert, open_source, verify_conversion
from .errors import ConversionError
from .formats import FORMATS
from .dims import ModelDims, ParallelLayout, UpcycleOptions

__all__ = ["convert", "verify_conversion", "open_source", "ConversionResult", "ConversionError", "FORMATS",
           "ModelDims", "ParallelLayout", "UpcycleOptions"]
