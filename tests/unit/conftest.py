"""Shared fixtures for the unit tests."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="module")
def megatron_world():
    """A one-rank gloo process group with megatron-core's parallel state, for building models on CPU."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from qwen_trainer.distenv import _free_port

    created = False
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(_free_port())
        dist.init_process_group("gloo", rank=0, world_size=1)
        created = True
    parallel_state.initialize_model_parallel()
    yield
    parallel_state.destroy_model_parallel()
    if created:
        dist.destroy_process_group()
