"""Sharded training checkpoints: every rank writes and reads its own part, through megatron-core's
dist_checkpointing (the `torch_dist` layout Megatron-LM writes with `--ckpt-format torch_dist`).

An engine that keeps its model spread over processes hands out a *sharded state dict* (megatron's ShardedTensors:
each names a global tensor and the region this rank holds, with one replica marked as the one to write). Saving
goes through the fully parallel wrapper, which spreads the writing of replicated tensors over the data-parallel
ranks, so no process holds more than its own shard plus the writer's buffers, and the save runs on every rank at
once. Loading asks for exactly the regions the current model needs, so a checkpoint's weights saved at one
TP/PP/EP/DP layout load at another; optimizer state too, except the distributed optimizer's across a changed
TP/PP/EP split (see SHARDED_STATE_METADATA).

The caller (qwen_trainer.checkpoint.store) owns atomicity: every rank writes into one scratch folder, and the folder
is renamed into place only after all ranks finished.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

METADATA = "metadata.json"  # written by dist_checkpointing.save on rank 0, with the format and its version
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index of every shard

# Metadata for the sharded state dicts. The plain mixed-precision optimizer's states are cut like their parameters,
# so they load at any layout. The distributed optimizer's are saved 'dp_reshardable' by default: every rank writes its
# own flat range with no gathering, loadable at another data-parallel size but not at another TP/PP/EP split.
# checkpoint.reshardableOptimizer asks for megatron's 'fully_reshardable' instead (engines/megatron/state.py), which
# gathers each model-parallel group's optimizer state on its first data-parallel rank and loads at any layout.
SHARDED_STATE_METADATA = {
    "distrib_optim_sharding_type": "dp_reshardable",
    "singleton_local_shards": False,
    "chained_optim_avoid_prefix": True,
}
# Writer processes per rank (DCP's thread_count: each writes its own file). Megatron-LM's default, 2, wrote a 21.6 GB
# shard at 70% of one H100 machine's disk rate, 8 at 100% (docs/checkpoints.md); the default is 8 where each
# rank's share of the node's cores allows, never below 2. QWEN_CHECKPOINT_WRITERS sets it per cluster.
WRITERS_ENV = "QWEN_CHECKPOINT_WRITERS"


def writers_per_rank() -> int:
    if os.environ.get(WRITERS_ENV):
        return max(int(os.environ[WRITERS_ENV]), 1)
    ranks_on_node = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    return max(2, min(8, (os.cpu_count() or 2) // ranks_on_node))

# layout fields whose change the distributed optimizer's saved state cannot follow
MODEL_PARALLEL_FIELDS = ("tensor", "pipeline", "context", "expert", "virtual_pipeline")


def is_sharded(iter_dir: Path) -> bool:
    """True for an iteration folder in the torch_dist layout."""
    return (Path(iter_dir) / METADATA).is_file() and (Path(iter_dir) / DCP_METADATA).is_file()


def _data_parallel_group():
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_data_parallel_group(with_context_parallel=True)
    return None


def save(sharded_state_dict: dict, folder: Path, async_save: bool = False):
    """Collective: every rank writes its shards of `sharded_state_dict` into `folder` (which exists).

    DCP's file writer fsyncs every file it writes; rank 0 also writes common.pt (the non-tensor state) and
    metadata.json. The GPU tensors are copied into this rank's staging buffer first (qwen_trainer.checkpoint.staging:
    one host buffer the size of the shard, made by the first save, reused by the next). With `async_save` the
    shards are not written yet: the returned request copies them off the GPU when scheduled (AsyncSaves.schedule)
    and writes them from a background process."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    from . import staging

    strategy = TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=writers_per_rank())
    group = _data_parallel_group()
    if group is not None:
        strategy = FullyParallelSaveStrategyWrapper(strategy, group, do_cache_distribution=False)
    # the writer is made inside the save: megatron-core's, staging through this rank's one reused host buffer
    restore = staging.install() if staging.enabled() else None
    try:
        return dist_checkpointing.save(sharded_state_dict, str(folder), strategy, validate_access_integrity=False,
                                       async_sharded_save=async_save)
    finally:
        if restore is not None:
            restore()


class AsyncSaves:
    """Checkpoints written in the background, one at a time (megatron-core's AsyncCallsQueue).

    `schedule` stages the request's tensors into host memory (the only part training waits for) and forks the
    writer; `poll` (every step, every rank) runs the request's finalizers once every rank's writer is done, which
    is where the checkpoint is committed; `wait` blocks until then (before the next save and at the end)."""

    def __init__(self):
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self._queue = AsyncCallsQueue(persistent=False)

    def schedule(self, request, finalize: Callable[[], None]) -> None:
        request.add_finalize_fn(finalize)  # after megatron's own (metadata.json)
        self._queue.schedule_async_request(request)

    def poll(self) -> None:
        if self._queue.get_num_unfinalized_calls():
            self._queue.maybe_finalize_async_calls(blocking=False)

    def wait(self) -> None:
        if self._queue.get_num_unfinalized_calls():
            self._queue.maybe_finalize_async_calls(blocking=True)

    @property
    def pending(self) -> int:
        return self._queue.get_num_unfinalized_calls()


def load(sharded_state_dict: dict, folder: Path) -> dict:
    """Collective: the regions `sharded_state_dict` asks for, read from `folder` (any layout it was saved with)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistLoadShardedStrategy

    strategy = TorchDistLoadShardedStrategy()
    group = _data_parallel_group()
    if group is not None:
        strategy = FullyParallelLoadStrategyWrapper(strategy, group)
    return dist_checkpointing.load(sharded_state_dict, str(folder), strategy)


def saved_keys(folder: Path) -> set[str]:
    """Names of the global tensors in a torch_dist folder (read from DCP's index, no tensor data)."""
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(folder)).read_metadata()
    return set(md.state_dict_metadata)


__all__ = ["AsyncSaves", "is_sharded", "save", "load", "saved_keys", "SHARDED_STATE_METADATA", "MODEL_PARALLEL_FIELDS",
           "METADATA"]
