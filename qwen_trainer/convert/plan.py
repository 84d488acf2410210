"""Expand a family table into concrete rule instances and place them on Megatron ranks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

from .errors import ConversionError
from .families import FAMILIES
from .rules import KINDS, UNSUPPORTED, Rule
from .dims import ModelDims, ParallelLayout


@dataclass(frozen=True)
class Instance:
    """One rule applied to one layer (and one expert): the unit the engine reads, converts and writes."""

    rule: Rule
    layer: Optional[int] = None
    expert: Optional[int] = None

    @property
    def hf_names(self) -> list[str]:
        return [p.format(layer=self.layer, expert=self.expert) for p in self.rule.hf]

    def __str__(self) -> str:
        return self.hf_names[0]


def rules_for(dims: ModelDims) -> list[Rule]:
    return [r for r in FAMILIES[dims.family] if r.active(dims)]


def instances(dims: ModelDims, rules: Sequence[Rule]) -> list[Instance]:
    """Canonical order: embedding, then layer by layer (experts rule-major, so stacked MegaBlocks tensors fill
    up one at a time), then the final norm and output layer."""
    out = [Instance(r) for r in rules if r.scope == "first"]
    for layer in range(dims.layers):
        out += [Instance(r, layer) for r in rules if r.scope == "layer"]
        for r in rules:
            if r.scope == "expert":
                out += [Instance(r, layer, e) for e in range(dims.num_experts)]
    out += [Instance(r) for r in rules if r.scope == "last"]
    return out


def format_rules(dims: ModelDims, schemes: Sequence[str], fmt: str) -> list[Rule]:
    """The rules a format uses (those that name the tensor in one of its schemes); error on unsupported ones."""
    out, problems = [], []
    for r in rules_for(dims):
        name = r.mg_name(schemes)
        if name is None:
            continue
        if name == UNSUPPORTED:
            problems.append(f"{fmt} format cannot hold {r.hf[0].format(layer='N', expert='E')} "
                            f"({dims.family}); convert to mcore or torch_dist instead")
            continue
        out.append(r)
    if problems:
        raise ConversionError(sorted(set(problems)))
    return out


@dataclass(frozen=True)
class Slot:
    pp: int
    chunk: int  # virtual pipeline chunk on that stage
    name: str  # rank-local Megatron name
    stacked: bool = False  # MegaBlocks: all local experts concatenated in one tensor


class Placement:
    """Where each instance lives in a per-rank checkpoint of a given layout."""

    def __init__(self, dims: ModelDims, layout: ParallelLayout, etp: int, schemes: Sequence[str],
                 tied_head_name: Optional[str]):
        self.dims, self.layout, self.etp, self.schemes = dims, layout, etp, tuple(schemes)
        self.tied_head_name = tied_head_name
        self.per_chunk = dims.layers // (layout.pp * layout.vpp)
        self.experts_per_rank = dims.num_experts // layout.ep if dims.num_experts else 0

    def layer_slot(self, layer: int) -> tuple[int, int, int]:
        # Virtual stage v*pp + p holds consecutive layers; Megatron numbers layers from 0 inside every chunk.
        c = layer // self.per_chunk
        return c % self.layout.pp, c // self.layout.pp, layer % self.per_chunk

    def ep_rank(self, inst: Instance) -> Optional[int]:
        return None if inst.expert is None else inst.expert // self.experts_per_rank

    def slots(self, inst: Instance) -> list[Slot]:
        r = inst.rule
        pattern = r.mg_name(self.schemes)
        lay = self.layout
        if r.scope == "first":
            out = [Slot(0, 0, pattern)]
            # Tied embeddings with several stages: the last stage keeps its own copy of the output weights.
            if self.dims.tied and lay.pp > 1 and self.tied_head_name:
                out.append(Slot(lay.pp - 1, lay.vpp - 1, self.tied_head_name))
            return out
        if r.scope == "last":
            return [Slot(lay.pp - 1, lay.vpp - 1, pattern)]
        pp, chunk, local = self.layer_slot(inst.layer)
        if r.scope == "expert":
            local_e = inst.expert % self.experts_per_rank
            stacked = "{expert}" not in pattern
            return [Slot(pp, chunk, pattern.format(layer=local, expert=local_e), stacked)]
        return [Slot(pp, chunk, pattern.format(layer=local))]

    def tp_group(self, inst: Instance) -> int:
        """How many ranks share (split) this tensor: etp for experts, tp otherwise."""
        return self.etp if inst.rule.scope == "expert" else self.layout.tp

    def split_ranks(self, inst: Instance) -> int:
        """How many tensor-parallel ranks hold distinct parts of this tensor (1: each holds all of it)."""
        return self.tp_group(inst) if KINDS[inst.rule.kind].tp_split else 1


def iter_groups(layout: ParallelLayout) -> Iterator[tuple[int, int]]:
    for pp in range(layout.pp):
        for ep in range(layout.ep):
            yield pp, ep


def read_ahead(source, insts: Sequence[Instance], max_bytes: int = 256 << 20,
               sizes: Optional[Sequence[int]] = None) -> Iterator[tuple[Instance, list]]:
    """Yield (instance, HF tensors) while a background thread already reads the next ones: reads release the GIL
    (HF sources map each tensor and fault its pages in, see fileio.populate), so the disk reads the next tensors
    while the current one is fused and written. The instance in use and those read ahead of it hold at most
    `max_bytes` together, except that the next instance is always read ahead: a tensor larger than the budget (the
    embedding) then only has its successor in flight, so peak memory stays about max(max_bytes, largest instance
    plus the next one). `sizes` (bytes per instance) defaults to what source.read(inst, meta=True) reports."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    insts = list(insts)
    if sizes is None:
        sizes = [sum(t.numel() * t.element_size() for t in source.read(i, meta=True)) for i in insts]
    with ThreadPoolExecutor(1) as pool:
        pending: deque = deque()
        ahead = 0  # bytes of the pending instances
        nxt = 0
        for k in range(len(insts)):
            # Instance k and the next are in flight; more follow while k and those ahead fit in max_bytes.
            while nxt < len(insts) and (nxt <= k + 1 or ahead + sizes[nxt] <= max_bytes):
                pending.append((insts[nxt], pool.submit(source.read, insts[nxt])))
                ahead += sizes[nxt]
                nxt += 1
            inst, fut = pending.popleft()
            ahead -= sizes[k]
            tensors = fut.result()
            yield inst, tensors
            del tensors
