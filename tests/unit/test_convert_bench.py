"""The benchmark's seed-style baseline writes the same Megatron-Core rank file as qwen_trainer.convert (TP1 PP1)."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest
import torch

from qwen_trainer.convert import convert

warnings.filterwarnings("ignore", category=UserWarning)

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "convert_bench.py"
_spec = importlib.util.spec_from_file_location("convert_bench", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=384)


@pytest.mark.parametrize("tied", [True, False])
def test_seed_style_baseline_matches_streaming_converter(megatron_world, tmp_path, tied):
    src = tmp_path / "hf"
    bench.make_checkpoint(dict(TINY, tie_word_embeddings=tied), src)
    convert(src, "hf", tmp_path / "ours", "mcore", progress=False)
    bench.seed_style_convert(src, tmp_path / "seed")

    assert (tmp_path / "seed" / "latest_checkpointed_iteration.txt").read_text().strip() == "release"
    saved = torch.load(tmp_path / "seed" / bench.RANK_FILE, weights_only=False)
    assert saved["checkpoint_version"] == 3.0 and saved["iteration"] == 0
    assert ("output_layer.weight" in saved["model"]) is not tied

    result = bench.compare_rank_files(tmp_path / "ours", tmp_path / "seed")
    assert result["problems"] == []
    # embedding, final norm (+ output layer), and per layer: 2 norms, qkv weight + bias, proj, fc1, fc2
    assert result["tensors_compared"] == 2 + (not tied) + 7 * TINY["num_hidden_layers"]
    assert result["extra_state_entries_skipped"] > 0


def test_compare_rank_files_sees_a_one_bit_change(megatron_world, tmp_path):
    src = tmp_path / "hf"
    bench.make_checkpoint(dict(TINY, tie_word_embeddings=True), src)
    convert(src, "hf", tmp_path / "ours", "mcore", progress=False)
    bench.seed_style_convert(src, tmp_path / "seed")
    path = tmp_path / "seed" / bench.RANK_FILE
    saved = torch.load(path, weights_only=False)
    w = saved["model"]["decoder.layers.1.mlp.linear_fc2.weight"]
    w.view(torch.int16)[0, 0] ^= 1  # flip the lowest bit of one bf16 value
    torch.save(saved, path)
    problems = bench.compare_rank_files(tmp_path / "ours", tmp_path / "seed")["problems"]
    assert problems == ["decoder.layers.1.mlp.linear_fc2.weight: values differ"]


def test_child_reports_time_and_peak_memory(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"\0" * 4096)
    row = bench.run_child("copy", str(src), str(tmp_path / "dst"))
    assert row["bytes"] == 4096 and row["seconds"] >= 0 and row["maxrss"] > 0 and row["ru_maxrss"] > 0
    assert (tmp_path / "dst" / "model.safetensors").stat().st_size == 4096
