"""HF -> format -> HF and HF -> A -> B -> HF must reproduce every tensor bit for bit."""

from __future__ import annotations

import warnings

import pytest

from .convert_models import FAMILIES, assert_same, save_tiny
from qwen_trainer.convert import ConversionError, ParallelLayout, convert

warnings.filterwarnings("ignore", category=UserWarning)

DENSE_LAYOUTS = [ParallelLayout(), ParallelLayout(tp=2), ParallelLayout(pp=4), ParallelLayout(tp=2, pp=2),
                 ParallelLayout(tp=2, pp=2, vpp=2)]
MOE_LAYOUTS = [ParallelLayout(ep=2), ParallelLayout(tp=2, pp=2, ep=2), ParallelLayout(tp=2, ep=4, etp=1),
               ParallelLayout(pp=2, ep=4)]
# (format, options): Megatron-Core in both layer-spec namings and both expert layouts.
FORMATS = [("mcore", {}), ("mcore", {"transformer_engine_keys": True, "expert_layout": "grouped"}),
           ("megatron-lm", {}), ("megablocks", {}), ("torch_dist", {})]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: save_tiny(name, root / name) for name in FAMILIES}


def _layouts(family: str, fmt: str):
    if fmt == "torch_dist":
        return [ParallelLayout()]  # layout-free: tensors are stored whole
    layouts = MOE_LAYOUTS if "moe" in family else DENSE_LAYOUTS
    if fmt == "megablocks":
        layouts = [ParallelLayout(lay.tp, lay.pp, lay.ep, 1, lay.vpp) for lay in layouts]
    return layouts


CASES = [(fam, fmt, opts, lay) for fam in FAMILIES for fmt, opts in FORMATS for lay in _layouts(fam, fmt)
         if not (fam == "qwen2-moe" and fmt == "megablocks")]


@pytest.mark.parametrize("family,fmt,opts,layout", CASES,
                         ids=[f"{c[0]}-{c[1]}{'-te-grouped' if c[2] else ''}-tp{c[3].tp}pp{c[3].pp}ep{c[3].ep}"
                              f"etp{c[3].etp}vpp{c[3].vpp}" for c in CASES])
def test_hf_format_hf_is_exact(models, tmp_path, family, fmt, opts, layout):
    mid, back = tmp_path / "mid", tmp_path / "back"
    convert(models[family], "hf", mid, fmt, layout=layout, extra_vocab_size=12, progress=False, **opts)
    assert (mid / "latest_checkpointed_iteration.txt").read_text() == "release"
    assert (mid / "tokenizer_config.json").is_file() and (mid / "conversion-manifest.json").is_file()
    convert(mid, fmt, back, "hf", progress=False, verify=True)
    assert_same(models[family], back)


CHAINS = [
    ("qwen2.5-tied", [("mcore", ParallelLayout(tp=2, pp=2), {}), ("megatron-lm", ParallelLayout(pp=4), {}),
                      ("torch_dist", None, {})]),
    ("qwen3", [("torch_dist", None, {}), ("mcore", ParallelLayout(tp=2, pp=2), {"transformer_engine_keys": True}),
               ("mcore", ParallelLayout(pp=2), {})]),
    ("qwen3-moe", [("megablocks", ParallelLayout(ep=2), {}),
                   ("mcore", ParallelLayout(tp=2, pp=2, ep=4), {"expert_layout": "grouped"}),
                   ("torch_dist", None, {}), ("megablocks", ParallelLayout(tp=2, pp=2, ep=4), {})]),
    ("qwen2-moe", [("mcore", ParallelLayout(tp=2, ep=2, etp=1), {}), ("megatron-lm", ParallelLayout(ep=4), {}),
                   ("torch_dist", None, {}), ("mcore", ParallelLayout(pp=2, ep=2), {"transformer_engine_keys": True})]),
]


@pytest.mark.parametrize("family,chain", CHAINS, ids=[c[0] for c in CHAINS])
def test_format_to_format_chain_is_exact(models, tmp_path, family, chain):
    src, src_fmt = models[family], "hf"
    for i, (fmt, layout, opts) in enumerate(chain):
        dst = tmp_path / f"step{i}-{fmt}"
        convert(src, src_fmt, dst, fmt, layout=layout, extra_vocab_size=12 if src_fmt == "hf" else 0,
                progress=False, **opts)
        back = tmp_path / f"back{i}"
        convert(dst, fmt, back, "hf", progress=False)
        assert_same(models[family], back)
        src, src_fmt = dst, fmt


def test_megablocks_cannot_hold_shared_expert_gate(models, tmp_path):
    with pytest.raises(ConversionError, match="megablocks format cannot hold .*shared_expert"):
        convert(models["qwen2-moe"], "hf", tmp_path / "mb", "megablocks", progress=False)
    assert not (tmp_path / "mb").exists()


@pytest.mark.parametrize("family", ["qwen2.5-tied", "qwen3-moe"])
def test_torch_dist_through_the_scratch_file_arena_is_exact(models, tmp_path, family, monkeypatch):
    """A model larger than the memory left is held in a scratch file while megatron-core saves it (forced here);
    the checkpoint is the same, and the scratch file is gone afterwards."""
    from qwen_trainer.convert.formats import torch_dist

    monkeypatch.setenv("QWEN_CONVERT_ARENA_BYTES", "0")
    arenas = []
    real = torch_dist._save
    monkeypatch.setattr(torch_dist, "_save", lambda *a: arenas.append(a[8]) or real(*a))
    mid, back = tmp_path / "mid", tmp_path / "back"
    convert(models[family], "hf", mid, "torch_dist", extra_vocab_size=12, progress=False)
    assert arenas and arenas[0] is not None and arenas[0].nbytes > 0
    assert not list(tmp_path.rglob("*.arena"))
    convert(mid, "torch_dist", back, "hf", progress=False, verify=True)
    assert_same(models[family], back)
