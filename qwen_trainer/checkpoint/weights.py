"""Model weights in and out of checkpoints, through the converter (qwen_trainer.convert).

Engines that keep a Hugging Face model hand over HF-named tensors; these are written as a Hugging Face folder in
scratch space and converted into the backend's Megatron layout (`mcore`, `megatron-lm`, `megablocks` per-rank
files, or `torch_dist`) at the spec's tensor/pipeline/expert parallel sizes, so the checkpoint is what
Megatron-LM and the converter expect. Reading goes the other way. `torch_dist` needs a torch.distributed group of
its own, so those conversions run in a child process (`python -m qwen_trainer convert`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Optional

import torch

from qwen_trainer.errors import UserError

from .layout import RELEASE

MEGATRON_FORMATS = ("megatron-lm", "mcore", "torch_dist", "megablocks")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "generation_config.json", "added_tokens.json")


def write_hf_folder(folder: Path, state_dict: dict[str, torch.Tensor], config, tokenizer_dir: Optional[str] = None) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    config.save_pretrained(str(folder))
    copy_tokenizer(tokenizer_dir, folder)


def copy_tokenizer(tokenizer_dir: Optional[str], folder: Path) -> None:
    if not tokenizer_dir:
        return
    for name in TOKENIZER_FILES:
        src = Path(tokenizer_dir) / name
        if src.is_file():
            shutil.copy2(src, folder / name)


def _convert_in_child(source: Path, source_format: str, target: Path, target_format: str, extra: list[str]) -> None:
    cmd = [sys.executable, "-m", "qwen_trainer", "convert", str(source), str(target), "--from", source_format,
           "--to", target_format, "--no-progress", *extra]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "TORCHELASTIC_RUN_ID", "GROUP_RANK")}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"conversion {source_format} -> {target_format} failed: {done.stderr.strip()[-2000:]}")


def write_megatron(iter_tmp: Path, state_dict: dict[str, torch.Tensor], config, fmt: str, *, layout: dict,
                   scratch_parent: Path) -> None:
    """Fill `iter_tmp` (an iteration folder being written) with the weights in format `fmt`, in the layout the
    convert step writes for the same spec (`layout`: qwen_trainer.spec.layout.megatron_layout)."""
    from qwen_trainer.convert import convert

    scratch = scratch_parent / f".scratch-{uuid.uuid4().hex[:8]}"
    try:
        hf_dir, mg_dir = scratch / "hf", scratch / "megatron"
        write_hf_folder(hf_dir, state_dict, config)
        if fmt == "torch_dist":
            _convert_in_child(hf_dir, "hf", mg_dir, fmt, [])
        else:
            convert(hf_dir, "hf", mg_dir, fmt, progress=False, **layout)
        release = mg_dir / RELEASE
        for child in sorted(release.iterdir()):
            os.replace(child, iter_tmp / child.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def set_iteration(iter_dir: Path, fmt: str, iteration: int, extra: dict) -> None:
    """Record the iteration (and extra top-level entries) in the Megatron files, as Megatron-LM's own saves do."""
    if fmt == "torch_dist":
        common = iter_dir / "common.pt"
        if common.is_file():
            obj = torch.load(common, map_location="cpu", weights_only=False)
            obj.update(iteration=iteration, **extra)
            torch.save(obj, common)
        return
    for rank_file in sorted(iter_dir.glob("mp_rank_*/model_optim_rng.pt")):
        obj = torch.load(rank_file, map_location="cpu", weights_only=False)
        obj.update(iteration=iteration, **extra)
        torch.save(obj, rank_file)


def read_weights(path: Path, fmt: str, scratch_parent: Optional[Path] = None) -> dict[str, torch.Tensor]:
    """HF-named tensors from a checkpoint in any format (a HF folder, a Megatron root or iteration folder)."""
    from qwen_trainer.convert import open_source
    from qwen_trainer.convert.plan import format_rules, instances

    from qwen_trainer.convert.formats.torch_dist import is_torch_dist_dir

    from .layout import resolve_iteration_dir

    if fmt == "torch_dist" or (fmt != "hf" and is_torch_dist_dir(resolve_iteration_dir(Path(path))[1])):
        parent = scratch_parent or Path(path).parent
        scratch = parent / f".scratch-{uuid.uuid4().hex[:8]}"
        try:
            _convert_in_child(Path(path), "torch_dist", scratch / "hf", "hf", [])
            return read_weights(scratch / "hf", "hf")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    src = open_source(Path(path), fmt)
    try:
        out: dict[str, torch.Tensor] = {}
        for inst in instances(src.dims, format_rules(src.dims, ("mcore",), "hf")):
            for name, t in zip(inst.hf_names, src.read(inst)):
                out[name] = t.clone()
        return out
    finally:
        src.close()


def conversion_error(err: Exception, field: str) -> UserError:
    problems = getattr(err, "problems", None) or [str(err)]
    return UserError("; ".join(problems), path=field)
