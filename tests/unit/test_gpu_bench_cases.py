"""The GPU benchmark's case table: every variant a case lists is defined and builds valid engine options, and
the runner refuses unknown variant names with one line instead of running nothing."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu"
sys.path.insert(0, str(BENCH))

from cases import CASES, HF_VARIANTS, VARIANTS  # noqa: E402


def test_every_case_names_a_known_baseline():
    assert {c.baseline for c in CASES.values()} <= {"auto", "ddp", "fsdp", "none"}
    # models whose replica does not fit a card are compared against transformers under FSDP2
    assert CASES["qwen3-30b-a3b-ep4-l12"].baseline == CASES["qwen1.5-moe-a2.7b-ep4"].baseline == "fsdp"


def test_every_listed_variant_is_defined():
    missing = {c.name: [v for v in c.variants if v not in VARIANTS] for c in CASES.values()}
    assert not {k: v for k, v in missing.items() if v}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_options_are_engine_options(name):
    pytest.importorskip("megatron.core")
    from trainer.engines.megatron_config import EngineOptions

    fields = {f.name for f in dataclasses.fields(EngineOptions)}
    assert set(VARIANTS[name]) <= fields
    EngineOptions(**VARIANTS[name])


def test_unknown_variant_is_one_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "run.py"), "--cases", "smoke-dense", "--variants",
                           "best,no-such-lever", "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown variants: no-such-lever" in proc.stderr
    assert "Traceback" not in proc.stderr and not any(tmp_path.iterdir())


def test_every_case_lists_defined_hf_variants_with_the_baseline_first():
    for case in CASES.values():
        assert case.hf_variants[0] == "baseline" and set(case.hf_variants) <= set(HF_VARIANTS), case.name


def test_hf_variants_are_from_config_arguments():
    """transformers takes each variant's arguments and runs the experts the way its name says (tiny model, CPU)."""
    pytest.importorskip("transformers")
    import torch
    from transformers import AutoModelForCausalLM

    from trainer.engines.hf_model import hf_config
    from trainer.engines.megatron_testing import job_spec
    from trainer.spec import resolve_architecture

    arch = resolve_architecture(job_spec("qwen1.5", "A2.7B", architecture=dict(
        numLayers=1, hiddenSize=64, numAttentionHeads=4, numQueryGroups=4, ffnHiddenSize=128, vocabSize=256,
        maxPositionEmbeddings=64), moe=dict(numExperts=4, topK=2, ffnHiddenSize=32, sharedExpertFfnHiddenSize=64)))
    for name, kwargs in HF_VARIANTS.items():
        model = AutoModelForCausalLM.from_config(hf_config(arch), dtype=torch.float32, **kwargs)
        assert model.config._experts_implementation == kwargs.get("experts_implementation", "grouped_mm"), name


def test_speedups_are_against_the_baseline_and_the_reference_variant_apart():
    from run import summarise

    rows = [dict(case="moe", impl="hf", variant="baseline", tokens_per_s_per_gpu=100.0),
            dict(case="moe", impl="hf", variant="experts-eager", tokens_per_s_per_gpu=50.0),
            dict(case="moe", impl="megatron", variant="best", tokens_per_s_per_gpu=120.0),
            dict(case="moe-dp4", impl="hf", variant="baseline", tokens_per_s_per_gpu=90.0),
            dict(case="moe-dp4", impl="megatron", variant="best", tokens_per_s_per_gpu=114.0)]
    out = {(r["case"], r["variant"]): r for r in summarise(rows)}
    assert out["moe", "best"]["speedup_vs_hf"] == 1.2
    assert out["moe", "best"]["speedup_vs_hf_experts_eager"] == 2.4
    assert "speedup_vs_hf" not in out["moe", "experts-eager"]
    assert out["moe-dp4", "baseline"]["scaling_efficiency"] == 0.9
    assert out["moe-dp4", "best"]["scaling_efficiency"] == 0.95
