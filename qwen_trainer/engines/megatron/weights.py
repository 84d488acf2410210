"""Hugging Face tensors <-> the built megatron-core model's tensors, in memory, both ways through the converter's
family tables (qwen_trainer.convert.families) and rule kinds (qwen_trainer.convert.rules), so the engine and the converter
cannot disagree on a layout.

The naming scheme comes from the model's own keys as the converter reads it from a checkpoint's: `te` (norms fused
into linear_qkv / linear_fc1), `grouped` (TE grouped-GEMM experts), `gmm` (megatron's legacy GroupedMLP, the
engine's grouped-GEMM experts), `megablocks_mcore` (the megablocks backend's dMoE MLP), else `mcore` (SequentialMLP). Layers are numbered globally here: a pipeline chunk's
local numbers plus its offset, which also covers uneven and virtual pipeline splits. Experts are numbered locally to
their expert-parallel rank and are whole on it (the engine trains with expertTensor 1).
"""

from __future__ import annotations

import re
from typing import Optional

import torch

from qwen_trainer.convert.formats.per_rank import FORMATS, mcore_traits
from qwen_trainer.convert.plan import Instance, Placement, format_rules, instances
from qwen_trainer.convert.rules import KINDS, stack, unstack
from qwen_trainer.convert.dims import FAMILY_ALIASES, ModelDims, ParallelLayout
from qwen_trainer.spec.resolve import ResolvedArchitecture

_TIED_HEAD = FORMATS["mcore"].tied_head_name
_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def model_dims(arch: ResolvedArchitecture) -> ModelDims:
    """The converter's description of the engine's model; the engine's vocabulary is already padded."""
    moe = arch.moe
    return ModelDims(
        family=FAMILY_ALIASES[arch.family] + ("_moe" if moe else ""), hidden=arch.hidden_size, layers=arch.num_layers,
        heads=arch.num_attention_heads, groups=arch.num_query_groups, head_dim=arch.kv_channels,
        ffn=arch.ffn_hidden_size, vocab=arch.vocab_size, padded_vocab=arch.vocab_size, tied=arch.tie_word_embeddings,
        qkv_bias=arch.qkv_bias, qk_norm=arch.qk_layernorm, num_experts=moe.num_experts if moe else 0,
        moe_ffn=moe.ffn_hidden_size if moe else 0, shared_ffn=moe.shared_expert_ffn_hidden_size if moe else 0,
        top_k=moe.top_k if moe else 0)


