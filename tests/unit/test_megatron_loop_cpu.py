"""The megatron engine (qwen_trainer.engines.megatron.MegatronEngine), the parts that run without a GPU: the data-parallel rank order
against megatron's own rank generator, the HF tensor list against transformers' models, the gather of TP/PP/EP
shards back into full HF-named tensors (round trip through the loader's split), the loss normalisation against the
CPU engine's formulas, and the engine selection."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

pytest.importorskip("megatron.core")
warnings.filterwarnings("ignore")

from qwen_trainer.engines.megatron import kernels as kernels  # noqa: E402
from qwen_trainer.engines.megatron.config import (  # noqa: E402
    Capabilities,
    EngineOptions,
    gpt_model_kwargs,
    layer_spec,
    plan_model,
)
from qwen_trainer.engines.megatron.layout import data_parallel_layout  # noqa: E402
from qwen_trainer.engines.megatron.loss import LossScaling  # noqa: E402
from qwen_trainer.engines.megatron.testing import family_cases, hf_reference, job_spec, tiny_architecture  # noqa: E402
from qwen_trainer.engines.megatron.weights import (  # noqa: E402
    hf_from_shards,
    hf_shapes,
    is_expert_key,
    megatron_state_dict,
    renumber_layers,
    weight_problems,
)
from qwen_trainer.errors import UserError  # noqa: E402
from qwen_trainer.spec import resolve_architecture  # noqa: E402

TINY = tiny_architecture()
CASES = family_cases()


def _spec(case, **extra):
    family, size, kw = CASES[case]
    return job_spec(family, size, training={"seqLength": 64}, **kw, **extra)


# ------------------------------------------------------------------------------------------------ rank order


@pytest.mark.parametrize("world, tp, pp, cp, ep", [(2, 2, 1, 1, 1), (2, 1, 1, 1, 2), (4, 2, 1, 1, 1), (2, 2, 1, 1, 2),
                                                   (8, 2, 2, 1, 2), (8, 1, 2, 2, 1), (16, 2, 2, 1, 4)])
def test_data_parallel_rank_follows_megatron_rank_order(world, tp, pp, cp, ep):
    from megatron.core.parallel_state import RankGenerator

    spec = _spec("qwen3-moe", parallelism={"tensor": tp, "pipeline": pp, "context": cp, "expert": ep,
                                           "sequenceParallel": tp > 1})
    dp = world // (tp * pp * cp)
    gen = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=cp, order="tp-cp-ep-dp-pp")
    expected = {}
    for group in gen.get_ranks("dp"):
        for i, r in enumerate(group):
            expected[r] = i
    for rank in range(world):
        assert data_parallel_layout(spec, world, rank) == (dp, expected[rank]), rank


def test_layout_that_does_not_divide_is_a_user_error():
    with pytest.raises(UserError, match="do not divide"):
        data_parallel_layout(_spec("qwen2.5-tied", parallelism={"tensor": 2}), 3, 0)
    with pytest.raises(UserError, match="expert 4 x expert-tensor 1 parallel size must divide"):
        data_parallel_layout(_spec("qwen3-moe", parallelism={"expert": 4}), 2, 0)


# ------------------------------------------------------------------------------------------------ HF naming


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_shapes_match_transformers_models(case):
    arch = resolve_architecture(_spec(case))
    _, weights = hf_reference(arch)
    assert {k: tuple(v.shape) for k, v in weights.items()} == hf_shapes(arch)
    assert weight_problems(arch, weights) == []


def test_weight_problems_name_missing_unexpected_and_misshapen():
    arch = resolve_architecture(_spec("qwen2.5-tied"))
    _, weights = hf_reference(arch)
    bad = dict(weights)
    del bad["model.norm.weight"]
    bad["model.extra.weight"] = torch.zeros(1)
    bad["model.embed_tokens.weight"] = torch.zeros(3, 64)
    bad["lm_head.weight"] = torch.zeros(512, 64)  # a tied checkpoint may carry it
    problems = weight_problems(arch, bad)
    assert problems == ["missing model.norm.weight", "unexpected model.extra.weight",
                        "model.embed_tokens.weight has shape (3, 64), the model needs (512, 64)"]


def _model_keys(spec, experts: str, monkeypatch) -> list[str]:
    """State-dict keys of the real megatron-core model for the spec (one rank, CPU)."""
    return [k for k in _cpu_model(spec, experts, monkeypatch).state_dict() if not k.endswith("_extra_state")]


def _cpu_model(spec, experts: str, monkeypatch):
    """The real megatron-core model for the spec (one rank, CPU, fp32)."""
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from qwen_trainer.engines.megatron.loss import make_model_class

    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    arch = resolve_architecture(spec)
    caps = Capabilities(torch_grouped_mm=experts == "torch-grouped")
    opts = EngineOptions(use_cpu_initialization=True, grad_accum_fusion=False, experts=experts)
    plan = plan_model(arch, spec, opts, caps)
    kw = dict(plan.config_kwargs, recompute_granularity=None, recompute_modules=None,
              tensor_model_parallel_size=1, expert_model_parallel_size=1, sequence_parallel=False)
    restore = kernels.install_torch_grouped_gemm() if experts == "torch-grouped" else (lambda: None)
    try:
        config = TransformerConfig(**kw)
        block = TransformerBlockSubmodules(layer_specs=[layer_spec(plan, config)] * config.num_layers,
                                           layer_norm=kernels.rmsnorm_spec(compiled=False))
        model = make_model_class()(config=config, transformer_layer_spec=block, **gpt_model_kwargs(plan))
    finally:
        restore()
    return model


def _stage_keys(keys: list[str], stage: int, layers_per_stage: int, stages: int) -> list[str]:
    """The keys pipeline stage `stage` would own, with its local layer numbers."""
    out = []
    for k in keys:
        m = re.match(r"^decoder\.layers\.(\d+)\.(.+)$", k)
        if m:
            i = int(m.group(1))
            if stage * layers_per_stage <= i < (stage + 1) * layers_per_stage:
                out.append(f"decoder.layers.{i - stage * layers_per_stage}.{m.group(2)}")
        elif k.startswith("embedding.") and stage == 0:
            out.append(k)
        elif (k.startswith("decoder.final_layernorm") or k.startswith("output_layer.")) and stage == stages - 1:
            out.append(k)
    return out


@pytest.mark.parametrize("case, experts, tp, pp, ep", [
    ("qwen2.5-tied", "sequential", 2, 1, 1),
    ("qwen2.5-untied", "sequential", 2, 2, 1),
    ("qwen3-qk-norm", "sequential", 1, 2, 1),
    ("qwen1.5-moe-shared-gate", "sequential", 2, 1, 2),
    ("qwen1.5-moe-shared-gate", "torch-grouped", 1, 2, 2),
    ("qwen3-moe", "torch-grouped", 2, 1, 4),
])
def test_gathered_shards_give_back_the_hf_weights(case, experts, tp, pp, ep, megatron_world, monkeypatch):
    """Split HF weights the way the engine loads them on each (tp, pp, ep) rank, then gather them as the engine
    does for a checkpoint: the result is the original state dict, bit for bit."""
    spec = _spec(case)
    arch = resolve_architecture(spec)
    _, weights = hf_reference(arch, seed=3)
    keys = _model_keys(spec, experts, monkeypatch)
    local_experts = arch.moe.num_experts // ep if arch.moe else 0
    per_stage = arch.num_layers // pp
    dense: dict[int, dict] = {}
    expert_parts: dict[int, dict] = {}
    for stage in range(pp):
        stage_keys = _stage_keys(keys, stage, per_stage, pp)
        if arch.tie_word_embeddings and stage > 0:
            stage_keys = [k for k in stage_keys if k != "output_layer.weight"]
        # a sequential-experts model built at EP 1 lists every expert; a rank at EP `ep` has the first E/ep
        stage_keys = [k for k in stage_keys
                      if not (m := re.search(r"local_experts\.(\d+)\.", k)) or int(m.group(1)) < local_experts]
        for t in range(tp):
            for e in range(ep):
                local = megatron_state_dict(weights, arch, stage_keys, tp_rank=t, tp_size=tp, ep_rank=e, ep_size=ep,
                                            layer_offset=stage * per_stage)
                for k, v in renumber_layers(local, stage * per_stage).items():
                    if is_expert_key(k):
                        expert_parts.setdefault(e, {})[k] = v.clone()
                    elif e == 0:
                        dense.setdefault(t, {})[k] = v.clone()
    got = hf_from_shards(dense, expert_parts, arch)
    assert sorted(got) == sorted(weights)
    for k, v in weights.items():
        assert torch.equal(got[k], v), k


# ------------------------------------------------------------------------------------------------ loss


def _megatron_step(scaling: LossScaling, per_rank: list[list[tuple[float, int]]]) -> tuple[float, float]:
    """What megatron makes of the contributions (calculate_per_token_loss off, average_in_collective off): the
    schedule divides each by max(count, 1) and by the local micro-batch count, DDP by the data-parallel size. Returns
    (effective objective, reported loss)."""
    dp = len(per_rank)
    objective, num, den = 0.0, 0.0, 0.0
    for mbs in per_rank:
        for loss_sum, tokens in mbs:
            value, count = scaling.contribution(torch.tensor(loss_sum, dtype=torch.float64), tokens)
            objective += float(value) / max(count, 1) / len(mbs) / dp
            r = scaling.report(torch.tensor(loss_sum, dtype=torch.float64), torch.tensor(float(tokens)), tokens)
            num += float(r[0])
            den += float(r[1])
    return objective, num / den


def test_loss_scaling_matches_the_cpu_engine():
    per_rank = [[(30.0, 10), (8.0, 2), (0.0, 0)], [(12.0, 4), (50.0, 25), (7.0, 7)]]
    flat = [x for r in per_rank for x in r]
    n_micro = len(flat)
    global_tokens = sum(t for _, t in flat)
    # CPU engine, "mean": sum over micro-batches of (ce / max(tokens, 1) / n_micro)
    mean = sum(s / max(t, 1) / n_micro for s, t in flat)
    objective, reported = _megatron_step(LossScaling("mean", n_micro, global_tokens), per_rank)
    assert objective == pytest.approx(mean, rel=1e-12) and reported == pytest.approx(mean, rel=1e-12)
    # CPU engine, "per_token": sum of ce / global tokens
    per_token = sum(s for s, _ in flat) / global_tokens
    objective, reported = _megatron_step(LossScaling("per_token", n_micro, global_tokens), per_rank)
    assert objective == pytest.approx(per_token, rel=1e-12) and reported == pytest.approx(per_token, rel=1e-12)


@pytest.mark.parametrize("mode", ["mean", "per_token"])
@pytest.mark.parametrize("tokens", [0, 1, 4096])
def test_output_grad_is_the_gradient_megatrons_normalisation_brings(mode, tokens):
    """What the chunked loss assumes before the forward equals what autograd brings through the schedule's
    division (calculate_per_token_loss off) to one micro-batch's loss sum."""
    scaling = LossScaling(mode, num_micro_global=8, global_tokens=20000, context_parallel=2)
    loss_sum = torch.tensor(123.0, dtype=torch.float64, requires_grad=True)
    value, count = scaling.contribution(loss_sum, tokens)
    local_micro = 4
    (value / torch.clamp(torch.tensor(count), min=1) / local_micro).backward()
    assert scaling.output_grad(tokens, local_micro) == pytest.approx(loss_sum.grad.item(), rel=1e-12)


