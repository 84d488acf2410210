"""Stream `torch.save`-compatible files one tensor at a time, and read them back lazily.

torch.save pickles the whole object first and needs every tensor in memory. A torch checkpoint is a zip archive
whose `data.pkl` refers to tensor bytes stored as separate `data/<key>` records, and the zip's central directory
makes record order irrelevant; so we write each tensor's record as soon as it is produced and the pickle last.
Peak memory is then one tensor, not one rank's shard. Files load with plain `torch.load` (mmap or not).

The reader unpickles only `data.pkl`, turning each tensor into a `LazyTensor` that knows its record offset and
reads its bytes with a plain file read (no mmap, so resident memory stays bounded too).

Writing goes through fileio.HashingFile (sha256 and file writes in background threads); tensors are handed to the
zip writer by address, so a contiguous view is written as its own bytes without a copy.
"""

from __future__ import annotations

import collections
import io
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ConversionError
from .fileio import HashingFile

_ALIGN = 64


@dataclass(frozen=True)
class StoredTensor:
    """Placeholder for a tensor already written into the archive; pickles as that tensor."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]


class _StorageRef:
    def __init__(self, stored: StoredTensor):
        self.stored = stored


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= n
    return tuple(reversed(stride))


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            st = obj.stored
            storage_type = getattr(torch, torch.storage._dtype_to_storage_type_map()[st.dtype])
            return ("storage", storage_type, st.key, "cpu", _numel(st.shape))
        return None

    def reducer_override(self, obj):
        if isinstance(obj, StoredTensor):
            args = (_StorageRef(obj), 0, obj.shape, _contiguous_stride(obj.shape), False, collections.OrderedDict())
            return torch._utils._rebuild_tensor_v2, args
        return NotImplemented


class StreamingTorchWriter:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = HashingFile(self.path)
        # No zip CRC32: the sha256 in the manifest already covers every byte, and computing both costs time.
        self._zip = torch._C.PyTorchFileWriter(self._file, False, _ALIGN)
        self._count = 0
        self.bytes_written = 0
        self.sha256 = ""

    def add(self, tensor: torch.Tensor) -> StoredTensor:
        """Write the tensor's bytes now (they are copied out before this returns) and return its placeholder."""
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()  # a no-op when it already is; a view into a bigger buffer is written as its own bytes
        nbytes = t.numel() * t.element_size()
        key = str(self._count)
        self._count += 1
        self._zip.write_record(f"data/{key}", t.data_ptr() if nbytes else b"", nbytes)
        self.bytes_written += nbytes
        return StoredTensor(key, t.dtype, tuple(t.shape))

    def finish(self, obj: Any) -> None:
        buf = io.BytesIO()
        _Pickler(buf, protocol=2).dump(obj)
        data = buf.getvalue()
        self._zip.write_record("data.pkl", data, len(data))
        self._zip.write_record(".format_version", "1", 1)
        self._zip.write_record(".storage_alignment", str(_ALIGN), len(str(_ALIGN)))
        self._zip.write_record("byteorder", "little", len("little"))
        self._zip.write_end_of_file()
        del self._zip
        self.sha256 = self._file.close()


class LazyTensor:
    """A tensor inside a torch zip file, read only when `load()` is called."""

    def __init__(self, owner: "LazyTorchFile", key: str, dtype: torch.dtype, numel: int, offset: int,
                 shape: tuple[int, ...], stride: tuple[int, ...]):
        self._owner, self._key, self.dtype, self._numel = owner, key, dtype, numel
        self._offset, self.shape, self._stride = offset, tuple(shape), tuple(stride)

    def meta(self) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device="meta")

    def load(self) -> torch.Tensor:
        flat = self._owner.read_storage(self._key, self.dtype, self._numel)
        if self._offset == 0 and tuple(self._stride) == _contiguous_stride(self.shape) and flat.numel() == _numel(
                self.shape):
            return flat.view(self.shape)
        return flat.as_strided(self.shape, self._stride, self._offset).clone()


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, owner: "LazyTorchFile"):
        super().__init__(io.BytesIO(data))
        self._owner = owner

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            owner = self._owner

            def rebuild(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
                key, dtype, numel = storage
                return LazyTensor(owner, key, dtype, numel, offset, tuple(size), tuple(stride))

            return rebuild
        if module == "torch._utils" and name == "_rebuild_parameter":
            return lambda data, requires_grad=False, hooks=None: data
        return super().find_class(module, name)

    def persistent_load(self, pid):
        _typename, storage_type, key, _location, numel = pid
        with warnings.catch_warnings():  # the legacy typed-storage classes warn on attribute access
            warnings.simplefilter("ignore")
            dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        return key, dtype, numel


class LazyTorchFile:
    """Open a torch checkpoint; `.obj` is the unpickled object with LazyTensor leaves."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._zip = torch._C.PyTorchFileReader(str(self.path))
        self._fh = open(self.path, "rb", buffering=0)
        self.obj = _Unpickler(self._zip.get_record("data.pkl"), self).load()

    def read_storage(self, key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = numel * itemsize
        buf = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            offset = self._zip.get_record_offset(f"data/{key}")
            self._fh.seek(offset)
            view = memoryview(buf.numpy())
            got = 0
            while got < nbytes:
                n = self._fh.readinto(view[got:])
                if not n:
                    raise ConversionError(f"{self.path}: record data/{key} is truncated")
                got += n
        return buf.view(dtype)

    def close(self) -> None:
        self._fh.close()
