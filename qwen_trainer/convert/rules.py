"""Mapping rules and the tensor transforms behind each rule kind.

A rule ties one or more HF tensors to one Megatron tensor. Its `kind` says how they fuse (qkv grouping, gate/up
concatenation, transpose) and how the fused tensor is split across tensor-parallel ranks. Every kind provides four
pure functions over the *canonical* tensor (the Megatron tensor at TP=1):

    fuse(hf tensors) -> canonical        unfuse(canonical) -> hf tensors
    split(canonical, rank, size) -> shard   merge(shards) -> canonical

so one engine can drive every direction and format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from .dims import ModelDims

# A Megatron name of None means "this format spells the tensor through another rule" (skip silently);
# UNSUPPORTED means the format has no way to hold it (a conversion that needs it fails with a clear error).
UNSUPPORTED = "<unsupported>"


@dataclass(frozen=True, eq=False)  # identity semantics: rules are table entries
class Rule:
    hf: tuple[str, ...]
    mg: dict[str, Optional[str]]  # naming scheme -> Megatron name pattern
    kind: str = "replicated"
    when: Optional[str] = None  # name of a ModelDims boolean property; rule applies only when it is true
    scope: str = "layer"  # "first" (first pipeline stage), "last", "layer", "expert"
    linear: bool = False  # Megatron module is a linear layer (carries an `_extra_state` entry in mcore)
    # A name without {expert} holds every local expert, one after another in memory (see `stack`); the nominal
    # shape grows along this dimension.
    stack_dim: int = 0
    note: str = field(default="", compare=False)

    def active(self, dims: ModelDims) -> bool:
        return self.when is None or bool(getattr(dims, self.when))

    def mg_name(self, schemes: Sequence[str]) -> Optional[str]:
        for s in schemes:
            if s in self.mg:
                return self.mg[s]
        return UNSUPPORTED


# ---- kinds ---------------------------------------------------------------------------------------------------


def cat(parts, dim: int = 0):
    """torch.cat, except that meta tensors (the shape-only pass before writing) get their result's shape by hand:
    the first meta-device cat of a process imports torch's meta kernels, about two seconds of a conversion."""
    parts = list(parts)
    if parts and all(t.is_meta for t in parts) and len({t.dtype for t in parts}) == 1:
        shape = list(parts[0].shape)
        shape[dim] = sum(t.shape[dim] for t in parts)
        return torch.empty(shape, dtype=parts[0].dtype, device="meta")
    return torch.cat(parts, dim=dim)


def _cat(parts, dim: int, alloc):
    """torch.cat, into alloc(shape, dtype) when given (a reused buffer: no fresh allocation to fault in)."""
    if alloc is None or len({t.dtype for t in parts}) != 1:
        return cat(parts, dim=dim)
    shape = list(parts[0].shape)
    shape[dim] = sum(t.shape[dim] for t in parts)
    return torch.cat(parts, dim=dim, out=alloc(tuple(shape), parts[0].dtype))


def _qkv_fuse(dims: ModelDims, q, k, v, alloc=None):
    # Megatron groups rows by KV head: for each group g, [q heads of g; k_g; v_g] (see reference §0.1).
    g, d = dims.groups, dims.head_dim
    per = dims.heads // g
    tail = q.shape[1:]
    return _cat([q.reshape(g, per * d, *tail), k.reshape(g, d, *tail), v.reshape(g, d, *tail)], 1, alloc).reshape(
        -1, *tail)


def _gate_up_fuse(dims: ModelDims, g, u, alloc=None):
    return _cat([g, u], 0, alloc)


def _qkv_unfuse(dims: ModelDims, t):
    g, d = dims.groups, dims.head_dim
    per = dims.heads // g
    tail = t.shape[1:]
    x = t.reshape(g, (per + 2) * d, *tail)
    q, k, v = torch.split(x, [per * d, d, d], dim=1)
    return [q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)]