@pytest.mark.parametrize("balancing", ["aux_loss", "seq_aux_loss"])
def test_load_balancing_loss_is_read_from_megatron_tracker(balancing, megatron_world, monkeypatch):
    """Whatever the balancing type, the step reports megatron's unweighted load-balancing loss: for a router
    that spreads tokens about evenly it is close to 1 (E/k x sum_e fraction_e x mean prob_e)."""
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

    from qwen_trainer.engines.megatron.loss import load_balancing_loss
    from qwen_trainer.engines.megatron.testing import random_micro_batches

    family, size, kw = CASES["qwen3-moe"]
    kw = dict(kw, moe=dict(kw["moe"], loadBalancingType=balancing, auxLossCoeff=0.01))
    spec = job_spec(family, size, training={"seqLength": 64}, **kw)
    arch = resolve_architecture(spec)
    model = _cpu_model(spec, "sequential", monkeypatch)
    model.train()
    clear_aux_losses_tracker()
    for mb in random_micro_batches(2, 2, 64, arch.vocab_size, seed=1):
        mask = torch.ones_like(mb.targets, dtype=torch.float32)
        model(mb.tokens, mb.position_ids, None, labels=mb.targets, loss_mask=mask).sum().backward()
    aux = load_balancing_loss(2, arch.num_layers)
    assert 0.9 < aux < 1.5, aux
    assert load_balancing_loss(2, arch.num_layers) == 0.0  # the tracker was cleared


