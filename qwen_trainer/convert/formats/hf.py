"""Hugging Face safetensors checkpoints (one file or an index of shards)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..errors import ConversionError
from ..plan import Instance, read_ahead
from ..safetensors_io import SafetensorsFile, SafetensorsWriter
from ..dims import ModelDims

INDEX = "model.safetensors.index.json"


class HFSource:
    def __init__(self, root: Path, dims: ModelDims):
        self.root, self.dims = Path(root), dims
        index = self.root / INDEX
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in self.root.glob("*.safetensors"))
        if not files:
            raise ConversionError(f"{self.root}: no *.safetensors files (only safetensors checkpoints are read)")
        self._files, self._where = [], {}
        for name in files:
            path = self.root / name
            if not path.is_file():
                raise ConversionError(f"{self.root}: {name} is listed in {INDEX} but missing")
            f = SafetensorsFile(path)
            self._files.append(f)
            for key in f.keys():
                self._where[key] = f

    def names(self) -> set[str]:
        return set(self._where)

    def read(self, inst: Instance, meta: bool = False) -> list[torch.Tensor]:
        out = []
        for name in inst.hf_names:
            f = self._where.get(name)
            if f is None:
                raise ConversionError(f"{self.root}: tensor {name} is missing from the checkpoint")
            out.append(f.meta(name) if meta else f.get(name))
        return out

    def close(self) -> None:
        for f in self._files:
            f.close()


def unmapped(source: HFSource, insts: Sequence[Instance]) -> list[str]:
    """Source tensors no rule consumes: a sign of an architecture variant the tables do not describe."""
    used = {n for i in insts for n in i.hf_names}
    extra = source.names() - used
    if source.dims.tied:
        extra.discard("lm_head.weight")  # some tied checkpoints still store the (identical) head
    return sorted(extra)


def write_hf(source, dst: Path, insts: Sequence[Instance], *, cast: Callable, max_shard_bytes: int,
             tick: Callable[[int], None]) -> dict[Path, str]:
    """Returns {file: sha256}."""
    # Metadata pass: shapes and dtypes of every output tensor, so each file's header can be written first.
    planned: list[tuple[Instance, list[tuple[str, torch.dtype, tuple]]]] = []
    for inst in insts:
        metas = source.read(inst, meta=True)
        planned.append((inst, [(n, cast(m).dtype, tuple(m.shape)) for n, m in zip(inst.hf_names, metas)]))
    shards: list[list] = [[]]
    size = 0
    for inst, entries in planned:
        nbytes = sum(torch.empty((), dtype=d).element_size() * int(torch.Size(s).numel()) for _, d, s in entries)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((inst, entries))
        size += nbytes
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map, total, files = {}, 0, {}
    for fname, shard in zip(names, shards):
        writer = SafetensorsWriter(dst / fname, [e for _, entries in shard for e in entries])
        entries_of = {id(inst): entries for inst, entries in shard}
        for inst, tensors in read_ahead(source, [inst for inst, _ in shard]):
            for (name, _, _), t in zip(entries_of[id(inst)], tensors):
                writer.write(name, cast(t))
                weight_map[name] = fname
            tick(1)
        writer.close()
        total += writer.bytes_written
        files[dst / fname] = writer.sha256
    if n > 1:
        (dst / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return files
