"""The step's micro-batches onto the GPU in one asynchronous copy, before the first forward.

A host-to-device copy from pageable memory waits for the stream. Each micro-batch's forward used to copy its
tokens, targets and positions that way, so at every micro-batch boundary the host stood still until the GPU had
finished the previous backward, and the GPU then sat idle while the host launched the next forward. Here the
step's tensors are packed into one pinned host buffer (kept between steps, grown when needed) and sent in one
non-blocking copy; each micro-batch's loss-token count is taken on the host first, so nothing in the step reads a
device value back before the gradient norm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

FIELDS = ("tokens", "targets", "position_ids")


@dataclass
class StagedMicroBatch:
    """One micro-batch's tensors where the model runs, with its loss-token count known on the host."""

    tokens: torch.Tensor
    targets: torch.Tensor
    position_ids: torch.Tensor
    loss_tokens: int


class BatchUploader:
    """Packs a step's micro-batches into one host buffer and copies it to the device at once. The host buffer is
    pinned where the device is a GPU; before it is refilled, the host waits for the copy that last read it (long
    done by then: the previous step read its loss back)."""

    def __init__(self) -> None:
        self._host: Optional[torch.Tensor] = None
        self._copied: Optional[torch.cuda.Event] = None

    def _host_buffer(self, numel: int, pinned: bool) -> torch.Tensor:
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None
        if self._host is None or self._host.numel() < numel or self._host.is_pinned() != pinned:
            self._host = torch.empty(max(numel, 1), dtype=torch.int64, pin_memory=pinned)
        return self._host[:numel]

    def upload(self, micro_batches: Sequence, device) -> list[StagedMicroBatch]:
        device = torch.device(device)
        sizes = [[getattr(mb, f).numel() for f in FIELDS] for mb in micro_batches]
        host = self._host_buffer(sum(map(sum, sizes)), pinned=device.type == "cuda")
        offset = 0
        for mb, numels in zip(micro_batches, sizes):
            for f, n in zip(FIELDS, numels):
                host[offset:offset + n].copy_(getattr(mb, f).reshape(-1))
                offset += n
        staged = host.to(device, non_blocking=True) if device.type != "cpu" else host.clone()
        if device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()
        out, offset = [], 0
        for mb, numels in zip(micro_batches, sizes):
            views = {}
            for f, n in zip(FIELDS, numels):
                views[f] = staged[offset:offset + n].view(getattr(mb, f).shape)
                offset += n
            out.append(StagedMicroBatch(loss_tokens=int(mb.loss_tokens), **views))
        return out
