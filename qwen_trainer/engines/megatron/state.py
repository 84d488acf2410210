"""The megatron engine's checkpointable state, in the two shapes the checkpoint store writes.

Sharded (every training checkpoint): megatron's sharded state dicts of the model chunks and the optimizer, which
every rank saves and loads for its own part through dist_checkpointing (qwen_trainer.checkpoint.sharded) and which
reshard to another layout on load: weights always, the plain optimizer's state too, the distributed optimizer's
across a changed data-parallel size, or any change where it was saved 'fully_reshardable' (docs/checkpoints.md).

Gathered (MegaBlocks, whose expert modules have no sharded state dict, and the checkpoint benchmark's baseline):
the weights in Hugging Face naming and every rank's optimizer shard collected on rank 0, which writes them in the
converter's per-rank layout.
"""

from __future__ import annotations

import re
from typing import Optional

import torch

from .layout import DP_RESHARDABLE, FULLY_RESHARDABLE, optimizer_sharding

OPTIMIZER_FORMAT = "megatron-per-rank-v1"


def sync_params(chunks) -> None:
    """With the distributed optimizer and overlapped parameter all-gather, the weights a step updated reach the
    other data-parallel ranks only in the next training forward pass; evaluation and checkpoints need them now (as
    Megatron-LM syncs before evaluating or saving)."""
    for m in chunks:
        c = m.ddp_config
        if c.use_distributed_optimizer and c.overlap_param_gather:
            m.start_param_sync(force_sync=True)


# ------------------------------------------------------------------------------------------------ sharded

def sharded_state_dict(model, with_optimizer: bool, is_loading: bool, optimizer_sharding: str = DP_RESHARDABLE) -> dict:
    """Megatron's sharded state dicts of the model chunks (keys `model` or `model0..`, as Megatron-LM names them)
    and, if asked, of the optimizer: the plain optimizer's cut like the parameters (loadable at any layout), the
    distributed optimizer's in `optimizer_sharding` (layout.DP_RESHARDABLE or FULLY_RESHARDABLE; a load asks for the
    format the checkpoint was saved in). `model` is build.Model."""
    from qwen_trainer.checkpoint.sharded import SHARDED_STATE_METADATA

    md = dict(SHARDED_STATE_METADATA, distrib_optim_sharding_type=optimizer_sharding)
    if optimizer_sharding == FULLY_RESHARDABLE:
        # gathered over gloo onto the first data-parallel rank only (host memory), not all-gathered onto every
        # rank's GPU
        md["distrib_optim_fully_reshardable_mem_efficient"] = True
    if not model.chunks[0].ddp_config.use_distributed_optimizer:
        # megatron prefixes a chained optimizer's keys (`chained_<i>.`) whenever a distributed-optimizer format is
        # named; MoE chains a dense and an expert optimizer at EP > 1 and only one at EP 1, so the plain optimizer's
        # keys would change with the layout
        md.pop("distrib_optim_sharding_type", None)
    chunks = model.unwrapped()
    if len(chunks) == 1:
        out = {"model": chunks[0].sharded_state_dict(metadata=md)}
    else:
        out = {f"model{i}": c.sharded_state_dict(metadata=md) for i, c in enumerate(chunks)}
    if with_optimizer:
        if is_loading:
            init_optimizer_state(model.optimizer)
        out["optimizer"] = model.optimizer.sharded_state_dict(dict(out), is_loading=is_loading, metadata=md)
    return out


def holds_optimizer(saved_keys) -> bool:
    """Whether a torch_dist checkpoint's tensor names include optimizer state: `optimizer.*`, or
    `chained_<i>.optimizer.*` where megatron chains several optimizers (MoE: one for the dense parameters, one for
    the experts) and keeps their keys apart."""
    return any(k.startswith("optimizer.") or re.match(r"chained_\d+\.optimizer\.", k) for k in saved_keys)


def chain_length(optimizer) -> int:
    return len(_sub_optimizers(optimizer))


def optimizer_chains(folder) -> Optional[int]:
    """How many optimizers megatron chained in the run that saved a torch_dist folder (its common state keeps one
    entry per optimizer where there were several), or None where that cannot be read."""
    from pathlib import Path

    try:
        common = torch.load(Path(folder) / "common.pt", map_location="cpu", weights_only=False)
    except (OSError, RuntimeError):
        return None
    saved = common.get("optimizer") if isinstance(common, dict) else None
    if not isinstance(saved, dict):
        return None
    numbered = [k for k in saved if isinstance(k, int)]
    return len(numbered) if numbered else 1


