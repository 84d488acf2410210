"""Read and write .safetensors one tensor at a time.

The format is 8 bytes of little-endian header length, a JSON header (dtype, shape, byte range per tensor) and the
raw bytes. Reading maps each tensor on its own (fileio.map_tensor) rather than the whole file as safe_open does:
pages of a whole-file mapping stay resident (and count against the process) for as long as the file is open, while a
per-tensor mapping goes away with its tensor, so memory stays at the tensors in flight, and the bytes are never
copied out of the page cache. Writing needs every shape up front (the header comes first), which the engine gets
from a cheap metadata pass.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterable

import torch

from .errors import ConversionError
from .fileio import file_size, map_tensor, populate
from .torchfile import HashingFile

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsFile:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            (n,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
            header = json.loads(os.pread(self._fd, n, 8)) if n < file_size(self._fd) else None
            if not isinstance(header, dict):
                raise ValueError("no header")
        except (struct.error, ValueError, UnicodeDecodeError) as err:
            os.close(self._fd)
            raise ConversionError(f"{self.path}: not a safetensors file (unreadable header: {err})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries = header
        self._base = 8 + n
        self._size = file_size(self._fd)

    def keys(self) -> list[str]:
        return list(self.entries)

    def meta(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        return torch.empty(e["shape"], dtype=DTYPES[e["dtype"]], device="meta")

    def get(self, name: str) -> torch.Tensor:
        """The tensor's bytes, mapped and already read in (call it from a read-ahead thread to overlap the disk)."""
        e = self.entries[name]
        start, end = e["data_offsets"]
        if not 0 <= start <= end or self._base + end > self._size:
            raise ConversionError(f"{self.path}: tensor {name} is truncated")
        # The file may have been cut short since it was opened (overwritten while converting): check again, and
        # let the page prefetch report pages that vanished after the mapping was made (instead of a SIGBUS).
        buf = None
        if self._base + end <= file_size(self._fd):
            buf = map_tensor(self._fd, self._base + start, end - start)
        if buf is None or not populate(buf):
            raise ConversionError(f"{self.path}: tensor {name} is truncated; the file changed while it was being read")
        return buf.view(DTYPES[e["dtype"]]).reshape(e["shape"])

    def close(self) -> None:
        os.close(self._fd)


class SafetensorsWriter:
    """Writes tensors in the order declared by `entries` [(name, dtype, shape)]."""

    def __init__(self, path: Path, entries: Iterable[tuple[str, torch.dtype, tuple[int, ...]]]):
        header: dict = {"__metadata__": {"format": "pt"}}
        self._order: list[str] = []
        self._sizes: dict[str, int] = {}
        offset = 0
        for name, dtype, shape in entries:
            n = torch.empty((), dtype=dtype).element_size()
            for s in shape:
                n *= s
            header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            self._order.append(name)
            self._sizes[name] = n
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format allows trailing spaces; keep tensor data 8-byte aligned
        self.path = Path(path)
        self._f = HashingFile(self.path)
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)
        self.sha256 = ""
        self._next = 0
        self.bytes_written = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self._order[self._next]
        if name != expected:
            raise RuntimeError(f"safetensors writer: got {name}, expected {expected}")
        t = tensor.detach().contiguous()
        data = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        if data.numel() != self._sizes[name]:
            raise RuntimeError(f"safetensors writer: {name} has {data.numel()} bytes, header says {self._sizes[name]}")
        self._f.write(memoryview(data.numpy()))
        self._next += 1
        self.bytes_written += data.numel()

    def close(self) -> None:
        if self._next != len(self._order):
            raise RuntimeError(f"{self.path}: {len(self._order) - self._next} tensors were never written")
        self.sha256 = self._f.close()
