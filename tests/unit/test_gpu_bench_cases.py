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
    from qwen_trainer.engines.megatron.config import EngineOptions

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

    from qwen_trainer.engines.hf_model import hf_config
    from qwen_trainer.engines.megatron.testing import job_spec
    from qwen_trainer.spec import resolve_architecture

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


def test_repeated_rounds_alternate_the_order():
    from run import rounds

    assert rounds(["best", "a", "b"], 3) == [["best", "a", "b"], ["b", "a", "best"], ["best", "a", "b"]]
    assert rounds(["best"], 2) == [["best"], ["best"]]
    assert rounds([], 4) == []


def test_repeated_runs_are_summarised_by_their_median_against_best():
    from run import markdown, repeat_summary

    def row(variant, speed, case="moe", **extra):
        return dict(case=case, impl="megatron", variant=variant, tokens_per_s_per_gpu=speed, tflops_per_gpu=1.0,
                    mfu=speed / 1000, peak_mem_gib=1.0, **extra)

    rows = [row("best", 90.0), row("graph", 110.0), row("graph", 99.0), row("best", 100.0), row("best", 95.0),
            row("graph", 130.0), row("graph", 1.0, error="boom"), row("once", 50.0),
            dict(case="moe", impl="hf", variant="baseline", tokens_per_s_per_gpu=70.0),
            dict(case="moe", impl="hf", variant="baseline", tokens_per_s_per_gpu=71.0)]
    out = {(s["case"], s["variant"]): s for s in repeat_summary(rows)}
    assert set(out) == {("moe", "best"), ("moe", "graph")}  # one run is no spread; errors and transformers left out
    assert out["moe", "best"] == dict(case="moe", variant="best", runs=3, median=95.0, low=90.0, high=100.0,
                                      mfu=0.095, vs_best=1.0)
    assert out["moe", "graph"]["runs"] == 3 and out["moe", "graph"]["median"] == 110.0
    assert out["moe", "graph"]["vs_best"] == pytest.approx(1.158, abs=1e-3)
    text = markdown([r for r in rows if r["impl"] == "megatron"],
                    dict(device="x", gpus_visible=1, date="d", torch="t", transformers="t", megatron_core="m"))
    assert "| moe | graph | 3 | 110 | 99-130 | 11.0% | 1.158x |" in text


def test_each_variant_loss_curve_is_compared_with_best_of_its_case():
    from run import markdown, summarise

    def row(variant, losses, case="moe"):
        return dict(case=case, impl="megatron", variant=variant, tokens_per_s_per_gpu=1.0, tflops_per_gpu=1.0,
                    mfu=0.1, peak_mem_gib=1.0, losses=losses)

    rows = summarise([row("best", [4.0, 2.0, 1.0]), row("moe-levers-off", [4.0, 2.002, 0.999, 0.5]),
                      row("best", [3.0], case="dense"), row("no-overlap", [3.3], case="dense")])
    out = {(r["case"], r["variant"]): r for r in rows}
    assert out["moe", "moe-levers-off"]["loss_curve_vs_best"] == pytest.approx(1e-3)  # over the 3 steps both ran
    assert out["dense", "no-overlap"]["loss_curve_vs_best"] == pytest.approx(0.1)
    assert "loss_curve_vs_best" not in out["moe", "best"]
    assert "4-step losses within 1.0e-03 of best" in markdown(rows, dict(device="x", gpus_visible=1, date="d",
                                                                          torch="t", transformers="t",
                                                                          megatron_core="m"))


def test_profile_counts_kernels_not_the_annotations_around_them():
    pytest.importorskip("torch")
    from worker import kernel_summary, kernel_times

    events = [
        ("nvjet_sm90_gemm", True, False, 800.0),
        ("nvjet_sm90_gemm", True, False, 200.0),
        ("multi_tensor_apply_kernel<FusedAdam>", True, False, 300.0),
        ("Optimizer.step#AdamW.step", True, True, 320.0),  # GPU-side range spanning the Adam kernel
        ("accumulate", True, False, 100.0),
        ("aten::mm", False, False, 50.0),  # host op
    ]
    kernels = kernel_times(events)
    assert kernels == {"nvjet_sm90_gemm": [1000.0, 2], "multi_tensor_apply_kernel<FusedAdam>": [300.0, 1],
                       "accumulate": [100.0, 1]}
    lines = kernel_summary(kernels, "case", wall=0.002)
    assert lines[0] == "== case: step wall 2.0 ms, GPU kernel time 1.4 ms (70.0% of wall), 4 kernels"
    by_group = {ln.split()[0]: ln for ln in lines[1:4]}
    assert "1.0 ms" in by_group["gemm"] and "0.3 ms" in by_group["optimizer"]
    assert any(ln.strip().startswith("grad accumulation") and "0.1 ms" in ln for ln in lines)


def test_launch_sites_attribute_kernel_time_to_the_host_op_that_launched_it():
    pytest.importorskip("torch")
    from worker import idle_gaps, launch_sites

    trace = {"traceEvents": [
        {"cat": "cpu_op", "name": "Experts", "tid": 1, "ts": 0, "dur": 100},
        {"cat": "cpu_op", "name": "aten::_grouped_mm", "tid": 1, "ts": 10, "dur": 5},
        {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "tid": 1, "ts": 11, "dur": 1, "args": {"correlation": 7}},
        {"cat": "kernel", "name": "cutlass_grouped", "ts": 20, "dur": 3000, "args": {"correlation": 7}},
        {"cat": "cpu_op", "name": "aten::add_", "tid": 1, "ts": 3100, "dur": 5},
        {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "tid": 1, "ts": 3101, "dur": 1, "args": {"correlation": 8}},
        {"cat": "kernel", "name": "void at::native::vectorized_elementwise_kernel", "ts": 3120, "dur": 1000,
         "args": {"correlation": 8}},
    ]}
    lines = launch_sites(trace)
    assert lines[1].split() == ["3.00", "1", "Experts", ">", "aten::_grouped_mm", "::", "cutlass_grouped"]
    assert lines[2].split() == ["1.00", "1", "aten::add_", "::", "vectorized_elementwise_kernel"]
    gaps = idle_gaps(trace)
    # the add was launched 80 us after the grouped GEMM finished: the host was late
    assert gaps[0].startswith("   idle gaps >= 20 us: 0.1 ms in 1 gaps") and "host late: aten::add_" in gaps[1]