def missing_optimizer_keys(sharded: dict, saved_keys) -> list[str]:
    """The optimizer tensors `sharded` (a sharded state dict for loading) asks for that the checkpoint lacks: a
    checkpoint written by another kind of optimizer, or by this engine before its keys were made layout-free."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    saved = set(saved_keys)
    asked = {v.key for v in nested_values(sharded.get("optimizer", {})) if isinstance(v, ShardedTensor)}
    return sorted(asked - saved)


def init_optimizer_state(optimizer) -> None:
    """Adam's state of every parameter that has none yet (zero moments, step 0), so that a sharded state dict for
    loading can be made before the first step. megatron's distributed optimizer reads the step from its torch Adam's
    per-parameter state when neither Transformer Engine nor Apex provides the optimizer, and refuses an empty state
    (`assert len(steps) == 1`): without this, a fresh process could not load a distributed optimizer's checkpoint."""
    for opt in _sub_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state[p]
                if "exp_avg" not in st:
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if "step" not in st:
                    # where torch's Adam would put it: beside the parameter for fused/capturable, else on the host
                    on_device = group.get("fused") or group.get("capturable")
                    st["step"] = torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu")


def load_sharded_state(model, state: dict, with_optimizer: bool, optimizer_sharding: str = DP_RESHARDABLE,
                       regroup: bool = False) -> None:
    """`regroup`: the optimizer's state saved by a run that chained another number of optimizers (see
    _load_regrouped and _load_fully_reshardable)."""
    chunks = model.unwrapped()
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(state["model" if len(chunks) == 1 else f"model{i}"], strict=True)
    if with_optimizer:
        if optimizer_sharding == FULLY_RESHARDABLE and model.chunks[0].ddp_config.use_distributed_optimizer:
            _load_fully_reshardable(model.optimizer, state["optimizer"], regroup)
        elif regroup:
            _load_regrouped(model.optimizer, state["optimizer"])
        else:
            model.optimizer.load_state_dict(state["optimizer"])
        restore_steps(model.optimizer)
    else:
        model.optimizer.reload_model_params()  # fp32 master weights follow the loaded weights


def _load_regrouped(optimizer, loaded: dict) -> None:
    """The plain optimizer's state from a checkpoint whose run chained another number of optimizers (a MoE model:
    megatron keeps the experts' parameters in an optimizer of their own at expert parallel > 1 only).

    Its tensors (fp32 main weights, Adam's moments) are named by parameter whatever the chain, so the request made
    for this run's chain finds them all. What a chain keeps per optimizer in the checkpoint's common part (its
    parameter groups and the shared step) no longer lines up with this run's optimizers; dist_checkpointing puts
    it beside the tensors, under the saved chain's keys. Each optimizer here takes its own tensors, its own current
    parameter groups (this run's settings: learning rate and weight decay come from the restored scheduler and the
    spec anyway) and the saved step, which megatron keeps equal across a chain."""
    subs = _sub_optimizers(optimizer)
    step = _saved_step(loaded, len(subs), lambda part: part["optimizer"]["state"].get("common_step"))
    for sub, part in zip(subs, _parts_for_chain(loaded, len(subs))):
        current = sub.state_dict()
        saved_state = {k: v for k, v in part["optimizer"]["state"].items() if k != "common_step"}
        if step is not None:
            saved_state["common_step"] = step
        regrouped = {**current, "optimizer": {"state": saved_state,
                                              "param_groups": current["optimizer"]["param_groups"]},
                     "fp32_from_fp16_params": part["fp32_from_fp16_params"]}
        sub.load_state_dict(regrouped)
    if len(subs) > 1:
        optimizer._synchronize_steps()


def _parts_for_chain(loaded: dict, chained_now: int) -> list[dict]:
    """The loaded tensors of each optimizer of this run's chain (the request's structure)."""
    return [loaded] if chained_now == 1 else [loaded[i] for i in range(chained_now)]