# ------------------------------------------------------------------------------------------------ selection


def test_auto_picks_the_megatron_engine_on_cuda(monkeypatch):
    import qwen_trainer.engines as engines
    from qwen_trainer.engines import megatron

    made = []
    monkeypatch.setenv(engines.ENGINE_ENV, "auto")
    monkeypatch.setattr(engines, "_cuda", lambda: True)
    monkeypatch.setattr(megatron, "create_engine", lambda spec: made.append(spec) or "megatron-engine")
    spec = _spec("qwen2.5-tied")
    assert engines.select_engine(spec, lambda _m: None) == "megatron-engine" and made == [spec]


def test_auto_without_megatron_core_trains_on_cpu_and_says_why(monkeypatch):
    import qwen_trainer.engines as engines

    said = []
    monkeypatch.setenv(engines.ENGINE_ENV, "auto")
    monkeypatch.setattr(engines, "_cuda", lambda: True)
    monkeypatch.setattr(engines, "_megatron_engine_installed", lambda: False)
    engine = engines.select_engine(_spec("qwen2.5-tied"), said.append)
    assert engine.name == "cpu" and "megatron-core is not installed" in said[0]


def test_adapter_refuses_what_it_cannot_train(monkeypatch):
    from qwen_trainer.engines.megatron import MegatronEngine

    with pytest.raises(UserError, match="expertTensor 1"):
        MegatronEngine(_spec("qwen3-moe", parallelism={"expert": 2, "expertTensor": 2}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        MegatronEngine(_spec("qwen2.5-tied"))