def _gate_up_split(t, rank, size):
    gate, up = t.chunk(2, dim=0)
    return cat([gate.chunk(size, 0)[rank], up.chunk(size, 0)[rank]], dim=0)


def _gate_up_merge(shards):
    halves = [s.chunk(2, dim=0) for s in shards]
    return cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)


def _pad_rows(dims: ModelDims, t):
    extra = dims.padded_vocab - t.shape[0]
    if extra <= 0:
        return t
    # Zero rows: padded token ids are never produced by the tokenizer, and zeros keep the round trip exact.
    return cat([t, t.new_zeros((extra, *t.shape[1:]))], dim=0)


def stack(shards, dim: int = 0):
    """Local experts' shards in one tensor, expert-major in memory whatever the nominal shape: MegaBlocks
    concatenates on dim 0; megatron-core's legacy GroupedMLP declares weight1 [h, E*2f] but reads it as
    view(E, h, 2f)."""
    if dim == 0:
        return cat(shards, dim=0)
    shape = list(shards[0].shape)
    shape[dim] *= len(shards)
    return cat([s.reshape(-1) for s in shards]).view(shape)


def unstack(t, n: int, dim: int = 0) -> list:
    """Inverse of stack: the n experts' shards."""
    if dim == 0:
        rows = t.shape[0] // n
        return [t[i * rows:(i + 1) * rows] for i in range(n)]
    shape = list(t.shape)
    shape[dim] //= n
    return [b.view(shape) for b in t.reshape(n, -1)]


def _t(dims, t):
    return t.t()


@dataclass(frozen=True)
class Kind:
    fuse: Callable  # (dims, *hf) -> canonical; kinds that concatenate also take alloc=(shape, dtype) -> out buffer
    unfuse: Callable  # (dims, canonical) -> list of hf
    split: Callable  # (canonical, rank, size) -> shard
    merge: Callable  # (list of shards) -> canonical
    tp_split: bool = True
    fuse_alloc: bool = False  # fuse accepts alloc=


def _one(dims, t):
    return t


def _unone(dims, t):
    return [t]


def _dim(d):
    # merging a single shard (TP 1) hands the tensor on: torch.cat would copy every byte of the checkpoint once more
    return (lambda t, r, n: t.chunk(n, dim=d)[r]), (lambda s: s[0] if len(s) == 1 else cat(s, dim=d))


KINDS: dict[str, Kind] = {
    "replicated": Kind(_one, _unone, lambda t, r, n: t, lambda s: s[0], tp_split=False),
    "column": Kind(_one, _unone, *_dim(0)),
    "row": Kind(_one, _unone, *_dim(1)),
    "vocab": Kind(_pad_rows, lambda dims, t: [t[: dims.vocab]], *_dim(0)),
    # whole groups per rank, so a plain dim-0 chunk
    "qkv": Kind(_qkv_fuse, _qkv_unfuse, *_dim(0), fuse_alloc=True),
    "gate_up": Kind(_gate_up_fuse, lambda dims, t: list(t.chunk(2, dim=0)),
                    _gate_up_split, _gate_up_merge, fuse_alloc=True),
    # MegaBlocks stores w2 as down_proj transposed ([ffn, hidden] per expert); not tensor-parallel.
    "transposed": Kind(_t, lambda dims, t: [t.t()], lambda t, r, n: t, lambda s: s[0], tp_split=False),
    # megatron-core's legacy GroupedMLP keeps expert weights transposed ([in, out]): the transposes of gate_up and
    # row, split on the same features
    "gate_up_t": Kind(lambda dims, g, u: cat([g, u], dim=0).t(), lambda dims, t: list(t.t().chunk(2, dim=0)),
                      lambda t, r, n: _gate_up_split(t.t(), r, n).t(),
                      lambda s: _gate_up_merge([x.t() for x in s]).t()),
    "row_t": Kind(_t, lambda dims, t: [t.t()], *_dim(0)),
}