def _saved_step(loaded: dict, chained_now: int, read):
    """The step the checkpoint's optimizers kept, read by `read` from the first of the saved chain's common parts
    that has one (None if none has). With another chain than this run's, the saved common parts sit under the
    saved chain's keys: one optimizer's at the top, several numbered."""
    if chained_now > 1:
        candidates = [loaded]
    else:
        candidates = [loaded[k] for k in sorted(k for k in loaded if isinstance(k, int))]
    for c in candidates:
        try:
            step = read(c)
        except (KeyError, IndexError, TypeError):
            continue
        if step is not None:
            return step
    return None


def _load_fully_reshardable(optimizer, saved, regroup: bool = False) -> None:
    """megatron's load of a distributed optimizer's 'fully_reshardable' state, where the optimizer is torch's Adam.
    megatron's own (DistributedOptimizer.load_state_dict) first gives every parameter's Adam state a step, as torch's
    Adam keeps one there, then copies the checkpoint's tensors into every entry of that state, and the checkpoint
    holds no per-parameter step (KeyError 'step'). So the common part (groups, steps, scaler) loads through megatron's
    load_state_dict without the parameters' state, then the parameters' state through megatron's loader for it with
    the steps set aside meanwhile; restore_steps then sets every step from the groups.

    `regroup`: saved by a run that chained another number of optimizers (MoE, expert parallel 1 against more).
    The parameters' state is named by parameter, so this run's request found it; each optimizer keeps its current
    parameter groups with the saved step, as _load_regrouped does for the plain optimizer."""
    subs = _sub_optimizers(optimizer)
    if regroup:
        step = _saved_step(saved, len(subs), lambda part: part["optimizer"]["param_groups"][0]["step"])
        parts = []
        for sub, mine in zip(subs, _parts_for_chain(saved, len(subs))):
            current = sub.state_dict()
            if step is not None:
                for group in current["optimizer"]["param_groups"]:
                    group["step"] = step
            parts.append({**current, "param_state": mine["param_state"]})
    elif len(subs) == 1:
        parts = [saved]
    else:
        parts = [v for _, v in sorted(saved.items())] if isinstance(saved, dict) else list(saved)
        if len(parts) != len(subs):
            raise RuntimeError(f"the checkpoint holds {len(parts)} optimizers' state and this run chains {len(subs)}")
    for opt, part in zip(subs, parts):
        part = dict(part)
        param_state = part.pop("param_state", None)
        opt.load_state_dict(part)
        if param_state is None:
            continue
        inner = opt.optimizer
        steps = {p: st.pop("step") for p, st in inner.state.items() if "step" in st}
        opt.load_parameter_state_from_fully_reshardable(param_state)
        for p, step in steps.items():
            inner.state[p]["step"] = step
    if len(subs) > 1:
        optimizer._synchronize_steps()


def restore_steps(optimizer) -> None:
    """Adam's step count of every parameter from its group, each in a tensor of its own, after a sharded load.

    megatron's distributed optimizer keeps the step in its parameter groups in the checkpoint. Without Transformer
    Engine or Apex its load gives every parameter's state one shared step tensor (torch's Adam then adds 1 to it once
    per parameter at every step), and its 'dp_reshardable' load then puts back the step each state held before the
    load (0 in a fresh process): the bias correction of the first steps after a resume would be wrong."""
    for opt in _sub_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in inner.param_groups:
            if "step" not in group:
                continue
            on_device = group.get("fused") or group.get("capturable")
            for p in group["params"]:
                if p in inner.state:
                    inner.state[p]["step"] = torch.tensor(float(group["step"]), dtype=torch.float32,
                                                          device=p.device if on_device else "cpu")


def moved_fields(saved_layout: Optional[dict], now: dict) -> list[str]:
    """The model-parallel fields that changed since the distributed optimizer's state was saved (its shards cannot
    follow those)."""
    from qwen_trainer.checkpoint.sharded import MODEL_PARALLEL_FIELDS

    if not saved_layout or not saved_layout.get("distributed_optimizer") or \
            optimizer_sharding(saved_layout) == FULLY_RESHARDABLE:
        return []
    return [f for f in MODEL_PARALLEL_FIELDS if saved_layout.get(f) != now.get(f)]


# ------------------------------------------------------------------------------------------------ gathered

