"""convert(): open the source, pick the target's rules, stream every rule instance through, write atomically."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import shutil
import zipfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from ..checkpoint.layout import RELEASE, atomic_directory, read_tracker, resolve_iteration_dir, write_tracker
from .errors import ConversionError, check
from .formats import FORMATS
from .formats.args import megatron_args
from .formats.hf import HFSource, unmapped, write_hf
from .formats.per_rank import FORMATS as PER_RANK, PerRankSource, write_per_rank
from .formats.torch_dist import DistSource, is_torch_dist_dir, write_torch_dist
from .manifest import MANIFEST, check_manifest, write_manifest
from .plan import Placement, format_rules, instances, iter_groups, rules_for
from .sources import ByName, Upcycled
from .dims import ParallelLayout, UpcycleOptions, layout_problems, load_hf_config, model_dims

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
# Files carried from a source checkpoint folder to the target (tokenizer, configs); weights never are.
_CARRY_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".distcp")
_CARRY_SKIP = {"model.safetensors.index.json", "pytorch_model.bin.index.json", MANIFEST, "latest_checkpointed_iteration.txt"}


@dataclass(frozen=True)
class ConversionResult:
    target: Path
    files: int
    bytes: int
    seconds: float
    manifest: Path


def _dtype(dtype) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).lower() not in DTYPES:
        raise ConversionError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(DTYPES))}")
    return DTYPES[str(dtype).lower()]


def open_source(path: Path, fmt: str, *, family=None, extra_vocab_size=0, padded_vocab_size=None, hf_config=None):
    """Returns a source whose read(instance) yields HF tensors for any rule of its family."""
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"source {path} does not exist")
    if fmt == "hf":
        dims = model_dims(load_hf_config(path), family, extra_vocab_size=extra_vocab_size,
                          padded_vocab_size=padded_vocab_size)
        return HFSource(path, dims)
    root, iter_dir = resolve_iteration_dir(path)
    if not iter_dir.is_dir():
        raise ConversionError(f"{path}: no checkpoint iteration folder (release/ or iter_*/)")
    config = load_hf_config(Path(hf_config) if hf_config else root)

    def dims_for(padded: int):
        return model_dims(config, family, padded_vocab_size=padded)

    if fmt == "torch_dist" or is_torch_dist_dir(iter_dir):  # training checkpoints of sharded engines are torch_dist
        src = DistSource(root, iter_dir, dims_for)
        return ByName(src, instances(src.dims, format_rules(src.dims, ("mcore",), fmt)))
    pr = PER_RANK[fmt]
    src = PerRankSource(root, iter_dir, pr, dims_for)
    return ByName(src, instances(src.dims, format_rules(src.dims, src.schemes, fmt)))


def _carry_files(src_root: Optional[Path], dst: Path, config: dict) -> dict[Path, str]:
    out = []
    if src_root is not None and src_root.is_dir():
        for p in sorted(src_root.iterdir()):
            if p.is_file() and p.name not in _CARRY_SKIP and not p.name.endswith(_CARRY_SKIP_SUFFIXES):
                shutil.copy2(p, dst / p.name)
                out.append(dst / p.name)
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return {p: "" for p in out + [dst / "config.json"]}


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _target_problems(target: Path, source: Path, overwrite: bool) -> list[str]:
    if target.resolve() == source.resolve():
        return [f"target {target} is the source"]
    if target.exists() and not target.is_dir():
        return [f"target {target} exists and is not a directory"]
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        what = "a checkpoint" if (read_tracker(target) or any(target.glob("*.safetensors"))) else "files"
        return [f"target {target} already holds {what}; pass overwrite=True (--overwrite) to replace it"]
    # The scratch folder is made next to the target and renamed into place: its parent must be writable.
    parent = _nearest_existing(target.absolute().parent)
    if not parent.is_dir():
        return [f"target {target}: {parent} is not a directory"]
    if not os.access(parent, os.W_OK | os.X_OK):
        return [f"target {target}: {parent} is not writable"]
    return []


_SCRATCH = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def remove_stale_scratch(target: Path) -> list[Path]:
    """Remove `.NAME.tmp-PID` scratch folders of `target` left by conversions that were killed: only those whose
    process no longer runs (a live conversion's scratch folder is never touched). Returns what was removed."""
    target = Path(target).absolute()
    removed = []
    if not target.parent.is_dir():
        return removed
    for p in target.parent.iterdir():
        m = _SCRATCH.match(p.name)
        if not m or m["name"] != target.name or not p.is_dir():
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or _alive(pid):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


# What reading a damaged checkpoint raises from torch, pickle, zip and the format readers.
_DAMAGED = (RuntimeError, EOFError, KeyError, pickle.UnpicklingError, zipfile.BadZipFile)


def _damaged(source: Path, fmt: str, err: BaseException) -> ConversionError:
    if isinstance(err, KeyError):
        what = f"a shard or tensor is missing ({err.args[0]!r} not found)" if err.args else "a shard is missing"
    else:
        what = " ".join(f"{type(err).__name__}: {err}".split())[:300]
    return ConversionError(f"source {source}: cannot read the {fmt} checkpoint (damaged or incomplete?): {what}")


def convert(source: Union[str, Path], source_format: str, target: Union[str, Path], target_format: str, *,
            layout: Optional[ParallelLayout] = None, family: Optional[str] = None, extra_vocab_size: int = 0,
            padded_vocab_size: Optional[int] = None, dtype=None, transformer_engine_keys: bool = False,
            expert_layout: str = "sequential", overwrite: bool = False, verify: bool = False,
            upcycle: Optional[UpcycleOptions] = None, progress: Union[bool, Callable] = True,
            hf_config: Optional[Union[str, Path]] = None, max_shard_size: int = 5 << 30) -> ConversionResult:
    """Convert a checkpoint between `hf`, `megatron-lm`, `mcore`, `torch_dist` and `megablocks`.

    layout applies to per-rank targets (megatron-lm, mcore, megablocks); the source's layout is read from disk.
    extra_vocab_size / padded_vocab_size pad the Megatron embedding and output rows (zeros; dropped again on
    export). `progress` is True (tqdm bar), False, or a callable(total) returning a tick(n) function.
    """
    t0 = time.perf_counter()
    source, target = Path(source), Path(target)
    layout = layout or ParallelLayout()
    problems = [f"unknown format {f!r}; known: {', '.join(FORMATS)}" for f in (source_format, target_format)
                if f not in FORMATS]
    if expert_layout not in ("sequential", "grouped"):
        problems.append(f"expert_layout must be sequential or grouped, not {expert_layout!r}")
    problems += _target_problems(target, source, overwrite) if source.exists() else []
    check(problems)
    cast_to = _dtype(dtype)
    remove_stale_scratch(target)
    # An existing empty folder (a mount point, a folder made beforehand) is simply filled.
    replace = overwrite or (target.is_dir() and not any(target.iterdir()))
    try:
        return _convert(source, source_format, target, target_format, t0=t0, cast_to=cast_to, layout=layout,
                        family=family, extra_vocab_size=extra_vocab_size, padded_vocab_size=padded_vocab_size,
                        transformer_engine_keys=transformer_engine_keys, expert_layout=expert_layout,
                        overwrite=replace, verify=verify, upcycle=upcycle, progress=progress, hf_config=hf_config,
                        max_shard_size=max_shard_size, problems=problems)
    except ConversionError:
        raise
    except PermissionError as err:
        raise ConversionError(f"target {target}: {err.strerror or 'permission denied'}: {err.filename or target}")
    except OSError as err:
        if err.filename and not str(err.filename).startswith(str(source)):
            raise ConversionError(f"target {target}: {err.strerror or err}: {err.filename}")
        raise ConversionError(f"source {source}: {err.strerror or err}: {err.filename or source}")
    except _DAMAGED as err:
        raise _damaged(source, source_format, err) from err


def _convert(source: Path, source_format: str, target: Path, target_format: str, *, t0: float, cast_to, layout,
             family, extra_vocab_size, padded_vocab_size, transformer_engine_keys, expert_layout, overwrite, verify,
             upcycle, progress, hf_config, max_shard_size, problems) -> ConversionResult:
    src = open_source(source, source_format, family=family, extra_vocab_size=extra_vocab_size,
                      padded_vocab_size=padded_vocab_size, hf_config=hf_config)
    try:
        config = dict(src.dims.hf_config)
        if upcycle is not None:
            src = Upcycled(src, upcycle)
            config = src.config
        dims = src.dims
        if source_format != "hf" and (extra_vocab_size or padded_vocab_size):
            padded = padded_vocab_size or dims.vocab + extra_vocab_size
            dims = dataclasses.replace(dims, padded_vocab=int(padded))
        if cast_to is not None:
            config["torch_dtype" if "torch_dtype" in config else "dtype"] = str(cast_to).removeprefix("torch.")
        if source_format == "hf" and upcycle is None:
            extra = unmapped(src, instances(dims, rules_for(dims)))
            check([f"source tensor {n} is not described by the {dims.family} table" for n in extra[:20]])

        if target_format == "hf":
            insts = instances(dims, format_rules(dims, ("mcore",), "hf"))
        elif target_format == "torch_dist":
            insts = instances(dims, format_rules(dims, ("mcore",), target_format))
        else:
            pr = PER_RANK[target_format]
            etp = layout.etp if layout.etp is not None else (layout.tp if pr.experts_tp else 1)
            if not pr.experts_tp and etp != 1:
                problems.append(f"{target_format} experts are not tensor-parallel: etp must be 1 (got {etp})")
            check(problems + layout_problems(dims, layout, etp))
            schemes = pr.resolve_schemes(transformer_engine_keys, expert_layout == "grouped")
            insts = instances(dims, format_rules(dims, schemes, target_format))
            place = Placement(dims, layout, etp, schemes, pr.tied_head_name)

        emb_dtype = src.read(insts[0], meta=True)[0].dtype
        out_dtype = cast_to or emb_dtype

        def cast(t: torch.Tensor) -> torch.Tensor:
            return t if cast_to is None or t.dtype == cast_to else t.to(cast_to)

        if target_format in PER_RANK:
            total = sum(1 for pp, ep in iter_groups(layout) for i in insts
                        if any(s.pp == pp for s in place.slots(i)) and (i.expert is None or place.ep_rank(i) == ep))
        else:
            total = len(insts)
        bar, tick = _progress(progress, total, f"{source_format} -> {target_format}")
        with atomic_directory(target, overwrite=overwrite) as tmp:
            files = _carry_files(getattr(src, "root", None), tmp, config)
            if target_format == "hf":
                files |= write_hf(src, tmp, insts, cast=cast, max_shard_bytes=max_shard_size, tick=tick)
            else:
                impl = "transformer_engine" if transformer_engine_keys else "local"
                fmt_name = "torch_dist" if target_format == "torch_dist" else "torch"
                lay = layout if target_format in PER_RANK else ParallelLayout()
                args = megatron_args(dims, lay, place.etp if target_format in PER_RANK else 1, ckpt_format=fmt_name,
                                     transformer_impl=impl, dtype=out_dtype)
                iter_dir = tmp / RELEASE
                if target_format == "torch_dist":
                    files |= write_torch_dist(src, iter_dir, dims, insts, te=transformer_engine_keys, cast=cast,
                                              tick=tick, args=args)
                else:
                    files |= write_per_rank(src, iter_dir, PER_RANK[target_format], place, insts, cast=cast,
                                            tick=tick, args=args)
            if bar is not None:
                bar.close()
            info = {"source": str(source), "source_format": source_format, "target_format": target_format,
                    "family": dims.family, "layout": layout.as_dict() if target_format in PER_RANK else None,
                    "padded_vocab_size": dims.padded_vocab, "vocab_size": dims.vocab,
                    "dtype": str(out_dtype).removeprefix("torch."),
                    "transformer_engine_keys": transformer_engine_keys, "expert_layout": expert_layout,
                    "upcycle": dataclasses.asdict(upcycle) if upcycle else None}
            write_manifest(tmp, info, files)
            if target_format != "hf":
                write_tracker(tmp, RELEASE)  # last: a reader that finds the tracker finds a complete checkpoint
    finally:
        src.close()
    if verify:
        verify_conversion(source, source_format, target, target_format, family=family, hf_config=hf_config,
                          upcycle=upcycle, exact=cast_to is None or cast_to == emb_dtype)
    nbytes = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    return ConversionResult(target, sum(1 for p in target.rglob("*") if p.is_file()), nbytes,
                            time.perf_counter() - t0, target / MANIFEST)


def verify_conversion(source: Path, source_format: str, target: Path, target_format: str, *, family=None,
                      hf_config=None, upcycle: Optional[UpcycleOptions] = None, exact: bool = True) -> None:
    """Re-read the target: checksums must match the manifest, and (unless the dtype changed) every HF tensor read
    back from the target must equal the one read from the source."""
    check(check_manifest(Path(target)))
    if not exact:
        return
    a = open_source(Path(source), source_format, family=family, hf_config=hf_config)
    b = open_source(Path(target), target_format, family=None)
    try:
        if upcycle is not None:
            a = Upcycled(a, upcycle)
        problems = []
        for inst in instances(b.dims, format_rules(b.dims, ("mcore",), "hf")):
            for name, x, y in zip(inst.hf_names, a.read(inst), b.read(inst)):
                if x.shape != y.shape or x.dtype != y.dtype or not torch.equal(x, y):
                    problems.append(f"verify: {name} differs between {source} and {target}")
        check(problems[:20])
    finally:
        a.close()
        b.close()


def _progress(progress, total: int, desc: str):
    if callable(progress):
        return None, progress(total)
    if not progress:
        return None, lambda n=1: None
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="tensor", dynamic_ncols=True)
    return bar, bar.update
