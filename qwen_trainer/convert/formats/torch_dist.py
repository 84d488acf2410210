"""Megatron-Core distributed checkpoints (`--ckpt-format torch_dist`) through megatron.core.dist_checkpointing.

Keys are the ones GPTModel.sharded_state_dict() produces: layers stacked on a leading axis
(`decoder.layers.self_attention.linear_qkv.weight` [L, ...]) and experts on a second one
(`decoder.layers.mlp.experts.experts.linear_fc1.weight` [L, E, ...]); tensors are stored in their TP=1 layout, so
one checkpoint loads at any TP/PP/EP. We save from one process with one ShardedTensor per (layer, expert) piece.
"""

from __future__ import annotations

import io
import os
import queue
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator, Optional, Sequence

import torch

from ..errors import ConversionError
from ..plan import Instance, read_ahead
from ..rules import KINDS
from ..dims import ModelDims

# The local layer spec renames its separate norms to the TE fused names in sharded_state_dict, so both specs share
# keys for dense layers; MoE layers keep `pre_mlp_layernorm` under the TE dims only.
_LOCAL_KEYS_MAP = (("input_layernorm.", "self_attention.linear_qkv.layer_norm_"),
                   ("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_"))


@contextmanager
def process_group() -> Iterator[None]:
    """dist_checkpointing needs torch.distributed; start a 1-rank gloo group unless one is already running."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory() as d:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(d, 'store')}", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


@contextmanager
def _cpu_only() -> Iterator[None]:
    """megatron-core's saver calls torch.cuda.synchronize() after staging tensors to host memory and puts its
    failure flag on torch.cuda.current_device(); on a machine without a GPU both raise. Our tensors are already on
    the CPU and the group is gloo, so point both at the CPU while saving."""
    if torch.cuda.is_available():
        yield
        return
    saved = torch.cuda.synchronize, torch.cuda.current_device
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_device = lambda: "cpu"
    try:
        yield
    finally:
        torch.cuda.synchronize, torch.cuda.current_device = saved


class _InProcessContext:
    """Stands in for a multiprocessing context: "processes" run to completion in start(), queues are plain."""

    class Process:
        def __init__(self, target, args=(), kwargs=None):
            self._run = lambda: target(*args, **(kwargs or {}))

        def start(self):
            self._run()

        def join(self, timeout=None):
            pass

    Queue = JoinableQueue = SimpleQueue = queue.Queue

    def Manager(self):
        return self


@contextmanager
def _in_process_writers() -> Iterator[None]:
    """megatron-core's file writer forks one worker per output file (and spawns a manager for results). Forking a
    process that already runs gloo and torch thread pools hangs here, and a converter gains nothing from it: the
    data is already in host memory. Run the same writer code in this process instead."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    saved = fa.mp, fa._results_queue, fa._process_memory
    fa.mp = SimpleNamespace(get_context=lambda method=None: _InProcessContext())
    fa._results_queue = None
    if not fa.HAVE_PSUTIL:  # only used for debug logging, but raises without psutil
        fa._process_memory = lambda: 0
    try:
        yield
    finally:
        fa.mp, fa._results_queue, fa._process_memory = saved


def dist_key(inst: Instance, dims: ModelDims, te: bool) -> tuple[str, tuple, str]:
    """(key, sharded offsets, extra-state key) for an instance."""
    schemes = ("te", "mcore") if te else ("mcore",)
    name = inst.rule.mg_name(schemes)
    offsets: tuple = ()
    if inst.layer is not None:
        name = name.format(layer="{layer}", expert="{expert}").replace("decoder.layers.{layer}.", "decoder.layers.")
        if not te:
            for old, new in _LOCAL_KEYS_MAP:
                if name == "decoder.layers." + old + "weight":
                    name = "decoder.layers." + new + "weight"
        offsets = ((0, inst.layer, dims.layers),)
    if inst.expert is not None:
        name = name.replace("mlp.experts.local_experts.{expert}.", "mlp.experts.experts.")
        offsets += ((1, inst.expert, dims.num_experts),)
    extra = name[: -len("weight")] + "_extra_state" if inst.rule.linear and inst.layer is not None else ""
    return name, offsets, extra


def write_torch_dist(source, iter_dir: Path, dims: ModelDims, insts: Sequence[Instance], *, te: bool,
                     cast: Callable, tick: Callable[[int], None], args) -> dict:
    # dist_checkpointing.save takes the whole sharded state dict at once, so this format holds the whole model.
    # When that would not fit in the memory left (a 72B model in a pod), the tensors live in a scratch file beside
    # the output instead (FileArena): slower, since its pages may be written to disk once more, but never killed.
    arena = None
    shapes = []
    for inst in insts:
        canon = cast(KINDS[inst.rule.kind].fuse(dims, *source.read(inst, meta=True)))
        shapes.append((canon.dtype, tuple(canon.shape), canon.numel() * canon.element_size()))
    if sum(n for _, _, n in shapes) > arena_threshold():
        from ..fileio import FileArena

        iter_dir.parent.mkdir(parents=True, exist_ok=True)
        arena = FileArena(iter_dir.parent / f".{iter_dir.name}.arena", [n for _, _, n in shapes])
    try:
        return _save(source, iter_dir, dims, insts, te, cast, tick, args, arena, shapes)
    finally:
        if arena is not None:
            arena.close()


def arena_threshold() -> int:
    """Model bytes above which write_torch_dist keeps tensors in a scratch file: half the memory still available
    (QWEN_CONVERT_ARENA_BYTES overrides, 0 forcing the scratch file)."""
    forced = os.environ.get("QWEN_CONVERT_ARENA_BYTES")
    if forced is not None:
        return int(forced)
    from ..fileio import available_memory

    return available_memory() // 2


