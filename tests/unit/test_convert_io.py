"""The converter's streaming I/O pieces: hashing writer, mapped safetensors reads, bounded read-ahead, fused
tensors built in a reused buffer, torch records written from views."""

import hashlib
import json
import os
import random
import struct
import threading

import pytest
import torch

from qwen_trainer.convert import ConversionError, fileio
from qwen_trainer.convert.fileio import HashingFile, map_tensor, populate
from qwen_trainer.convert.formats.per_rank import _Scratch
from qwen_trainer.convert.plan import Instance, read_ahead
from qwen_trainer.convert.rules import KINDS, Rule
from qwen_trainer.convert.safetensors_io import SafetensorsFile, SafetensorsWriter
from qwen_trainer.convert.torchfile import StreamingTorchWriter


def test_hashing_file_bytes_and_sha_across_buffer_boundaries(tmp_path):
    rnd = random.Random(0)
    f = HashingFile(tmp_path / "out", chunk=8192, buffers=2)
    expect = bytearray()
    for i in range(150):
        b = rnd.randbytes(rnd.choice([0, 1, 7, 4095, 8192, 8193, 70000, 200000]))
        # bytes (read-only), a numpy-backed memoryview (writable, large ones copied by address) and a bf16 view
        data = b if i % 3 == 0 else memoryview(torch.frombuffer(bytearray(b), dtype=torch.uint8).numpy()) if b else b
        assert f.write(data) == len(b)
        expect += b
    t = torch.arange(3000, dtype=torch.bfloat16)
    f.write(memoryview(t.view(torch.uint8).numpy()))
    expect += t.view(torch.uint8).numpy().tobytes()
    sha = f.close()
    assert (tmp_path / "out").read_bytes() == bytes(expect)
    assert sha == hashlib.sha256(expect).hexdigest()


def test_hashing_file_empty(tmp_path):
    assert HashingFile(tmp_path / "e").close() == hashlib.sha256(b"").hexdigest()
    assert (tmp_path / "e").read_bytes() == b""


class _FakeSource:
    """read(inst) records which instances have been read and not yet handed back."""

    def __init__(self, sizes):
        self.sizes = sizes
        self.read_order = []
        self.done = [threading.Event() for _ in sizes]

    def read(self, inst, meta=False):
        n = self.sizes[inst.layer]
        if meta:
            return [torch.empty(n, dtype=torch.uint8, device="meta")]
        self.read_order.append(inst.layer)
        self.done[inst.layer].set()
        return [torch.full((n,), inst.layer % 256, dtype=torch.uint8)]


@pytest.mark.parametrize("sizes,budget", [([10] * 20, 35), ([100, 1, 1, 1, 100, 5, 5, 200, 1], 50),
                                          ([7] * 5, 0), ([3, 500, 4, 4, 1, 1], 10)])
def test_read_ahead_is_bounded_by_bytes(sizes, budget):
    rule = Rule(("x.{layer}",), {})
    insts = [Instance(rule, i) for i in range(len(sizes))]
    src = _FakeSource(sizes)
    got = []
    for k, (inst, tensors) in enumerate(read_ahead(src, insts, max_bytes=budget)):
        assert inst.layer == k and tensors[0].numel() == sizes[k] and int(tensors[0][0]) == k % 256
        got.append(k)
        # the next instance is always read ahead; beyond it, only while the current one and those ahead fit
        if k + 1 < len(sizes):
            assert src.done[k + 1].wait(10)
        ahead = [j for j in src.read_order if j > k]
        if len(ahead) > 1:
            assert sizes[k] + sum(sizes[j] for j in ahead) <= budget
    assert got == list(range(len(sizes)))
    assert src.read_order == got


def _write_st(path, tensors):
    w = SafetensorsWriter(path, [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()])
    for n, t in tensors.items():
        w.write(n, t)
    w.close()
    return w.sha256


def test_safetensors_mapped_read_round_trip_and_truncation(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g).to(torch.bfloat16), "b": torch.arange(7, dtype=torch.int32),
               "c": torch.empty(0, 4), "d": torch.randn(1025, 9, generator=g)}
    sha = _write_st(tmp_path / "m.safetensors", tensors)
    assert sha == hashlib.sha256((tmp_path / "m.safetensors").read_bytes()).hexdigest()
    f = SafetensorsFile(tmp_path / "m.safetensors")
    got = {n: f.get(n) for n in tensors}
    f.close()  # mapped tensors outlive the file descriptor
    for n, t in tensors.items():
        assert got[n].dtype == t.dtype and got[n].shape == t.shape and torch.equal(got[n], t)
    got["a"].add_(1)  # private mapping: writing to a read tensor never reaches the file
    f = SafetensorsFile(tmp_path / "m.safetensors")
    assert torch.equal(f.get("a"), tensors["a"])
    f.close()

    raw = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(raw[:-100])
    f = SafetensorsFile(tmp_path / "t.safetensors")
    assert torch.equal(f.get("a"), tensors["a"])
    with pytest.raises(ConversionError, match="truncated"):
        f.get("d")  # a clear error, not a SIGBUS from touching mapped pages past the end
    f.close()
    header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
    assert header["d"]["data_offsets"][1] == len(raw) - 8 - struct.unpack("<Q", raw[:8])[0]


