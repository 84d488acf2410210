"""The megablocks backend's sharded state dict (qwen_trainer.engines.megatron.megablocks_mlp), checked without
CUDA or the megablocks package: MegaBlocks' parameters of each expert-parallel rank are made by the converter's
mapping (the `megablocks_mcore` scheme the engine loads them with), cut by `expert_sharded_state_dict` into
regions of megatron-core's global expert tensors, and put together again. The result must be exactly the
megatron-core backend's tensors for the same HF weights (the layout the converter's torch_dist reader and a
megatron-core resume expect), every element written by exactly one main replica, and the factories' merge must
give back MegaBlocks' parameters."""

from __future__ import annotations

import re
import warnings

import pytest

pytest.importorskip("megatron.core")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

from qwen_trainer.engines.megatron.megablocks_mlp import (  # noqa: E402
    MCORE_FC1,
    MCORE_FC2,
    MCORE_ROUTER,
    ROUTER,
    V1,
    W1,
    W2,
    expert_sharded_state_dict,
)
from qwen_trainer.engines.megatron.testing import hf_reference, job_spec  # noqa: E402
from qwen_trainer.engines.megatron.weights import megatron_state_dict  # noqa: E402
from qwen_trainer.spec import resolve_architecture  # noqa: E402

LAYERS, EXPERTS, FFN, HIDDEN = 2, 4, 32, 64
ARCH = dict(numLayers=LAYERS, hiddenSize=HIDDEN, numAttentionHeads=4, numQueryGroups=2, ffnHiddenSize=128,
            vocabSize=256, maxPositionEmbeddings=64, kvChannels=16)


@pytest.fixture(scope="module")
def weights():
    spec = job_spec("qwen3", "A3B", architecture=ARCH, moe=dict(numExperts=EXPERTS, topK=2, ffnHiddenSize=FFN),
                    backend="megablocks")
    arch = resolve_architecture(spec)
    _, hf = hf_reference(arch)
    return arch, hf


def _megablocks_params(arch, hf, layer: int, ep_rank: int, ep_size: int) -> dict:
    keys = [f"decoder.layers.{layer}.mlp.{n}" for n in (ROUTER, W1, V1, W2)]
    sd = megatron_state_dict(hf, arch, keys, ep_rank=ep_rank, ep_size=ep_size)
    return {n: sd[f"decoder.layers.{layer}.mlp.{n}"] for n in (ROUTER, W1, V1, W2)}


def _mcore_reference(arch, hf) -> dict[str, torch.Tensor]:
    """megatron-core's global tensors [layers, experts, ...] (SequentialMLP naming, one rank)."""
    out = {}
    for name, per_expert in ((MCORE_FC1, "linear_fc1"), (MCORE_FC2, "linear_fc2")):
        keys = [f"decoder.layers.{l}.mlp.experts.local_experts.{e}.{per_expert}.weight"
                for l in range(LAYERS) for e in range(EXPERTS)]
        sd = megatron_state_dict(hf, arch, keys)
        out[name] = torch.stack([torch.stack([sd[f"decoder.layers.{l}.mlp.experts.local_experts.{e}.{per_expert}.weight"]
                                              for e in range(EXPERTS)]) for l in range(LAYERS)])
    keys = [f"decoder.layers.{l}.mlp.router.weight" for l in range(LAYERS)]
    sd = megatron_state_dict(hf, arch, keys)
    out[MCORE_ROUTER] = torch.stack([sd[k] for k in keys])
    return out


@pytest.mark.parametrize("ep_size", [1, 2, 4])
def test_every_rank_its_experts_in_megatron_cores_layout(weights, ep_size):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories, apply_factory_merges

    arch, hf = weights
    reference = _mcore_reference(arch, hf)
    assembled = {k: torch.full_like(v, float("nan")) for k, v in reference.items()}
    written = {k: torch.zeros(v.shape, dtype=torch.int) for k, v in reference.items()}
    for layer in range(LAYERS):
        for ep_rank in range(ep_size):
            params = _megablocks_params(arch, hf, layer, ep_rank, ep_size)
            assert params[W1].shape == (EXPERTS // ep_size * FFN, HIDDEN)  # MegaBlocks' local experts, stacked
            prefix = f"decoder.layers.{layer}.mlp."
            sharded = expert_sharded_state_dict(prefix, params, ((0, layer, LAYERS),), num_experts=EXPERTS,
                                                ep_rank=ep_rank, ep_size=ep_size, tp_rank=0, dp_rank=ep_rank,
                                                expert_dp_rank=0)
            assert sorted(sharded) == sorted(prefix + n for n in (ROUTER, W1, V1, W2))  # the module's own keys
            built = dict(sharded)
            apply_factories(built)
            for local_key, st in built.items():
                assert isinstance(st, ShardedTensor), local_key
                key = re.sub(r"^decoder\.layers\.\d+\.mlp\.", "", st.key)
                assert tuple(st.global_shape) == tuple(reference[key].shape), (key, st.global_shape)
                region = tuple(slice(o, o + n) for o, n in
                               zip(st.global_offset, (1,) * st.prepend_axis_num + tuple(st.local_shape)))
                assembled[key][region] = st.data.reshape(assembled[key][region].shape)
                if all(r == 0 for r in st.replica_id):
                    written[key][region] += 1
            # the optimizer's and the load's way back: the factories' merge gives MegaBlocks' parameters again
            factories = {k: v for k, v in sharded.items() if k != prefix + ROUTER}
            merged = apply_factory_merges({k: built[k].data.clone() for k in factories}, factories)
            for name in (W1, V1, W2):
                assert torch.equal(merged[prefix + name], params[name]), name
    for key, ref in reference.items():
        assert torch.equal(assembled[key], ref), key
        assert bool((written[key] == 1).all()), f"{key}: every element needs exactly one main replica"


def test_parameters_are_views_and_unknown_state_is_refused(weights):
    arch, hf = weights
    params = _megablocks_params(arch, hf, 0, 1, 2)
    sharded = expert_sharded_state_dict("m.", params, ((0, 0, LAYERS),), num_experts=EXPERTS, ep_rank=1, ep_size=2,
                                        tp_rank=0, dp_rank=1, expert_dp_rank=0)
    st = sharded["m." + W2].build()
    assert st.data.data_ptr() == params[W2].data_ptr()  # no copy of the experts at save time
    with pytest.raises(RuntimeError, match="no place in the sharded checkpoint"):
        expert_sharded_state_dict("m.", {**params, "moe.experts.mlp.b1": torch.zeros(1)}, (), num_experts=EXPERTS,
                                  ep_rank=0, ep_size=2, tp_rank=0, dp_rank=0, expert_dp_rank=0)
