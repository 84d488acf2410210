"""Low-level file helpers for the streaming engine: mapped tensor reads, page prefetch and early write-back.

Source tensors are memory-mapped one at a time (private, copy-on-write mappings), so their bytes go from the page
cache to the output without an intermediate copy into freshly faulted anonymous memory. Each mapping is released
with the last tensor that refers to it, so resident memory stays at the tensors in flight, as with plain reads.

`populate` faults a mapping's pages in with one madvise(MADV_POPULATE_READ) call (Linux 5.14+), which reads from
the disk as needed with the GIL released: the read-ahead thread uses it to load the next tensors while the main
thread writes the current one. Older kernels fall back to MADV_WILLNEED (asynchronous read-ahead only).

`HashingFile` writes a file sequentially and returns its sha256: the caller's bytes are copied into a few reused
buffers that two background threads hash and write, so the caller goes on fusing and reading meanwhile. (O_DIRECT
writes from those buffers were tried: half the CPU time, but no faster and often slower on a disk that does better
with the kernel's deeper write-back queue.)

`FileArena` keeps tensors in a scratch file (one shared mapping per tensor) for writers that need a whole model at
once, so that the kernel can write those pages back and drop them under memory pressure; `available_memory` says
how much memory is left (cgroup limit included) to decide when that is needed.

`start_writeback` asks the kernel to begin writing a file range now (sync_file_range(SYNC_FILE_RANGE_WRITE)),
without waiting for it. Without it, the kernel starts writing dirty pages only once they exceed
vm.dirty_background_ratio of memory or grow 30 s old, so the disk would sit idle while the first gigabytes of the
output pile up in the page cache and the final fsync would then wait for all of them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import mmap
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

MADV_WILLNEED = 3
MADV_POPULATE_READ = 22
SYNC_FILE_RANGE_WRITE = 2

_libc = None
_populate_ok = True
_writeback_ok = True


def _c():
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)  # ctypes calls drop the GIL
            lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            lib.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            _libc = lib
        except (OSError, AttributeError):
            _libc = False
    return _libc


def map_tensor(fd: int, offset: int, nbytes: int) -> torch.Tensor:
    """A uint8 tensor over bytes [offset, offset + nbytes) of an open file, backed by a private mapping that lives
    as long as the tensor (or any view of it). The caller checks that the range lies inside the file: touching a
    mapped page beyond the end of a file raises SIGBUS."""
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    lo = offset - offset % mmap.ALLOCATIONGRANULARITY
    m = mmap.mmap(fd, offset + nbytes - lo, access=mmap.ACCESS_COPY, offset=lo)
    return torch.frombuffer(m, dtype=torch.uint8, count=nbytes, offset=offset - lo)


def populate(t: torch.Tensor) -> bool:
    """Fault in (reading from disk as needed) the pages under a mapped tensor, with the GIL released. False when
    part of the range is no longer backed by the file (it was truncated after the mapping was made): touching
    those pages would raise SIGBUS, so the caller reports the file as truncated instead."""
    global _populate_ok
    nbytes = t.numel() * t.element_size()
    lib = _c()
    if not nbytes or not lib:
        return True
    addr = t.data_ptr()
    start = addr - addr % mmap.PAGESIZE
    length = addr + nbytes - start
    if _populate_ok:
        if lib.madvise(start, length, MADV_POPULATE_READ) == 0:
            return True
        if ctypes.get_errno() == errno.EFAULT:
            return False
        _populate_ok = False  # EINVAL: kernel before 5.14
    lib.madvise(start, length, MADV_WILLNEED)
    return True


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start writing [offset, offset + nbytes) of a file to disk without waiting (a no-op where unsupported)."""
    global _writeback_ok
    lib = _c()
    if not _writeback_ok or not lib or nbytes <= 0:
        return
    if lib.sync_file_range(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE) != 0:
        _writeback_ok = False


def file_size(fd: int) -> int:
    return os.fstat(fd).st_size


