"""Checkpoint formats. Each provides a source (read(instance) -> HF tensors) and a writer."""

FORMATS = ("hf", "megatron-lm", "mcore", "torch_dist", "megablocks")
