"""One host buffer per rank that every sharded save stages its GPU tensors into, made once and reused.

Before the files of a torch_dist save are written (in the background or not), megatron-core's writer
(`FileSystemWriterAsync.preload_tensors`) copies every GPU tensor of the rank's shard into a new host tensor
(`tensor.to("cpu", non_blocking=True)`). Those come from torch's pinned-memory cache, which rounds each block up to a
power of two and keeps it: a 21.6 GB shard took 26.8 GB of host memory (docs/performance.md). Here the writer
copies into one buffer the exact size of the rank's GPU tensors (each at a 4 KiB boundary), pinned once with
cudaHostRegister and used again by every later save of the same size.

The buffer is an anonymous shared mapping (not private memory), so the writer processes megatron-core forks read
its pages as they are: fork copies neither them nor (for pinned private pages) eagerly. Every staged tensor is a
tensor of its own over its part of the buffer (torch.frombuffer), because DCP writes a tensor with torch.save,
which writes its whole storage.

A save holds the buffer from staging until its writer's results are collected (`retrieve_write_results`, on every
rank once every rank's writers are done, in a background save's finalization too). A save that finds the buffer
still held (one whose results were never collected) stages as megatron-core does, into fresh host tensors, so a
buffer the writers of a save may still read is never overwritten. The previous checkpoint is never touched: the
staging only changes where the bytes wait before they are written into the new checkpoint's scratch folder.

`QWEN_CHECKPOINT_STAGING=fresh` keeps megatron-core's own per-save host tensors (the checkpoint benchmark's
baseline). Staging runs in the training process: AsyncSaves uses megatron's temporal (forked) async caller, not the
persistent worker, which would stage in a process of its own.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from functools import lru_cache, partial
from typing import Callable, Optional

import torch

STAGING_ENV = "QWEN_CHECKPOINT_STAGING"  # "reuse" (default) or "fresh" (megatron-core's per-save host tensors)
ALIGN = 4096
_CUDA_HOST_REGISTER_PORTABLE = 1


def _aligned(nbytes: int) -> int:
    return (nbytes + ALIGN - 1) // ALIGN * ALIGN


def _on_gpu(tensor: torch.Tensor) -> bool:
    return tensor.device.type != "cpu"


class HostBuffer:
    """The process's staging buffer: `stage` copies a save's GPU tensors into it, `release` hands it back."""

    def __init__(self) -> None:
        self._map: Optional[mmap.mmap] = None
        self._address = 0
        self.nbytes = 0
        self.pinned = False
        self.owner: Optional[int] = None  # id of the writer whose save holds the buffer
        self.allocations = 0  # how many times a buffer was made (tests, benchmark notes)

    # ---- the memory --------------------------------------------------------------------------------------------
    def _allocate(self, nbytes: int) -> None:
        self.free()
        self._map = mmap.mmap(-1, nbytes)  # anonymous and shared: forked writers see the pages, nothing is copied
        view = ctypes.c_char.from_buffer(self._map)
        self._address = ctypes.addressof(view)
        del view  # an export would keep the mapping from being closed
        self.nbytes = nbytes
        self.pinned = self._pin()
        self.allocations += 1

    def _pin(self) -> bool:
        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return False
        err = torch.cuda.cudart().cudaHostRegister(self._address, self.nbytes, _CUDA_HOST_REGISTER_PORTABLE)
        return int(err) == 0  # unpinned, copies are synchronous but the bytes are the same

    def free(self) -> None:
        """Give the memory back (not while a save holds it)."""
        if self._map is None or self.owner is not None:
            return
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self._address)
        try:
            self._map.close()
        except BufferError:  # tensors of the last save still point into it: unmapped once they are gone
            pass
        self._map, self._address, self.nbytes, self.pinned = None, 0, 0, False

    # ---- a save's use ------------------------------------------------------------------------------------------
    def host_copies(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Copies of `tensors` in the buffer, one storage each (sized for exactly these tensors)."""
        sizes = [t.numel() * t.element_size() for t in tensors]
        total = sum(_aligned(n) for n in sizes)
        if total != self.nbytes:
            self._allocate(total)
        out, offset = [], 0
        for tensor, nbytes in zip(tensors, sizes):
            if nbytes == 0:
                out.append(torch.empty(tensor.shape, dtype=tensor.dtype))
                continue
            host = torch.frombuffer(self._map, dtype=torch.uint8, count=nbytes, offset=offset)
            host = host.view(tensor.dtype).view(tensor.shape)
            host.copy_(tensor.detach(), non_blocking=self.pinned)
            out.append(host)
            offset += _aligned(nbytes)
        if self.pinned:
            torch.cuda.synchronize()
        return out

    def stage(self, write_buckets: list, owner: int, fallback: Callable[[list], list],
              select: Callable[[torch.Tensor], bool] = _on_gpu) -> list:
        """megatron-core's preload_tensors through the buffer: the write buckets with every selected tensor replaced
        by its host copy. Where the buffer is held by another save, `fallback(write_buckets)` stages instead."""
        chosen = [(b, i) for b, (_, _, (_, tensors)) in enumerate(write_buckets)
                  for i, (_, t) in enumerate(tensors) if select(t)]
        if not chosen:
            return fallback(write_buckets)
        if self.owner is not None and self.owner != owner:
            return fallback(write_buckets)
        self.owner = owner
        try:
            copies = self.host_copies([write_buckets[b][2][1][i][1] for b, i in chosen])
        except BaseException:
            self.owner = None
            raise
        staged = [(name, key, (list(data), list(tensors))) for name, key, (data, tensors) in write_buckets]
        for (b, i), host in zip(chosen, copies):
            item = staged[b][2][1][i][0]
            staged[b][2][1][i] = (item, host)
        return staged

    def release(self, owner: int) -> None:
        if self.owner == owner:
            self.owner = None


HOST_BUFFER = HostBuffer()


def enabled() -> bool:
    return os.environ.get(STAGING_ENV, "reuse").strip().lower() != "fresh"


@lru_cache(maxsize=None)
def writer_class():
    """megatron-core's torch_dist writer, staging through HOST_BUFFER."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    class StagedFileSystemWriter(FileSystemWriterAsync):
        def get_save_function_and_args(self):
            save_fn, preload_fn, args = super().get_save_function_and_args()
            if preload_fn is None:
                return save_fn, preload_fn, args
            fallback = partial(FileSystemWriterAsync.preload_tensors, non_blocking=True)
            return save_fn, partial(HOST_BUFFER.stage, self.write_buckets, id(self), fallback), args

        def retrieve_write_results(self):
            # called on every rank once every rank's writers are done: the buffer may be used again
            try:
                return super().retrieve_write_results()
            finally:
                HOST_BUFFER.release(id(self))

    return StagedFileSystemWriter


def install() -> Callable[[], None]:
    """Make megatron-core's torch_dist save strategy write through the staged writer; returns the undo."""
    from qwen_trainer.engines.megatron import patches

    return patches.replace("megatron.core.dist_checkpointing.strategies.torch",
                           {"FileSystemWriterAsync": writer_class()})


__all__ = ["HOST_BUFFER", "HostBuffer", "STAGING_ENV", "enabled", "install", "writer_class"]
