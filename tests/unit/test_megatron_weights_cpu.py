"""The megatron engine's in-memory weights mapping and the converter are one mapping: for every family and MoE
variant, what the engine loads on each (tp, pp, vpp chunk, ep) rank is the converter's per-rank mcore checkpoint
for the same HF weights, bit for bit and key for key, in every naming scheme; and the engine's real megatron-core
model, loaded through load_into, has the converter's state dict."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("megatron.core")
warnings.filterwarnings("ignore")

from qwen_trainer.checkpoint.layout import RANK_FILE, rank_dir_name  # noqa: E402
from qwen_trainer.checkpoint.weights import write_hf_folder  # noqa: E402
from qwen_trainer.convert import ParallelLayout, convert  # noqa: E402
from qwen_trainer.engines.hf_model import hf_config  # noqa: E402
from qwen_trainer.engines.megatron import kernels  # noqa: E402
from qwen_trainer.engines.megatron.config import (  # noqa: E402
    Capabilities,
    EngineOptions,
    gpt_model_kwargs,
    layer_spec,
    plan_model,
)
from qwen_trainer.engines.megatron.testing import family_cases, hf_reference, job_spec, tiny_architecture  # noqa: E402
from qwen_trainer.engines.megatron.weights import load_into, megatron_state_dict  # noqa: E402
from qwen_trainer.spec import resolve_architecture  # noqa: E402

TINY = tiny_architecture(4)
CASES = family_cases(4)
NAMINGS = {"local": {}, "te": dict(transformer_engine_keys=True),
           "te-grouped-experts": dict(transformer_engine_keys=True, expert_layout="grouped")}


def _arch(case):
    family, size, kw = CASES[case]
    return resolve_architecture(job_spec(family, size, training={"seqLength": 64}, **kw))


def _converted(arch, tmp_path, layout, **naming):
    _, weights = hf_reference(arch, seed=1)
    write_hf_folder(tmp_path / "hf", weights, hf_config(arch))
    convert(tmp_path / "hf", "hf", tmp_path / "mcore", "mcore", layout=layout, progress=False, **naming)
    return weights, tmp_path / "mcore" / "release"


def _tensors(state: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("naming", sorted(NAMINGS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_engine_rank_tensors_are_the_converters_checkpoint(case, naming, tmp_path):
    arch = _arch(case)
    if naming == "te-grouped-experts" and arch.moe is None:
        pytest.skip("no experts")
    ep = 2 if arch.moe else 1
    layout = ParallelLayout(tp=2, pp=2, ep=ep, etp=1, vpp=2)  # the engine's experts are whole on each rank
    weights, release = _converted(arch, tmp_path, layout, **NAMINGS[naming])
    per_chunk = arch.num_layers // (layout.pp * layout.vpp)
    for tp in range(layout.tp):
        for pp in range(layout.pp):
            for e in range(ep):
                saved = torch.load(release / rank_dir_name(tp, pp, e, pp_size=layout.pp, ep_size=ep) / RANK_FILE,
                                   weights_only=False)
                for chunk in range(layout.vpp):
                    theirs = _tensors(saved[f"model{chunk}"])
                    mine = megatron_state_dict(weights, arch, list(theirs), tp_rank=tp, tp_size=layout.tp,
                                               ep_rank=e, ep_size=ep,
                                               layer_offset=(chunk * layout.pp + pp) * per_chunk)
                    assert sorted(mine) == sorted(theirs)
                    for k, v in theirs.items():
                        assert mine[k].shape == v.shape and torch.equal(mine[k], v), (tp, pp, e, chunk, k)


def _engine_model(case, monkeypatch):
    """The megatron engine's own model for the case (its layer spec and modules), one rank, CPU, fp32."""
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from qwen_trainer.engines.megatron.loss import make_model_class

    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    family, size, kw = CASES[case]
    spec = job_spec(family, size, training={"seqLength": 64}, **kw)
    opts = EngineOptions(use_cpu_initialization=True, grad_accum_fusion=False, experts="sequential")
    plan = plan_model(resolve_architecture(spec), spec, opts, Capabilities())
    config = TransformerConfig(**dict(plan.config_kwargs, recompute_granularity=None, recompute_modules=None,
                                      bf16=False, params_dtype=torch.float32))
    block = TransformerBlockSubmodules(layer_specs=[layer_spec(plan, config)] * config.num_layers,
                                       layer_norm=kernels.rmsnorm_spec(compiled=False))
    return make_model_class()(config=config, transformer_layer_spec=block, **gpt_model_kwargs(plan))


@pytest.mark.parametrize("case", sorted(CASES))
def test_model_loaded_by_the_engine_has_the_converters_state_dict(case, megatron_world, monkeypatch, tmp_path):
    arch = _arch(case)
    weights, release = _converted(arch, tmp_path, ParallelLayout())
    theirs = _tensors(torch.load(release / "mp_rank_00" / RANK_FILE, weights_only=False)["model"])
    model = _engine_model(case, monkeypatch)
    load_into([model], weights, arch, tp_rank=0, tp_size=1, ep_rank=0, ep_size=1, layer_offsets=[0])
    mine = _tensors(model.state_dict())
    mine = {k: v for k, v in mine.items() if not k.endswith("_extra_state")}
    assert sorted(mine) == sorted(theirs)
    for k, v in theirs.items():
        assert torch.equal(mine[k], v), k


def _flat(nested: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """Megatron-LM's nested model dict (language_model -> encoder -> ...) with dotted names."""
    out = {}
    for k, v in nested.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor):
            out[prefix + k] = v
    return out


def test_megablocks_backend_experts_are_the_converters_megablocks_checkpoint(tmp_path):
    """The megablocks backend's layers are megatron-core layers whose MLP is MegaBlocks' dMoE
    (`decoder.layers.L.mlp.moe...`): its experts on each expert-parallel rank are the converter's MegaBlocks
    checkpoint's (`language_model.encoder.layers.L.mlp.moe...`), and they gather back to the HF weights."""
    from qwen_trainer.engines.megatron.weights import hf_from_shards

    arch = _arch("qwen3-moe")
    _, weights = hf_reference(arch, seed=1)
    write_hf_folder(tmp_path / "hf", weights, hf_config(arch))
    ep = 2
    convert(tmp_path / "hf", "hf", tmp_path / "mb", "megablocks", layout=ParallelLayout(ep=ep), progress=False)
    release = tmp_path / "mb" / "release"
    legacy, engine_prefix = "language_model.encoder.layers.", "decoder.layers."
    experts = {}
    for e in range(ep):
        saved = torch.load(release / rank_dir_name(0, 0, e, pp_size=1, ep_size=ep, order="ep_pp") / RANK_FILE,
                           weights_only=False)["model"]
        theirs = {k.replace(legacy, engine_prefix): v for k, v in _flat(saved).items() if ".mlp.moe." in k}
        assert any(k.endswith("mlp.moe.experts.mlp.w1") for k in theirs)
        mine = megatron_state_dict(weights, arch, list(theirs), ep_rank=e, ep_size=ep)
        for k, v in theirs.items():
            assert torch.equal(mine[k], v), (e, k)
        experts[e] = {k: v for k, v in mine.items() if ".experts." in k}
    dense = {k: v for k, v in megatron_state_dict(weights, arch, list(theirs)).items() if ".experts." not in k}
    back = hf_from_shards({0: dense}, experts, arch)
    for name, t in back.items():
        assert torch.equal(t, weights[name]), name
