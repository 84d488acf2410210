"""The sharded save's host staging (qwen_trainer.checkpoint.staging): one buffer the exact size of a save's tensors,
made once and reused, never overwritten while a save holds it, and every staged tensor written by megatron-core's
writer as its own bytes only. On CPU the tensors are staged as a GPU's would be (select=everything, no pinning)."""

from __future__ import annotations

import io
import queue

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

from qwen_trainer.checkpoint import staging  # noqa: E402

ALL = lambda _t: True  # noqa: E731


def _tensors(scale: float = 1.0) -> list:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(37, 5, generator=g) * scale, torch.randn(300, generator=g).to(torch.bfloat16),
            torch.tensor(3.5), torch.zeros(0, 4), torch.rand(9, generator=g) > 0.5,
            torch.randn(8, 6, generator=g).t()]  # not contiguous


def _buckets(tensors: list) -> list:
    return [("file0", "key0", ([("bytes-item", io.BytesIO(b"x"))], [(f"item{i}", t) for i, t in enumerate(tensors[:3])])),
            ("file1", "key1", ([], [(f"item{i}", t) for i, t in enumerate(tensors[3:], 3)]))]


def _host(staged: list) -> list:
    return [t for _, _, (_, tensors) in staged for _, t in tensors]


def _no_fallback(_buckets):
    raise AssertionError("staged into fresh tensors although the buffer was free")


def test_staged_copies_are_exact_and_written_as_their_own_bytes():
    buf = staging.HostBuffer()
    tensors = _tensors()
    staged = buf.stage(_buckets(tensors), owner=1, fallback=_no_fallback, select=ALL)
    assert staged[0][2][0][0][0] == "bytes-item"  # byte items pass through
    host = _host(staged)
    for original, copy in zip(tensors, host):
        assert copy.dtype == original.dtype and copy.shape == original.shape and torch.equal(copy, original)
        assert copy.untyped_storage().nbytes() == original.numel() * original.element_size()
        blob = io.BytesIO()
        torch.save(copy, blob)  # DCP's writer: torch.save writes the whole storage
        assert len(blob.getvalue()) < original.numel() * original.element_size() + 2048
    assert buf.nbytes == sum(-(-t.numel() * t.element_size() // staging.ALIGN) * staging.ALIGN for t in tensors)
    assert buf.owner == 1 and not buf.pinned


def test_the_buffer_is_made_once_reused_and_resized_only_when_the_tensors_change():
    buf = staging.HostBuffer()
    first = _host(buf.stage(_buckets(_tensors()), owner=1, fallback=_no_fallback, select=ALL))
    buf.release(1)
    second = _host(buf.stage(_buckets(_tensors(2.0)), owner=2, fallback=_no_fallback, select=ALL))
    assert buf.allocations == 1
    assert [a.data_ptr() for a in first] == [b.data_ptr() for b in second]
    assert torch.equal(second[0], _tensors(2.0)[0])
    buf.release(2)
    bigger = _tensors() + [torch.randn(5000)]
    buf.stage([("f", "k", ([], [("big", t) for t in bigger]))], owner=3, fallback=_no_fallback, select=ALL)
    assert buf.allocations == 2
    buf.release(3)
    buf.free()
    assert buf.nbytes == 0


def test_a_buffer_held_by_an_unfinished_save_is_never_overwritten():
    buf = staging.HostBuffer()
    held = _host(buf.stage(_buckets(_tensors()), owner=1, fallback=_no_fallback, select=ALL))
    fresh = []

    def fallback(buckets):
        fresh.append(True)
        return [(n, k, (d, [(i, t.clone()) for i, t in ts])) for n, k, (d, ts) in buckets]

    other = _host(buf.stage(_buckets(_tensors(5.0)), owner=2, fallback=fallback, select=ALL))
    assert fresh and torch.equal(held[0], _tensors()[0]) and torch.equal(other[0], _tensors(5.0)[0])
    buf.free()  # refused while held
    assert buf.nbytes > 0
    buf.release(2)  # not the holder: nothing changes
    assert buf.owner == 1
    buf.release(1)
    buf.stage(_buckets(_tensors(5.0)), owner=2, fallback=_no_fallback, select=ALL)
    assert buf.allocations == 1


def test_megatron_writer_writes_staged_tensors_byte_for_byte(tmp_path):
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import WriteItem, WriteItemType

    tensors = [t for t in _tensors() if t.numel()]
    path = tmp_path / "__0_0.distcp"
    items = [WriteItem(index=MetadataIndex(f"t{i}"), type=WriteItemType.TENSOR) for i in range(len(tensors))]
    buf = staging.HostBuffer()
    bucket = buf.stage([(str(path), path.name, ([], list(zip(items, tensors))))], owner=1, fallback=_no_fallback,
                       select=ALL)[0]
    writer = staging.writer_class()(str(tmp_path), thread_count=1)
    results, count = queue.Queue(), queue.Queue()
    count.put(0)
    FileSystemWriterAsync.write_preloaded_data([writer.transforms] if hasattr(writer, "transforms") else [], 0,
                                               bucket, results, count, use_fsync=False)
    _, written = results.get_nowait()
    assert not isinstance(written, Exception), written
    data = path.read_bytes()
    assert len(data) < sum(t.numel() * t.element_size() for t in tensors) + 2048 * len(tensors)
    for result, original in zip(written, tensors):
        info = result.storage_data
        back = torch.load(io.BytesIO(data[info.offset:info.offset + info.length]))
        assert torch.equal(back, original)


def test_the_writer_stages_through_the_buffer_and_releases_it_when_its_results_are_collected(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, **k: 0)
    writer = staging.writer_class()(str(tmp_path), thread_count=1)
    writer.write_buckets = _buckets(_tensors())
    writer.results_queue = None
    _, preload, _ = writer.get_save_function_and_args()
    assert preload.func == staging.HOST_BUFFER.stage and preload.args[1] == id(writer)
    staging.HOST_BUFFER.stage(writer.write_buckets, id(writer), _no_fallback, select=ALL)
    assert staging.HOST_BUFFER.owner == id(writer)
    writer.retrieve_write_results()  # no results here: a wrapped error, and the buffer is free again all the same
    assert staging.HOST_BUFFER.owner is None
    staging.HOST_BUFFER.free()


def test_the_staged_writer_is_megatrons_only_while_a_save_runs(monkeypatch):
    import megatron.core.dist_checkpointing.strategies.torch as strategies

    original = strategies.FileSystemWriterAsync
    restore = staging.install()
    assert strategies.FileSystemWriterAsync is staging.writer_class()
    assert issubclass(strategies.FileSystemWriterAsync, original)
    restore()
    assert strategies.FileSystemWriterAsync is original
    monkeypatch.setenv(staging.STAGING_ENV, "fresh")
    assert not staging.enabled()
    monkeypatch.delenv(staging.STAGING_ENV)
    assert staging.enabled()
