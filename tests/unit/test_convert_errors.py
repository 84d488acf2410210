"""Clear, one-line-per-problem errors; no overwrite without asking; the CLI exits 1 without a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest

from .convert_models import assert_same, save_tiny
from qwen_trainer.__main__ import main
from qwen_trainer.convert import ConversionError, ParallelLayout, convert

warnings.filterwarnings("ignore", category=UserWarning)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return save_tiny("qwen2.5-tied", tmp_path_factory.mktemp("hf") / "qwen2")


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    return save_tiny("qwen3-moe", tmp_path_factory.mktemp("hf") / "moe")


def test_layout_that_does_not_divide_lists_every_problem(qwen2, tmp_path):
    with pytest.raises(ConversionError) as e:
        convert(qwen2, "hf", tmp_path / "out", "mcore", layout=ParallelLayout(tp=3, pp=3), progress=False)
    text = "\n".join(e.value.problems)
    for what in ("attention heads (4) is not divisible by tp (3)", "query groups", "padded vocab size (500)",
                 "layers (4) is not divisible by pp*vpp (3)"):
        assert what in text
    assert not (tmp_path / "out").exists()


def test_experts_and_ep(moe, qwen2, tmp_path):
    with pytest.raises(ConversionError, match=r"experts \(4\) is not divisible by ep \(3\)"):
        convert(moe, "hf", tmp_path / "a", "mcore", layout=ParallelLayout(ep=3), progress=False)
    with pytest.raises(ConversionError, match="needs an MoE model"):
        convert(qwen2, "hf", tmp_path / "b", "mcore", layout=ParallelLayout(ep=2), progress=False)
    with pytest.raises(ConversionError, match="etp must be 1"):
        convert(moe, "hf", tmp_path / "c", "megablocks", layout=ParallelLayout(tp=2, etp=2), progress=False)


def test_missing_and_unknown_inputs(tmp_path, qwen2):
    with pytest.raises(ConversionError, match="does not exist"):
        convert(tmp_path / "nope", "hf", tmp_path / "out", "mcore", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="missing config.json"):
        convert(tmp_path / "empty", "hf", tmp_path / "out", "mcore", progress=False)
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ConversionError, match="unknown architecture: model_type='llama'"):
        convert(llama, "hf", tmp_path / "out", "mcore", progress=False)
    with pytest.raises(ConversionError, match="unknown format 'zarr'"):
        convert(qwen2, "hf", tmp_path / "out", "zarr", progress=False)
    with pytest.raises(ConversionError, match="no mp_rank"):
        convert(qwen2, "mcore", tmp_path / "out", "hf", progress=False)


def test_no_overwrite_without_flag(qwen2, tmp_path):
    out = tmp_path / "out"
    convert(qwen2, "hf", out, "mcore", progress=False)
    before = (out / "conversion-manifest.json").read_text()
    with pytest.raises(ConversionError, match="already holds a checkpoint.*--overwrite"):
        convert(qwen2, "hf", out, "mcore", layout=ParallelLayout(tp=2), extra_vocab_size=12, progress=False)
    assert (out / "conversion-manifest.json").read_text() == before
    convert(qwen2, "hf", out, "mcore", layout=ParallelLayout(tp=2), extra_vocab_size=12, overwrite=True,
            progress=False)
    assert (out / "release" / "mp_rank_01").is_dir()
    assert not list(tmp_path.glob(".out.*"))  # no scratch folders left behind


def test_verify_detects_a_corrupted_file(qwen2, tmp_path):
    from qwen_trainer.convert import verify_conversion

    out = tmp_path / "out"
    convert(qwen2, "hf", out, "megatron-lm", progress=False)
    rank = out / "release" / "mp_rank_00" / "model_optim_rng.pt"
    data = bytearray(rank.read_bytes())
    data[-200] ^= 0xFF
    rank.write_bytes(bytes(data))
    with pytest.raises(ConversionError, match="checksum mismatch"):
        verify_conversion(qwen2, "hf", out, "megatron-lm")


def test_cli_roundtrip_and_one_line_errors(qwen2, tmp_path, capsys):
    mid, back = tmp_path / "mid", tmp_path / "back"
    assert main(["convert", "--from", "hf", "--to", "mcore", "--tp", "2", "--pp", "2", "--extra-vocab-size", "12",
                 "--verify", "--no-progress", str(qwen2), str(mid)]) == 0
    assert main(["convert", "--from", "mcore", "--to", "hf", "--no-progress", str(mid), str(back)]) == 0
    assert_same(qwen2, back)
    capsys.readouterr()
    assert main(["convert", "--from", "hf", "--to", "mcore", "--tp", "3", "--no-progress", str(qwen2),
                 str(tmp_path / "bad")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err and all(line.startswith("error: ") for line in err) and len(err) >= 3


def test_cli_as_module_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "qwen_trainer", "convert", "--from", "hf", "--to", "mcore",
                        str(tmp_path / "missing"), str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr and "error: source" in r.stderr


def test_truncated_source_weights_are_one_error_line_and_leave_no_output(qwen2, tmp_path, capsys):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(qwen2, src)
    weights = sorted(src.glob("*.safetensors"))[-1]
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 64)
    assert main(["convert", "--from", "hf", "--to", "mcore", "--no-progress", str(src), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "is truncated" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output, no scratch folder left behind
