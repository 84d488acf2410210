"""Per-rank torch checkpoints: Megatron-LM legacy, Megatron-Core (`--ckpt-format torch`) and MegaBlocks.

They differ only in data: naming schemes, rank-folder suffix order, which name prefixes are nested dicts, how the
tied output copy is named, and whether linear layers carry an `_extra_state` entry. One writer and one reader serve
all three.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ...checkpoint.layout import RANK_FILE, rank_dir_name, scan_rank_dirs
from ..errors import ConversionError
from ..plan import Instance, Placement, Slot, iter_groups, read_ahead
from ..rules import KINDS, stack, unstack
from ..dims import ModelDims, ParallelLayout
from ..torchfile import LazyTensor, LazyTorchFile, StreamingTorchWriter

_LEGACY_NEST = ("language_model.embedding.word_embeddings.", "language_model.encoder.",
                "language_model.output_layer.", "word_embeddings_for_head.")


@dataclass(frozen=True)
class PerRankFormat:
    name: str
    schemes: tuple[str, ...]
    order: str  # rank folder suffix order, see checkpoint.layout
    nest: tuple[str, ...]  # name prefixes stored as nested dicts (Megatron-LM legacy state_dict_for_save_checkpoint)
    tied_head_name: str
    extra_state: bool
    experts_tp: bool  # experts split over tensor-parallel ranks by default (etp = tp)

    def resolve_schemes(self, te: bool, grouped: bool) -> tuple[str, ...]:
        if self.name != "mcore":
            return self.schemes
        return (("te",) if te else ()) + (("grouped",) if grouped else ()) + self.schemes


FORMATS = {
    "megatron-lm": PerRankFormat("megatron-lm", ("legacy",), "pp_ep", _LEGACY_NEST, "word_embeddings_for_head.weight",
                                 False, True),
    "mcore": PerRankFormat("mcore", ("mcore",), "pp_ep", (), "output_layer.weight", True, True),
    # MegaBlocks experts are not tensor-parallel; its fork names rank folders mp_rank_TT[_EEE][_PPP].
    "megablocks": PerRankFormat("megablocks", ("megablocks", "legacy"), "ep_pp", _LEGACY_NEST,
                                "word_embeddings_for_head.weight", False, False),
}


def mcore_traits(keys) -> tuple[bool, bool]:
    """(te, grouped): whether Megatron-Core names show norms fused into the next linear and grouped-GEMM experts."""
    return (any(k.endswith("layer_norm_weight") for k in keys),
            any(re.search(r"\.weight\d+$", k) for k in keys))


def nest(flat: dict, prefixes: Sequence[str]) -> dict:
    out: dict = {}
    for key, value in flat.items():
        for p in prefixes:
            if key.startswith(p):
                d = out
                for part in p.rstrip(".").split("."):
                    d = d.setdefault(part, {})
                d[key[len(p):]] = value
                break
        else:
            out[key] = value
    return out


def flatten(obj: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in obj.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def write_per_rank(source, iter_dir: Path, fmt: PerRankFormat, place: Placement, insts: Sequence[Instance], *,
                   cast: Callable, tick: Callable[[int], None], args) -> dict[Path, str]:
    """Returns {file: sha256}."""
    dims, lay = place.dims, place.layout
    files: dict[Path, str] = {}
    # One (pp, ep) group at a time; its tp files are written side by side so each source tensor is read once.
    for pp, ep in iter_groups(lay):
        writers, models = {}, {}
        for tp in range(lay.tp):
            d = rank_dir_name(tp, pp, ep, pp_size=lay.pp, ep_size=lay.ep, order=fmt.order)
            writers[tp] = StreamingTorchWriter(iter_dir / d / RANK_FILE)
            models[tp] = [dict() for _ in range(lay.vpp)]
        stacks: dict = {}
        mine = [i for i in insts if (i.expert is None or place.ep_rank(i) == ep)
                and any(s.pp == pp for s in place.slots(i))]
        scratch = _Scratch()
        for inst, hf in read_ahead(source, mine):
            slots = [s for s in place.slots(inst) if s.pp == pp]
            kind = KINDS[inst.rule.kind]
            # Written (copied out) before the next instance: the fused tensor can reuse one buffer, unless a
            # stacked slot keeps its shards until all local experts are in.
            if kind.fuse_alloc and not any(s.stacked for s in slots):
                canon = cast(kind.fuse(dims, *hf, alloc=scratch))
            else:
                canon = cast(kind.fuse(dims, *hf))
            n = place.split_ranks(inst)
            for tp in range(lay.tp):
                shard = canon if n == 1 else kind.split(canon, tp % n, n)
                for s in slots:
                    _put(fmt, inst, s, shard, writers[tp], models[tp][s.chunk], stacks, tp, place.experts_per_rank)
            tick(1)
        for tp, w in writers.items():
            obj = {"args": args, "checkpoint_version": 3.0, "iteration": 0}
            for c, model in enumerate(models[tp]):
                obj["model" if lay.vpp == 1 else f"model{c}"] = nest(model, fmt.nest)
            w.finish(obj)
            files[w.path] = w.sha256
    return files


class _Scratch:
    """One reusable byte buffer that fused tensors are built in (grown to the largest, never shrunk): fresh
    allocations of that size are page-faulted in from zero every time, which costs more than the copy itself."""

    def __init__(self):
        self._buf = torch.empty(0, dtype=torch.uint8)

    def __call__(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if self._buf.numel() < n:
            self._buf = torch.empty(0, dtype=torch.uint8)  # free the old one first
            self._buf = torch.empty(n, dtype=torch.uint8)
        return self._buf[:n].view(dtype).view(shape)


def _put(fmt, inst, slot: Slot, shard, writer, model, stacks, tp, experts_per_rank) -> None:
    if slot.stacked:
        buf = stacks.setdefault((tp, slot.chunk, slot.name), [])
        buf.append(shard)
        if len(buf) == experts_per_rank:
            model[slot.name] = writer.add(stack(buf, inst.rule.stack_dim))
            del stacks[(tp, slot.chunk, slot.name)]
        return
    model[slot.name] = writer.add(shard)
    if fmt.extra_state and slot.name.endswith(".weight") and (inst.rule.linear or slot.name == fmt.tied_head_name):
        # megatron-core linear layers save an `_extra_state` entry (None without FP8); strict loading wants it.
        model[slot.name[: -len("weight")] + "_extra_state"] = None


class PerRankSource:
    """Reads a per-rank checkpoint lazily; `read(instance)` merges the shards back into HF tensors."""

    def __init__(self, root: Path, iter_dir: Path, fmt: PerRankFormat, dims_for: Callable[[int], ModelDims]):
        self.root, self.iter_dir, self.fmt = Path(root), Path(iter_dir), fmt
        ranks = scan_rank_dirs(self.iter_dir, order=fmt.order)
        if not ranks.paths:
            raise ConversionError(f"{self.iter_dir}: no mp_rank_*/{RANK_FILE} files ({fmt.name} checkpoint expected)")
        first = LazyTorchFile(next(iter(ranks.paths.values())) / RANK_FILE)
        args = first.obj.get("args")
        first.close()
        pp_hint = getattr(args, "pipeline_model_parallel_size", None)
        if pp_hint is not None:
            ranks = scan_rank_dirs(self.iter_dir, order=fmt.order, pp_hint=pp_hint)
        self._files = {k: LazyTorchFile(p / RANK_FILE) for k, p in ranks.paths.items()}
        self._chunks: dict = {}
        for k, f in self._files.items():
            names = sorted((n for n in f.obj if re.fullmatch(r"model\d*", n)), key=lambda n: int(n[5:] or 0))
            if not names:
                raise ConversionError(f"{f.path}: no 'model' entry")
            self._chunks[k] = [{n: v for n, v in flatten(f.obj[m]).items() if isinstance(v, LazyTensor)}
                               for m in names]
        vpp = len(self._chunks[(0, 0, 0)])
        keys = set().union(*(c.keys() for chunks in self._chunks.values() for c in chunks))
        te, grouped = mcore_traits(keys)
        self.schemes = fmt.resolve_schemes(te, grouped)
        self.transformer_engine_keys, self.expert_layout = te, "grouped" if grouped else "sequential"
        emb = self._find_embedding(keys)
        self.dims = dims_for(emb * ranks.tp)
        layout = ParallelLayout(tp=ranks.tp, pp=ranks.pp, ep=ranks.ep, vpp=vpp)
        # Placement with etp=tp first, to locate an expert tensor whose shape tells the real etp.
        self.place = Placement(self.dims, layout, ranks.tp, self.schemes, fmt.tied_head_name)
        self.place = Placement(self.dims, layout, self._detect_etp(layout), self.schemes, fmt.tied_head_name)
        self.layout = ParallelLayout(tp=ranks.tp, pp=ranks.pp, ep=ranks.ep, etp=self.place.etp, vpp=vpp)
        self._cache: dict = {}

    def _find_embedding(self, keys) -> int:
        for name in ("embedding.word_embeddings.weight", "language_model.embedding.word_embeddings.weight"):
            t = self._chunks[(0, 0, 0)][0].get(name)
            if t is not None:
                return t.shape[0]
        raise ConversionError(f"{self.iter_dir}: no word embeddings on the first rank ({self.fmt.name} names)")

    def _detect_etp(self, layout: ParallelLayout) -> int:
        if not self.fmt.experts_tp:
            return 1
        if not self.dims.is_moe or layout.tp == 1:
            return layout.tp
        from ..plan import rules_for  # local: only needed for MoE sources
        for r in rules_for(self.dims):
            if r.scope == "expert" and r.kind == "row" and r.mg_name(self.schemes):
                slot = self.place.slots(Instance(r, 0, 0))[0]
                t = self._chunks[(0, slot.pp, 0)][slot.chunk].get(slot.name)
                if t is not None:
                    return 1 if t.shape[1] == self.dims.moe_ffn else layout.tp
        return layout.tp

    def _tensor(self, tp: int, ep: int, slot: Slot, meta: bool) -> torch.Tensor:
        lazy = self._chunks[(tp, slot.pp, ep)][slot.chunk].get(slot.name)
        if lazy is None:
            raise ConversionError(f"{self._files[(tp, slot.pp, ep)].path}: missing tensor {slot.name}")
        if meta:
            return lazy.meta()
        if not slot.stacked:
            return lazy.load()
        key = (tp, slot.pp, ep, slot.chunk, slot.name)
        if key not in self._cache:
            self._cache.clear()  # stacked expert tensors are visited expert by expert; keep only the current one
            self._cache[key] = lazy.load()
        return self._cache[key]

    def read(self, inst: Instance, meta: bool = False) -> list[torch.Tensor]:
        slot = self.place.slots(inst)[0]
        ep = self.place.ep_rank(inst) or 0
        kind = KINDS[inst.rule.kind]
        shards = [self._tensor(tp, ep, slot, meta) for tp in range(self.place.split_ranks(inst))]
        if slot.stacked:
            i = inst.expert % self.place.experts_per_rank
            shards = [unstack(s, self.place.experts_per_rank, inst.rule.stack_dim)[i] for s in shards]
        return kind.unfuse(self.dims, kind.merge(shards))

    def close(self) -> None:
        for f in self._files.values():
            f.close()
