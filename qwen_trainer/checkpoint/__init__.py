"""Megatron checkpoint directory layout, atomic writes and resume helpers."""
