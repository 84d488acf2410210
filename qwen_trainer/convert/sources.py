"""Source adapters: every source answers read(instance) -> HF tensors, for any family rule.

A Megatron source stores some HF tensors through different rules than the target uses (MegaBlocks keeps gate and up
in w1/v1, Megatron-Core fuses them in linear_fc1). `ByName` serves a foreign rule by reading the source's own rule
that holds each HF name. `Upcycled` turns a dense source into an MoE one.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from .errors import ConversionError
from .plan import Instance
from .rules import Rule
from .dims import ModelDims, UpcycleOptions, model_dims


class ByName:
    def __init__(self, source, own: Sequence[Instance]):
        self.source, self.dims = source, source.dims
        self.root = getattr(source, "root", None)
        self._own = {(i.rule, i.layer, i.expert) for i in own}
        self._where = {n: (i, k) for i in own for k, n in enumerate(i.hf_names)}
        self._last: tuple = (None, None)

    def read(self, inst: Instance, meta: bool = False) -> list[torch.Tensor]:
        if (inst.rule, inst.layer, inst.expert) in self._own:
            return self.source.read(inst, meta)
        out = []
        for name in inst.hf_names:
            if name not in self._where:
                raise ConversionError(f"source checkpoint has no rule that provides {name}")
            own, k = self._where[name]
            if self._last[0] != (own, meta):
                self._last = ((own, meta), self.source.read(own, meta))
            out.append(self._last[1][k])
        return out

    def close(self) -> None:
        self.source.close()


UPCYCLE_TARGETS = {"qwen2": ("qwen2_moe", "Qwen2MoeForCausalLM"), "qwen3": ("qwen3_moe", "Qwen3MoeForCausalLM")}


def upcycled_config(dense: ModelDims, up: UpcycleOptions) -> dict:
    if dense.family not in UPCYCLE_TARGETS:
        raise ConversionError(f"upcycling needs a dense model; {dense.family} is not one")
    if up.num_experts < 1 or not 1 <= up.top_k <= up.num_experts:
        raise ConversionError(f"upcycle: need num_experts >= 1 and 1 <= top_k <= num_experts "
                              f"(got {up.num_experts}, {up.top_k})")
    model_type, arch = UPCYCLE_TARGETS[dense.family]
    cfg = dict(dense.hf_config)
    cfg.update(model_type=model_type, architectures=[arch], num_experts=up.num_experts,
               num_experts_per_tok=up.top_k, moe_intermediate_size=dense.ffn, norm_topk_prob=up.norm_topk_prob,
               decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=cfg.get("router_aux_loss_coef", 0.001))
    if model_type == "qwen2_moe":
        # Qwen2-MoE always builds a sigmoid-gated shared expert; size 0 makes it contribute exactly nothing.
        cfg.update(shared_expert_intermediate_size=0, qkv_bias=dense.qkv_bias)
    return cfg


class Upcycled:
    """Dense -> MoE: expert e of layer l is the dense MLP of layer l (gate stays gate, up stays up); the router is
    normal(0, router_std) from a generator seeded by (seed, layer), so reruns give identical checkpoints."""

    def __init__(self, dense_source, up: UpcycleOptions):
        self.dense, self.up = dense_source, up
        self.root = getattr(dense_source, "root", None)
        ddims = dense_source.dims
        self.config = upcycled_config(ddims, up)
        self.dims = model_dims(self.config, padded_vocab_size=ddims.padded_vocab)

    def _dense_read(self, name: str, meta: bool) -> torch.Tensor:
        # A one-name ad-hoc rule: HF sources look names up directly, ByName sources through their own rules.
        return self.dense.read(Instance(Rule((name,), {})), meta)[0]

    def read(self, inst: Instance, meta: bool = False) -> list[torch.Tensor]:
        out = []
        for name in inst.hf_names:
            parts = name.split(".")
            if ".mlp.experts." in name:  # model.layers.L.mlp.experts.E.gate_proj.weight
                dense_name = ".".join(parts[:4] + parts[6:])
                out.append(self._dense_read(dense_name, meta))
            elif name.endswith(".mlp.gate.weight"):
                layer = int(parts[2])
                like = self._dense_read(f"model.layers.{layer}.mlp.gate_proj.weight", True)
                shape = (self.up.num_experts, self.dims.hidden)
                if meta:
                    out.append(torch.empty(shape, dtype=like.dtype, device="meta"))
                else:
                    g = torch.Generator().manual_seed(self.up.seed * 1_000_003 + layer)
                    w = torch.empty(shape, dtype=torch.float32).normal_(0.0, self.up.router_std, generator=g)
                    out.append(w.to(like.dtype))
            else:
                out.append(self._dense_read(name, meta))
        return out

    def close(self) -> None:
        self.dense.close()