def test_safetensors_file_cut_short_while_open_is_an_error_not_a_sigbus(tmp_path):
    g = torch.Generator().manual_seed(1)
    tensors = {"a": torch.randn(16, generator=g), "d": torch.randn(4096, 8, generator=g)}
    _write_st(tmp_path / "m.safetensors", tensors)
    f = SafetensorsFile(tmp_path / "m.safetensors")
    size = (tmp_path / "m.safetensors").stat().st_size
    os.truncate(tmp_path / "m.safetensors", size - 40000)  # someone overwrites the checkpoint mid-conversion
    assert torch.equal(f.get("a"), tensors["a"])
    with pytest.raises(ConversionError, match="changed while it was being read"):
        f.get("d")
    f.close()


def test_populate_reports_pages_truncated_after_mapping(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    fd = os.open(path, os.O_RDONLY)
    try:
        mapped = map_tensor(fd, 0, 1 << 20)
        os.truncate(path, 4096)
        ok = populate(mapped)
        if fileio._populate_ok:  # MADV_POPULATE_READ (Linux 5.14+): the vanished pages are reported
            assert ok is False
        assert populate(mapped[:4096]) is True
    finally:
        os.close(fd)


class _Spec:
    groups, head_dim, heads = 2, 4, 6


def test_fuse_into_reused_buffer_matches_plain_cat():
    g = torch.Generator().manual_seed(1)
    scratch = _Scratch()
    q, k, v = (torch.randn(n, 8, generator=g).to(torch.bfloat16) for n in (24, 8, 8))
    gate, up = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    for _ in range(2):  # second round reuses the buffer
        a = KINDS["qkv"].fuse(_Spec, q, k, v, alloc=scratch)
        assert torch.equal(a, KINDS["qkv"].fuse(_Spec, q, k, v))
        b = KINDS["gate_up"].fuse(_Spec, gate, up, alloc=scratch)
        assert torch.equal(b, torch.cat([gate, up])) and b.dtype == torch.float32
    assert KINDS["qkv"].fuse_alloc and KINDS["gate_up"].fuse_alloc and not KINDS["column"].fuse_alloc


def test_torch_writer_stores_views_as_their_own_bytes(tmp_path):
    big = torch.arange(100, dtype=torch.float32)
    w = StreamingTorchWriter(tmp_path / "r.pt")
    obj = {"head": w.add(big[:10]), "mid": w.add(big[40:60].view(4, 5)), "col": w.add(big.view(10, 10)[:, 3]),
           "empty": w.add(big[:0])}
    w.finish(obj)
    assert w.sha256 == hashlib.sha256((tmp_path / "r.pt").read_bytes()).hexdigest()
    back = torch.load(tmp_path / "r.pt", weights_only=True)
    assert torch.equal(back["head"], big[:10]) and torch.equal(back["mid"], big[40:60].view(4, 5))
    assert torch.equal(back["col"], big.view(10, 10)[:, 3]) and back["empty"].numel() == 0
    assert back["head"].untyped_storage().nbytes() == 40


@pytest.mark.parametrize("content", [b"", b"\x05\x00", struct.pack("<Q", 1 << 40) + b"{}",
                                     struct.pack("<Q", 4) + b"[1,2"])
def test_safetensors_garbage_header_is_a_conversion_error(tmp_path, content):
    (tmp_path / "bad.safetensors").write_bytes(content)
    with pytest.raises(ConversionError, match="not a safetensors file"):
        SafetensorsFile(tmp_path / "bad.safetensors")


def test_cat_of_meta_tensors_is_shape_only_and_real_tensors_concatenate():
    from qwen_trainer.convert.rules import cat

    a = torch.empty(4, 3, device="meta", dtype=torch.bfloat16)
    b = torch.empty(2, 3, device="meta", dtype=torch.bfloat16)
    m = cat([a, b], dim=0)
    assert m.is_meta and m.shape == (6, 3) and m.dtype == torch.bfloat16
    assert cat([a, a], dim=1).shape == (4, 6)
    x, y = torch.arange(6.0).reshape(2, 3), torch.ones(1, 3)
    assert torch.equal(cat([x, y]), torch.cat([x, y]))


def test_file_arena_tensors_own_exactly_their_bytes_and_the_file_goes_away(tmp_path):
    from qwen_trainer.convert.fileio import FileArena, available_memory

    assert available_memory() > 0
    arena = FileArena(tmp_path / ".arena", [10, 3 * 4096 * 4, 0])
    a = arena.tensor(0, torch.uint8, (10,))
    b = arena.tensor(1, torch.float32, (3, 4096))
    empty = arena.tensor(2, torch.float32, (0, 4))
    assert a.untyped_storage().nbytes() == 10 and b.untyped_storage().nbytes() == 3 * 4096 * 4
    assert empty.shape == (0, 4)
    a.copy_(torch.arange(10, dtype=torch.uint8))
    b.fill_(2.5)
    raw = (tmp_path / ".arena").read_bytes()  # shared mappings: the bytes are in the file
    assert raw[:10] == bytes(range(10)) and len(raw) == arena.nbytes
    assert torch.equal(torch.frombuffer(bytearray(raw[4096:4096 + 16]), dtype=torch.float32), torch.full((4,), 2.5))
    arena.close()
    assert not (tmp_path / ".arena").exists()
    assert float(b.sum()) == 2.5 * 3 * 4096  # mapped tensors outlive the file