class HashingFile:
    """Sequential file writer computing the sha256 of everything written (so the manifest needs no second read).

    write() copies into one of `buffers` buffers of `chunk` bytes and returns; a full buffer goes to a hash thread
    and a write thread side by side (both release the GIL) and comes back for reuse once both are done, so copying,
    hashing and writing all proceed at once with `buffers * chunk` bytes of memory. Every WRITEBACK bytes the
    kernel is asked to start writing the file's earlier bytes to disk. close() waits for the last write and does
    not fsync: the converter writes into a scratch folder that atomic_directory fsyncs as a whole before renaming
    it into place.
    """

    WRITEBACK = 32 << 20

    def __init__(self, path: Path, *, chunk: int = 8 << 20, buffers: int = 4):
        if chunk <= 0 or buffers < 2:
            raise ValueError("chunk must be positive and buffers at least 2")
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o666)
        self._chunk = chunk
        self._bufs = [mmap.mmap(-1, chunk) for _ in range(buffers)]
        self._addr = [ctypes.addressof(ctypes.c_char.from_buffer(b)) for b in self._bufs]
        self._free = deque(range(buffers))
        self._busy: deque = deque()  # (buffer index, hash future, write future), oldest first
        self._hasher = ThreadPoolExecutor(1)  # one thread each: updates and writes stay in order
        self._writer = ThreadPoolExecutor(1)
        self._h = hashlib.sha256()
        self._cur = self._free.popleft()
        self._fill = 0  # bytes in the current buffer
        self._sent = 0  # bytes handed to the write thread (the file offset of the current buffer)
        self._kicked = 0  # bytes whose write-back has been started
        self.size = 0

    def write(self, data) -> int:
        mv = memoryview(data)
        if not mv.c_contiguous:
            raise ValueError("HashingFile.write needs a contiguous buffer")
        mv = mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv
        n = len(mv)
        arr = np.frombuffer(mv, dtype=np.uint8) if n >= (64 << 10) else None  # its address, read-only buffers too
        src = arr.ctypes.data if arr is not None else 0
        pos = 0
        while pos < n:
            k = min(n - pos, self._chunk - self._fill)
            if src and k >= (64 << 10):
                ctypes.memmove(self._addr[self._cur] + self._fill, src + pos, k)  # drops the GIL
            else:
                self._bufs[self._cur][self._fill:self._fill + k] = mv[pos:pos + k]
            self._fill += k
            pos += k
            if self._fill == self._chunk:
                self._dispatch()
        self.size += n
        return n

    def _dispatch(self) -> None:
        i, n = self._cur, self._fill
        view = memoryview(self._bufs[i])[:n]
        hf = self._hasher.submit(self._h.update, view)
        wf = self._writer.submit(self._pwrite, view, self._sent)
        self._busy.append((i, hf, wf))
        self._sent += n
        self._fill = 0
        if not self._free:
            self._retire()
        self._cur = self._free.popleft()

    def _pwrite(self, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            k = os.pwrite(self._fd, view[done:], offset + done)
            if k <= 0:
                raise OSError(errno.EIO, f"{self.path}: write returned {k}")
            done += k
        end = offset + done
        if end - self._kicked >= self.WRITEBACK:  # write thread only
            start_writeback(self._fd, self._kicked, end - self._kicked)
            self._kicked = end

    def _retire(self) -> None:
        i, hf, wf = self._busy.popleft()
        try:
            hf.result()
            wf.result()
        finally:
            self._free.append(i)

    def close(self) -> str:
        try:
            if self._fill:
                self._dispatch()
            while self._busy:
                self._retire()
        finally:
            for pool in (self._hasher, self._writer):
                pool.shutdown(wait=True)
            os.close(self._fd)
            self._bufs = []  # unmapped once the last view of them is gone
        return self._h.hexdigest()


def available_memory() -> int:
    """Bytes this process may still use: MemAvailable, capped by the cgroup's memory.max (v2) or limit (v1)."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            if limit != "max" and int(limit) < (1 << 60):
                room = int(limit) - int(Path(usage_file).read_text().strip())
                avail = room if avail is None else min(avail, room)
            break
        except (OSError, ValueError):
            continue
    return avail if avail is not None else 1 << 62


class FileArena:
    """Tensors kept in a scratch file instead of anonymous memory: each one a shared, writable mapping of its own
    page-aligned region, so the kernel can write its pages back and drop them under memory pressure instead of the
    process being killed. For writers that need every tensor at once (megatron-core's torch_dist save). Each
    tensor's storage is exactly its own bytes (savers that serialise a tensor's whole storage stay correct).
    `close()` unlinks the file; mapped tensors stay valid until they are freed."""

    def __init__(self, path: Path, sizes: list[int]):
        self.path = Path(path)
        self.offsets: list[int] = []
        total = 0
        for n in sizes:
            self.offsets.append(total)
            total += -(-n // mmap.ALLOCATIONGRANULARITY) * mmap.ALLOCATIONGRANULARITY
        self.nbytes = total
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self._fd, total)  # sparse: blocks are allocated as pages are written back

    def tensor(self, index: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        count = 1
        for s in shape:
            count *= s
        nbytes = count * torch.empty((), dtype=dtype).element_size()
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        m = mmap.mmap(self._fd, nbytes, access=mmap.ACCESS_WRITE, offset=self.offsets[index])
        return torch.frombuffer(m, dtype=dtype, count=count).view(shape)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self.path.unlink(missing_ok=True)