def _local_shards(model, moe: bool) -> tuple[Optional[dict], Optional[dict]]:
    """(dense tensors, expert tensors) this rank contributes: dense from data-parallel rank 0, experts from
    expert-data-parallel rank 0; global layer numbers, on CPU."""
    from megatron.core import parallel_state as ps

    from .weights import is_expert_key, renumber_layers

    dense_wanted = ps.get_data_parallel_rank() == 0
    expert_wanted = moe and ps.get_expert_data_parallel_rank() == 0
    dense, experts = {}, {}
    for chunk, offset in zip(model.unwrapped(), model.layer_offsets):
        own = {name: param.detach() for name, param in chunk.named_parameters()}
        for k, v in renumber_layers(own, offset).items():
            target = experts if is_expert_key(k) else dense
            if (target is experts and expert_wanted) or (target is dense and dense_wanted):
                target[k] = v.detach().to("cpu", copy=True)
    return (dense if dense_wanted else None), (experts if expert_wanted else None)


def gather_hf_weights(model, arch, gloo_group) -> Optional[dict[str, torch.Tensor]]:
    """Collective: the full weights in Hugging Face naming on rank 0 (None elsewhere)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from .weights import hf_from_shards

    dense, experts = _local_shards(model, arch.moe is not None)
    mine = {"tp": ps.get_tensor_model_parallel_rank(), "ep": ps.get_expert_model_parallel_rank(),
            "dense": dense, "experts": experts}
    everyone = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, everyone, dst=0, group=gloo_group)
    if dist.get_rank() != 0:
        return None
    by_tp: dict[int, dict] = {}
    by_ep: dict[int, dict] = {}
    for part in everyone:
        if part["dense"] is not None:
            by_tp.setdefault(part["tp"], {}).update(part["dense"])
        if part["experts"] is not None:
            by_ep.setdefault(part["ep"], {}).update(part["experts"])
    return hf_from_shards(by_tp, by_ep, arch)


def _sub_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def local_optimizer_state(optimizer) -> dict:
    """This rank's fp32 master weights, Adam moments and loss scaler, on the host."""
    out = []
    for opt in _sub_optimizers(optimizer):
        inner = opt.optimizer
        params = [p for g in inner.param_groups for p in g["params"]]
        scaler = getattr(opt, "grad_scaler", None)
        out.append({"main_params": [p.detach().to("cpu", copy=True) for p in params],
                    "state": _to_cpu(inner.state_dict()["state"]),
                    "grad_scaler": scaler.state_dict() if scaler is not None else None})
    return {"optimizers": out}


def gather_optimizer_state(optimizer, layout: dict, gloo_group) -> Optional[dict]:
    """Collective: every rank's optimizer state on rank 0, in OPTIMIZER_FORMAT (None elsewhere)."""
    import torch.distributed as dist

    local = local_optimizer_state(optimizer)
    everyone = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(local, everyone, dst=0, group=gloo_group)
    if everyone is None:
        return None
    return {"format": OPTIMIZER_FORMAT, "layout": layout, "ranks": everyone}


def restore_optimizer_state(optimizer, mine: list[dict]) -> None:
    """This rank's part of a gathered optimizer state, into an optimizer of the same layout."""
    subs = _sub_optimizers(optimizer)
    problems = [] if len(mine) == len(subs) else [f"{len(mine)} optimizers saved, {len(subs)} built"]
    for opt, saved in zip(subs, mine):
        params = [p for g in opt.optimizer.param_groups for p in g["params"]]
        if [tuple(p.shape) for p in params] != [tuple(t.shape) for t in saved["main_params"]]:
            problems.append("parameter shards differ")
    if problems:
        raise RuntimeError(f"optimizer state does not fit this model: {'; '.join(problems)}")
    with torch.no_grad():
        for opt, saved in zip(subs, mine):
            inner = opt.optimizer
            params = [p for g in inner.param_groups for p in g["params"]]
            for p, t in zip(params, saved["main_params"]):
                p.copy_(t)
            current = inner.state_dict()
            current["state"] = saved["state"]
            inner.load_state_dict(current)
            scaler = getattr(opt, "grad_scaler", None)
            if scaler is not None and saved.get("grad_scaler") is not None:
                scaler.load_state_dict(saved["grad_scaler"])
    # The model's bf16 weights came from the same checkpoint and are the rounded master weights already.