class _Mapping:
    """Megatron name (global layer, rank-local expert) on an expert-parallel rank -> the rule instances it holds:
    one, or every local expert of a stacked name."""

    def __init__(self, arch: ResolvedArchitecture, keys, tp: int, ep: int):
        self.dims = model_dims(arch)
        te, grouped = mcore_traits(keys)
        schemes = (("gmm",) if any(k.endswith(".experts.weight1") for k in keys) else ()) + \
            (("megablocks_mcore",) if any(k.endswith(".mlp.moe.experts.mlp.w1") for k in keys) else ()) + \
            FORMATS["mcore"].resolve_schemes(te, grouped)
        # one pipeline stage: every layer keeps its global number
        self.place = Placement(self.dims, ParallelLayout(tp=tp, ep=ep), 1, schemes, None)
        self.names: dict[tuple[str, Optional[int]], list[Instance]] = {}
        self.stacked: set[str] = set()
        for inst in instances(self.dims, format_rules(self.dims, schemes, "engine")):
            for slot in self.place.slots(inst):
                self.names.setdefault((slot.name, self.place.ep_rank(inst)), []).append(inst)
                if slot.stacked:
                    self.stacked.add(slot.name)
                if self.dims.tied and inst.rule.scope == "first":
                    self.names[(_TIED_HEAD, None)] = [inst]

    def __call__(self, key: str, ep_rank: int) -> list[Instance]:
        found = self.names.get((key, ep_rank)) or self.names.get((key, None))
        if found is None:
            raise KeyError(f"no Hugging Face tensor for {key} in the {self.dims.family} table")
        return found

    def to_megatron(self, key: str, hf: dict[str, torch.Tensor], tp_rank: int, ep_rank: int) -> torch.Tensor:
        insts, shards = self(key, ep_rank), []
        for inst in insts:
            kind = KINDS[inst.rule.kind]
            canon = kind.fuse(self.dims, *(hf[n] for n in inst.hf_names))
            n = self.place.split_ranks(inst)
            shards.append(canon if n == 1 else kind.split(canon, tp_rank % n, n))
        return stack(shards, insts[0].rule.stack_dim) if key in self.stacked else shards[0]

    def to_hf(self, inst: Instance, shards: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        kind = KINDS[inst.rule.kind]
        return dict(zip(inst.hf_names, kind.unfuse(self.dims, kind.merge(shards))))


def _renumber(key: str, offset: int) -> str:
    m = _LAYER_RE.match(key) if offset else None
    return f"decoder.layers.{int(m.group(1)) + offset}.{m.group(2)}" if m else key


def renumber_layers(state: dict[str, torch.Tensor], offset: int) -> dict[str, torch.Tensor]:
    """Local layer numbers of a pipeline chunk -> global ones."""
    return {_renumber(k, offset): v for k, v in state.items()}


def is_expert_key(key: str) -> bool:
    """Expert parameters are sharded and reduced over the expert-parallel groups, everything else over tensor and
    data parallel (megatron-core's experts, and MegaBlocks' under the megablocks backend)."""
    return ".mlp.experts." in key or ".mlp.moe.experts." in key


def megatron_state_dict(hf: dict[str, torch.Tensor], arch: ResolvedArchitecture, target_keys, *, tp_rank: int = 0,
                        tp_size: int = 1, ep_rank: int = 0, ep_size: int = 1, layer_offset: int = 0) -> dict:
    """The tensors for `target_keys` (a model chunk's own state-dict keys, local layer numbers) from an HF state
    dict, for this rank."""
    keys = [k for k in target_keys if not k.endswith("_extra_state")]
    mapping = _Mapping(arch, keys, tp_size, ep_size)
    return {k: mapping.to_megatron(_renumber(k, layer_offset), hf, tp_rank, ep_rank) for k in keys}


def load_into(model_chunks, hf: dict[str, torch.Tensor], arch: ResolvedArchitecture, *, tp_rank: int, tp_size: int,
              ep_rank: int, ep_size: int, layer_offsets: list[int]) -> None:
    """Copy HF weights into each (unwrapped) model chunk, checking that every parameter got a value."""
    for chunk, offset in zip(model_chunks, layer_offsets):
        own = chunk.state_dict()
        keys = [k for k in own if not k.endswith("_extra_state")]
        if getattr(chunk, "share_embeddings_and_output_weights", False) and "embedding.word_embeddings.weight" in own:
            keys = [k for k in keys if k != "output_layer.weight"]
        values = megatron_state_dict(hf, arch, keys, tp_rank=tp_rank, tp_size=tp_size, ep_rank=ep_rank,
                                     ep_size=ep_size, layer_offset=offset)
        with torch.no_grad():
            for k, v in values.items():
                if tuple(own[k].shape) != tuple(v.shape):
                    raise ValueError(f"{k}: model has {tuple(own[k].shape)}, source gives {tuple(v.shape)}")
                own[k].copy_(v.to(own[k].dtype))


def hf_from_shards(dense: dict[int, dict[str, torch.Tensor]], experts: dict[int, dict[str, torch.Tensor]],
                   arch: ResolvedArchitecture) -> dict[str, torch.Tensor]:
    """Full HF-named tensors from megatron shards with global layer numbers.

    `dense[tp_rank]` holds every non-expert tensor of that tensor-parallel rank (all pipeline stages merged),
    `experts[ep_rank]` the expert tensors of that expert-parallel rank.
    """
    keys = set(dense[0]).union(*experts.values())
    mapping = _Mapping(arch, keys, len(dense), max(len(experts), 1))
    out: dict[str, torch.Tensor] = {}
    for key in sorted(dense[0]):
        if mapping.dims.tied and key == _TIED_HEAD:
            continue  # the last stage's copy of the embedding
        inst = mapping(key, None)[0]
        out.update(mapping.to_hf(inst, [dense[r][key] for r in range(mapping.place.split_ranks(inst))]))
    for ep_rank, part in sorted(experts.items()):
        for key, t in sorted(part.items()):
            insts = mapping(key, ep_rank)
            parts = unstack(t, len(insts), insts[0].rule.stack_dim) if key in mapping.stacked else [t]
            for inst, p in zip(insts, parts):
                out.update(mapping.to_hf(inst, [p]))
    return {k: v.contiguous() for k, v in out.items()}


# ------------------------------------------------------------------------------------------------ HF side


def hf_shapes(arch: ResolvedArchitecture) -> dict[str, tuple[int, ...]]:
    """Every tensor of the model in published-checkpoint naming (experts one by one) with its shape."""
    h, d, v = arch.hidden_size, arch.kv_channels, arch.vocab_size
    q, kv = arch.num_attention_heads * d, arch.num_query_groups * d
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not arch.tie_word_embeddings:
        out["lm_head.weight"] = (v, h)
    moe = arch.moe
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "post_attention_layernorm.weight"] = (h,)
        out.update({a + "q_proj.weight": (q, h), a + "k_proj.weight": (kv, h), a + "v_proj.weight": (kv, h),
                    a + "o_proj.weight": (h, q)})
        if arch.qkv_bias:
            out.update({a + "q_proj.bias": (q,), a + "k_proj.bias": (kv,), a + "v_proj.bias": (kv,)})
        if arch.qk_layernorm:
            out.update({a + "q_norm.weight": (d,), a + "k_norm.weight": (d,)})
        if moe is None:
            f = arch.ffn_hidden_size
            out.update({p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                        p + "mlp.down_proj.weight": (h, f)})
            continue
        f = moe.ffn_hidden_size
        out[p + "mlp.gate.weight"] = (moe.num_experts, h)
        for e in range(moe.num_experts):
            x = f"{p}mlp.experts.{e}."
            out.update({x + "gate_proj.weight": (f, h), x + "up_proj.weight": (f, h), x + "down_proj.weight": (h, f)})
        if moe.shared_expert_ffn_hidden_size:
            s, x = moe.shared_expert_ffn_hidden_size, p + "mlp.shared_expert."
            out.update({x + "gate_proj.weight": (s, h), x + "up_proj.weight": (s, h), x + "down_proj.weight": (h, s)})
            if moe.shared_expert_gate:
                out[p + "mlp.shared_expert_gate.weight"] = (1, h)
    return out


def weight_problems(arch: ResolvedArchitecture, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Missing, unexpected and misshapen tensors, as the CPU engine reports them (a tied model may carry
    lm_head.weight; it is ignored)."""
    want = hf_shapes(arch)
    have = {k: v for k, v in state_dict.items() if not (arch.tie_word_embeddings and k == "lm_head.weight")}
    problems = [f"missing {k}" for k in sorted(set(want) - set(have))[:5]]
    problems += [f"unexpected {k}" for k in sorted(set(have) - set(want))[:5]]
    for k in sorted(set(want) & set(have)):
        if tuple(have[k].shape) != want[k]:
            problems.append(f"{k} has shape {tuple(have[k].shape)}, the model needs {want[k]}")
    return problems
