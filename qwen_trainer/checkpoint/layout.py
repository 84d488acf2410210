"""On-disk layout of Megatron checkpoints.

A Megatron save directory looks like::

    ROOT/latest_checkpointed_iteration.txt      # "release" or an integer
    ROOT/release/ | ROOT/iter_0000100/          # one directory per saved iteration
        mp_rank_00[_001][_002]/model_optim_rng.pt   # per-rank torch format
        __0_0.distcp .metadata common.pt metadata.json  # torch_dist format

Everything here is pure path arithmetic plus the atomic-directory helper, so the converter, the trainer's
save/resume code and the tests agree on one definition.
"""

from __future__ import annotations

import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Optional

TRACKER = "latest_checkpointed_iteration.txt"
RANK_FILE = "model_optim_rng.pt"
RELEASE = "release"

# Megatron-LM/megatron-core name rank folders mp_rank_TT[_PPP][_EEE]; the MegaBlocks fork of Megatron-LM appends the
# expert (data-parallel) rank before the pipeline rank: mp_rank_TT[_EEE][_PPP].
SuffixOrder = Literal["pp_ep", "ep_pp"]


def iteration_dir_name(iteration: int | str) -> str:
    if iteration == RELEASE:
        return RELEASE
    return f"iter_{int(iteration):07d}"


def rank_dir_name(tp: int, pp: int, ep: int, *, pp_size: int, ep_size: int, order: SuffixOrder = "pp_ep") -> str:
    pp_part = f"_{pp:03d}" if pp_size > 1 else ""
    ep_part = f"_{ep:03d}" if ep_size > 1 else ""
    tail = pp_part + ep_part if order == "pp_ep" else ep_part + pp_part
    return f"mp_rank_{tp:02d}{tail}"


_RANK_RE = re.compile(r"^mp_rank_(\d{2})((?:_\d{3}){0,2})$")


@dataclass(frozen=True)
class RankDirs:
    """Ranks found in an iteration directory: {(tp, pp, ep): path}, and the grid sizes they imply."""

    paths: dict[tuple[int, int, int], Path]
    tp: int
    pp: int
    ep: int


def scan_rank_dirs(iter_dir: Path, *, order: SuffixOrder = "pp_ep", pp_hint: Optional[int] = None) -> RankDirs:
    """Find mp_rank_* folders. With one numeric suffix it is PP unless pp_hint says the model has one stage
    (then it is EP); two suffixes are read in `order`."""
    found: dict[tuple[int, ...], Path] = {}
    for child in sorted(iter_dir.iterdir()):
        m = _RANK_RE.match(child.name)
        if m and (child / RANK_FILE).is_file():
            tail = [int(x) for x in m.group(2).split("_") if x]
            found[(int(m.group(1)), *tail)] = child
    if not found:
        return RankDirs({}, 0, 0, 0)
    n_suffix = {len(k) - 1 for k in found}
    if len(n_suffix) != 1:
        raise ValueError(f"{iter_dir}: mixed rank folder names")
    paths: dict[tuple[int, int, int], Path] = {}
    for key, p in found.items():
        tp, rest = key[0], list(key[1:])
        if len(rest) == 0:
            pp = ep = 0
        elif len(rest) == 1:
            pp, ep = (rest[0], 0) if (pp_hint or 2) > 1 else (0, rest[0])
        else:
            pp, ep = (rest[0], rest[1]) if order == "pp_ep" else (rest[1], rest[0])
        paths[(tp, pp, ep)] = p
    sizes = [max(k[i] for k in paths) + 1 for i in range(3)]
    return RankDirs(paths, *sizes)


def read_tracker(root: Path) -> Optional[str]:
    f = root / TRACKER
    if not f.is_file():
        return None
    return f.read_text().strip() or None


def write_tracker(root: Path, iteration: int | str) -> None:
    """Written last, so a reader that sees the tracker sees a complete checkpoint."""
    value = RELEASE if iteration == RELEASE else str(int(iteration))
    tmp = root / (TRACKER + ".tmp")
    with open(tmp, "w") as f:
        f.write(value)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / TRACKER)
    fsync_dir(root)


def resolve_iteration_dir(path: Path) -> tuple[Path, Path]:
    """Accept a save root (with tracker) or an iteration folder; return (root, iteration dir)."""
    path = Path(path)
    it = read_tracker(path)
    if it is not None:
        return path, path / iteration_dir_name(it if it == RELEASE else int(it))
    if path.name == RELEASE or re.match(r"^iter_\d{7}$", path.name):
        return path.parent, path
    if (path / RELEASE).is_dir():
        return path, path / RELEASE
    iters = sorted(p for p in path.glob("iter_*") if p.is_dir()) if path.is_dir() else []
    if iters:
        return path, iters[-1]
    return path, path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def commit_directory(tmp: Path, target: Path) -> None:
    """fsync a finished scratch folder and rename it to `target` (an existing target is moved aside first and
    deleted only after the new one is in place)."""
    fsync_tree(tmp)
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.replace(target, old)
    os.replace(tmp, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_directory(target: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a scratch folder next to `target`; on success fsync it and rename it into place.

    The scratch folder sits in the same parent so the final rename is atomic on one filesystem. An existing
    target is moved aside first and deleted only after the new one is in place; on failure the scratch folder
    is removed and the old target is left untouched.
    """
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if target.exists() and not overwrite:
            raise FileExistsError(str(target))
        commit_directory(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