def _save(source, iter_dir: Path, dims: ModelDims, insts: Sequence[Instance], te: bool, cast: Callable,
          tick: Callable[[int], None], args, arena, shapes) -> dict:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor

    sd: dict = {}
    for i, (inst, hf) in enumerate(read_ahead(source, insts)):  # in the order of insts
        kind = KINDS[inst.rule.kind]
        canon = cast(kind.fuse(dims, *hf)).contiguous()
        if arena is not None:
            held = arena.tensor(i, shapes[i][0], shapes[i][1])
            held.copy_(canon)
            canon = held
        key, offsets, extra = dist_key(inst, dims, te)
        local = f"{key}@{inst.layer}.{inst.expert}"
        sd[local] = ShardedTensor.from_rank_offsets(key, canon, *offsets, replica_id=0, prepend_axis_num=len(offsets))
        if extra:
            shape = tuple(o[2] for o in offsets)
            sd[local + "._extra_state"] = ShardedObject(extra, None, shape, tuple(o[1] for o in offsets), replica_id=0)
        tick(1)
    iter_dir.mkdir(parents=True, exist_ok=True)
    state = {"model": sd, "checkpoint_version": 3.0, "iteration": 0, "args": args,
             "num_floating_point_operations_so_far": 0}
    with process_group(), _cpu_only(), _in_process_writers():
        dist_checkpointing.save(state, str(iter_dir))
    return {p: "" for p in sorted(iter_dir.rglob("*")) if p.is_file()}  # hashed by the manifest


class DcpReader:
    """Reads regions of a PyTorch DCP checkpoint straight from its `.metadata` and `.distcp` files.

    megatron-core's own load() converts requests into torch ShardedTensors that must tile the whole tensor on the
    calling ranks, so a one-process reader cannot ask for one layer at a time. The DCP layout is simple: each saved
    chunk (offsets, sizes) is a torch.save blob at a byte range of a .distcp file. We read the chunks that cover the
    requested layer and assemble them, which works for any TP/PP/EP the checkpoint was saved with."""

    def __init__(self, directory: Path):
        from torch.distributed.checkpoint import FileSystemReader

        self.dir = Path(directory)
        md = FileSystemReader(str(self.dir)).read_metadata()
        self.tensors = {k: v for k, v in md.state_dict_metadata.items() if hasattr(v, "chunks")}
        self._storage = md.storage_data

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].properties.dtype

    def _chunk(self, key: str, offsets) -> torch.Tensor:
        from torch.distributed.checkpoint.metadata import MetadataIndex

        info = self._storage[MetadataIndex(key, offsets)]
        with open(self.dir / info.relative_path, "rb") as f:
            f.seek(info.offset)
            blob = f.read(info.length)
        return torch.load(io.BytesIO(blob), weights_only=True)

    def read(self, key: str, layer: Optional[int] = None) -> torch.Tensor:
        """The whole tensor, or its slice at `layer` along the leading (stacked-layers) axis."""
        md = self.tensors[key]
        shape = tuple(md.size)[1:] if layer is not None else tuple(md.size)
        out = torch.empty(shape, dtype=md.properties.dtype)
        for c in md.chunks:
            off, size = tuple(c.offsets), tuple(c.sizes)
            if layer is not None:
                if not off[0] <= layer < off[0] + size[0]:
                    continue
                t = self._chunk(key, c.offsets)[layer - off[0]]
                off, size = off[1:], size[1:]
            else:
                t = self._chunk(key, c.offsets)
            out[tuple(slice(o, o + n) for o, n in zip(off, size))] = t
        return out


def is_torch_dist_dir(iter_dir: Path) -> bool:
    """An iteration folder written by dist_checkpointing (whatever format a dims names for it)."""
    return (Path(iter_dir) / "metadata.json").is_file() and (Path(iter_dir) / ".metadata").is_file()


class DistSource:
    """Reads a torch_dist checkpoint one tensor (one layer of it) at a time."""

    def __init__(self, root: Path, iter_dir: Path, dims_for: Callable[[int], ModelDims]):
        self.root, self.iter_dir = Path(root), Path(iter_dir)
        if not (self.iter_dir / "metadata.json").is_file() or not (self.iter_dir / ".metadata").is_file():
            raise ConversionError(f"{self.iter_dir}: not a torch_dist checkpoint (metadata.json or .metadata missing)")
        self._dcp = DcpReader(self.iter_dir)
        if "embedding.word_embeddings.weight" not in self._dcp.tensors:
            raise ConversionError(f"{self.iter_dir}: no embedding.word_embeddings.weight in the checkpoint")
        self.dims = dims_for(self._dcp.shape("embedding.word_embeddings.weight")[0])
        self.te = "decoder.layers.pre_mlp_layernorm.weight" in self._dcp.tensors
        self.transformer_engine_keys = self.te

    def read(self, inst: Instance, meta: bool = False) -> list[torch.Tensor]:
        key, offsets, _ = dist_key(inst, self.dims, self.te)
        if key not in self._dcp.tensors:
            raise ConversionError(f"{self.iter_dir}: missing tensor {key}")
        kind = KINDS[inst.rule.kind]
        if meta:
            canon = torch.empty(self._dcp.shape(key)[len(offsets):], dtype=self._dcp.dtype(key), device="meta")
        else:
            t = self._dcp.read(key, inst.layer)
            canon = t[inst.expert] if inst.expert is not None else t
        return kind.unfuse(self.dims, canon)

    def close(self) -> None:
        pass
