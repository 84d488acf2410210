"""Throughput figures of the trainer's log: MFU from the card's peak (named in the environment or known by name)."""

from __future__ import annotations

import json

import pytest

from qwen_trainer.metrics import PEAK_ENV, Metrics, peak_tflops


@pytest.mark.parametrize("name,peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                       ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                       ("Tesla T4", None), (None, None)])
def test_peak_comes_from_the_card_name(name, peak, monkeypatch):
    monkeypatch.delenv(PEAK_ENV, raising=False)
    assert peak_tflops(name) == peak


def test_environment_overrides_the_card(monkeypatch):
    monkeypatch.setenv(PEAK_ENV, "500")
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 500.0


def test_mfu_is_model_flops_over_the_peak(tmp_path, monkeypatch):
    monkeypatch.delenv(PEAK_ENV, raising=False)
    m = Metrics(tmp_path, True, "megatron", 2, 6e9, {}, lambda _m: None, device_name="NVIDIA H200")
    rec = m.train(1, 10, 8, 2.0, None, 1e-4, 1.0, step_seconds=0.5, tokens=100_000, loss_tokens=100_000)
    m.close()
    # 6e9 flops/token x 200k tokens/s / 2 GPUs = 600 TFLOPS each, of 989
    assert rec["tflops_per_device"] == pytest.approx(600.0)
    assert rec["mfu"] == pytest.approx(600.0 / 989.0)
    lines = [json.loads(x) for x in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["mfu"] == pytest.approx(600.0 / 989.0)


def test_cpu_engine_has_no_mfu(tmp_path, monkeypatch):
    monkeypatch.setenv(PEAK_ENV, "989")
    m = Metrics(tmp_path, True, "cpu", 1, 6e9, {}, lambda _m: None)
    assert m.train(1, 10, 8, 2.0, None, 1e-4, 1.0, 0.5, 1000, 1000)["mfu"] is None
    m.close()
