"""`python -m qwen_trainer convert ...`: argument parsing and one-line error reporting around convert()."""

from __future__ import annotations

import argparse
import sys

from .errors import ConversionError
from .formats import FORMATS


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("convert", help="convert a checkpoint between HF and Megatron formats",
                       description="Convert a Qwen checkpoint between Hugging Face and Megatron formats.")
    p.add_argument("source", metavar="SRC")
    p.add_argument("target", metavar="DST")
    p.add_argument("--from", dest="source_format", required=True, choices=FORMATS)
    p.add_argument("--to", dest="target_format", required=True, choices=FORMATS)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the target")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of the target")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size of the target")
    p.add_argument("--etp", type=int, default=None, help="expert tensor-parallel size (default: tp; MegaBlocks: 1)")
    p.add_argument("--vpp", type=int, default=1, help="virtual pipeline chunks per stage")
    p.add_argument("--family", default=None, help="qwen1.5, qwen2, qwen2.5, qwen3, qwen2-moe, qwen3-moe "
                                                  "(default: from config.json)")
    p.add_argument("--extra-vocab-size", type=int, default=0, help="rows to add to the Megatron embedding")
    p.add_argument("--padded-vocab-size", type=int, default=None, help="total Megatron embedding rows")
    p.add_argument("--dtype", default=None, help="cast weights (bf16, fp16, fp32); default keeps the source dtype")
    p.add_argument("--te", action="store_true", help="Transformer-Engine layer-spec names (mcore, torch_dist)")
    p.add_argument("--expert-layout", choices=("sequential", "grouped"), default="sequential")
    p.add_argument("--hf-config", default=None, help="folder with config.json when the source lacks one")
    p.add_argument("--upcycle-experts", type=int, default=0, help="upcycle a dense model into this many experts")
    p.add_argument("--upcycle-top-k", type=int, default=2)
    p.add_argument("--upcycle-seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing target")
    p.add_argument("--verify", action="store_true", help="re-read the target and compare with the source")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
    return p


def run(a: argparse.Namespace) -> int:
    from .api import convert
    from .dims import ParallelLayout, UpcycleOptions

    upcycle = UpcycleOptions(a.upcycle_experts, a.upcycle_top_k, seed=a.upcycle_seed) if a.upcycle_experts else None
    try:
        r = convert(a.source, a.source_format, a.target, a.target_format,
                    layout=ParallelLayout(a.tp, a.pp, a.ep, a.etp, a.vpp), family=a.family,
                    extra_vocab_size=a.extra_vocab_size, padded_vocab_size=a.padded_vocab_size, dtype=a.dtype,
                    transformer_engine_keys=a.te, expert_layout=a.expert_layout, overwrite=a.overwrite,
                    verify=a.verify, upcycle=upcycle, progress=not a.no_progress, hf_config=a.hf_config)
    except ConversionError as e:
        for line in e.problems:
            print(f"error: {line}", file=sys.stderr)
        return 1
    print(f"wrote {r.target} ({r.files} files, {r.bytes / 1e9:.2f} GB) in {r.seconds:.1f} s"
          + (", verified" if a.verify else ""))
    return 0
