"""Hugging Face weights (published-checkpoint naming) straight into a built megatron-core model, in memory.

Used to start a run from the same weights as the CPU engine (GPU parity test, benchmark) without a conversion on
disk; the converter (`trainer.convert`) remains the way to produce Megatron checkpoints. The layout facts are
megatron-core's: qkv fused per query group `[q heads of group g; k_g; v_g]`, `linear_fc1 = [gate; up]` with gate and
up split separately under tensor parallelism, row-parallel layers split on the input dimension, vocabulary split on
rows; legacy `GroupedMLP` stores experts as `weight1` of nominal shape `[h, E_local * 2f]` that megatron reads as
`view(E_local, h, 2f)` (per expert the transpose of `[gate; up]`, experts outermost in memory) and `weight2
[E_local * f, h]` (per expert `down_proj` transposed); `SequentialMLP` as `local_experts.{j}.linear_fc*`;
global expert id = ep_rank * E_local + j. TE specs fuse the pre-norms into the following linear
(`linear_qkv.layer_norm_weight`, `linear_fc1.layer_norm_weight`).
"""

from __future__ import annotations

import re

import torch

from trainer.spec.resolve import ResolvedArchitecture


def _split(t: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    if size == 1:
        return t
    return torch.chunk(t, size, dim=dim)[rank]


def _fc1(gate: torch.Tensor, up: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    return torch.cat([_split(gate, 0, rank, size), _split(up, 0, rank, size)], dim=0)


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int) -> torch.Tensor:
    """[H*d, ...], [G*d, ...], [G*d, ...] -> [(H + 2G)*d, ...] grouped per query group (weights or biases)."""
    d = q.shape[0] // heads
    per = heads // groups
    tail = q.shape[1:]
    qg = q.reshape(groups, per * d, *tail)
    kg = k.reshape(groups, d, *tail)
    vg = v.reshape(groups, d, *tail)
    return torch.cat([qg, kg, vg], dim=1).reshape((heads + 2 * groups) * d, *tail)


def megatron_state_dict(hf: dict[str, torch.Tensor], arch: ResolvedArchitecture, target_keys, *, tp_rank: int = 0,
                        tp_size: int = 1, ep_rank: int = 0, ep_size: int = 1, layer_offset: int = 0) -> dict:
    """The tensors for `target_keys` (a model's own state-dict keys) from an HF state dict, for this rank."""
    out: dict[str, torch.Tensor] = {}
    layer_re = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
    moe = arch.moe
    heads, groups = arch.num_attention_heads, arch.num_query_groups
    for key in target_keys:
        if key.endswith("_extra_state"):
            continue
        if key == "embedding.word_embeddings.weight":
            out[key] = _split(hf["model.embed_tokens.weight"], 0, tp_rank, tp_size)
            continue
        if key == "output_layer.weight":
            src = hf.get("lm_head.weight", hf["model.embed_tokens.weight"])
            out[key] = _split(src, 0, tp_rank, tp_size)
            continue
        if key == "decoder.final_layernorm.weight":
            out[key] = hf["model.norm.weight"]
            continue
        m = layer_re.match(key)
        if not m:
            raise KeyError(f"no Hugging Face source for {key}")
        i, rest = int(m.group(1)) + layer_offset, m.group(2)
        p = f"model.layers.{i}."
        attn = p + "self_attn."
        if rest in ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight"):
            out[key] = hf[p + "input_layernorm.weight"]
        elif rest in ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"):
            out[key] = hf[p + "post_attention_layernorm.weight"]
        elif rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
            kind = rest.rsplit(".", 1)[1]
            fused = fuse_qkv(hf[attn + f"q_proj.{kind}"], hf[attn + f"k_proj.{kind}"], hf[attn + f"v_proj.{kind}"],
                             heads, groups)
            out[key] = _split(fused, 0, tp_rank, tp_size)
        elif rest == "self_attention.linear_proj.weight":
            out[key] = _split(hf[attn + "o_proj.weight"], 1, tp_rank, tp_size)
        elif rest == "self_attention.q_layernorm.weight":
            out[key] = hf[attn + "q_norm.weight"]
        elif rest == "self_attention.k_layernorm.weight":
            out[key] = hf[attn + "k_norm.weight"]
        elif rest == "mlp.linear_fc1.weight":
            out[key] = _fc1(hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"], tp_rank, tp_size)
        elif rest == "mlp.linear_fc2.weight":
            out[key] = _split(hf[p + "mlp.down_proj.weight"], 1, tp_rank, tp_size)
        elif rest == "mlp.router.weight":
            out[key] = hf[p + "mlp.gate.weight"]
        elif rest == "mlp.shared_experts.linear_fc1.weight":
            s = p + "mlp.shared_expert."
            out[key] = _fc1(hf[s + "gate_proj.weight"], hf[s + "up_proj.weight"], tp_rank, tp_size)
        elif rest == "mlp.shared_experts.linear_fc2.weight":
            out[key] = _split(hf[p + "mlp.shared_expert.down_proj.weight"], 1, tp_rank, tp_size)
        elif rest == "mlp.shared_experts.gate_weight":
            out[key] = hf[p + "mlp.shared_expert_gate.weight"]
        elif rest in ("mlp.experts.weight1", "mlp.experts.weight2"):
            local = moe.num_experts // ep_size
            mats = []
            for j in range(local):
                e = f"{p}mlp.experts.{ep_rank * local + j}."
                if rest.endswith("weight1"):  # per expert [h, 2f] = [gate; up]^T
                    mats.append(torch.cat([hf[e + "gate_proj.weight"], hf[e + "up_proj.weight"]], 0).t())
                else:  # per expert [f, h] = down^T
                    mats.append(hf[e + "down_proj.weight"].t())
            # megatron reads weight1 as view(E_local, h, 2f) and weight2 as view(E_local, f, h): experts are the
            # outermost axis of the memory in both, whatever the nominal 2-D shape says
            stacked = torch.stack(mats, 0)
            out[key] = (stacked.reshape(stacked.shape[1], -1) if rest.endswith("weight1")
                        else stacked.reshape(-1, stacked.shape[-1])).contiguous()
        else:
            em = re.match(r"^mlp\.experts\.(?:local_experts\.(\d+)\.linear_fc([12])\.weight|linear_fc([12])\.weight(\d+))$",
                          rest)
            if not em:
                raise KeyError(f"no Hugging Face source for {key}")
            j = int(em.group(1) if em.group(1) is not None else em.group(4))
            which = em.group(2) or em.group(3)
            e = f"{p}mlp.experts.{ep_rank * (moe.num_experts // ep_size) + j}."
            if which == "1":
                out[key] = torch.cat([hf[e + "gate_proj.weight"], hf[e + "up_proj.weight"]], 0)
            else:
                out[key] = hf[e + "down_proj.weight"]
    return out


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
