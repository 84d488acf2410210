"""Training checkpoints: atomic save, keep-last-N, and finding the newest complete one to resume from.

Layout under `checkpoint.output.path` (Megatron's, so Megatron-LM and the converter read it)::

    latest_checkpointed_iteration.txt        tracker, replaced (temp file + rename) after the folder is in place
    config.json, tokenizer files             the model description the converter needs to export
    iter_0000100/
        mp_rank_00[_PPP][_EEE]/model_optim_rng.pt   weights in the backend's layout (or torch_dist files)
        trainer_state.pt                     engine, iteration, consumed samples, optimiser, scheduler,
                                             RNG states of every data-parallel rank, spec fingerprint
    logs/metrics.jsonl, tensorboard/         written by the metrics module

A save writes everything into a hidden scratch folder next to the target, fsyncs the files and the folder,
renames it to `iter_XXXXXXX` and only then moves the tracker. A crash at any point leaves the previous
checkpoint untouched; hidden leftovers are removed at the next start.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from qwen_trainer import faults

from . import sharded, weights
from .layout import (TRACKER, atomic_directory, commit_directory, fsync_dir, iteration_dir_name, read_tracker,
                     write_tracker)

STATE_FILE = "trainer_state.pt"
_ITER_RE = re.compile(r"^iter_(\d{7})$")


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    consumed_valid_samples: int = 0
    flops_so_far: float = 0.0


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _gather_rng(world: int) -> list:
    mine = rng_state()
    if world == 1 or not dist.is_initialized():
        return [mine]
    out: list = [None] * world
    dist.all_gather_object(out, mine)
    return out


def complete_iterations(root: Path) -> list[int]:
    if not root.is_dir():
        return []
    out = []
    for child in root.iterdir():
        m = _ITER_RE.match(child.name)
        if m and child.is_dir() and (child / STATE_FILE).is_file():
            out.append(int(m.group(1)))
    return sorted(out)


def find_latest(root: Path, log: Callable[[str], None] = print) -> Optional[int]:
    """Newest complete iteration folder. Folders are renamed into place only when complete, so a folder newer
    than the tracker means a crash between the rename and the tracker update; it is complete and wins."""
    its = complete_iterations(root)
    if not its:
        return None
    tracker = read_tracker(root)
    if tracker is not None and tracker.isdigit() and int(tracker) != its[-1]:
        log(f"checkpoint tracker says {tracker} but iteration {its[-1]} is complete; using {its[-1]}")
    return its[-1]


def clean_leftovers(root: Path, log: Callable[[str], None]) -> None:
    """Remove hidden scratch folders of interrupted saves (rank 0, before anything is written)."""
    if not root.is_dir():
        return
    for child in root.iterdir():
        if child.name.startswith(".") and child.is_dir() and (".tmp-" in child.name or child.name.startswith(".scratch-")
                                                             or ".old-" in child.name):
            log(f"removing {child.name} left by an interrupted save")
            shutil.rmtree(child, ignore_errors=True)


def write_model_description(root: Path, config, tokenizer_dir: Optional[str]) -> None:
    """config.json (and tokenizer files) at the checkpoint root, replaced atomically."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / ".config.json.tmp"
    tmp.write_text(config.to_json_string(use_diff=False))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, root / "config.json")
    if tokenizer_dir and Path(tokenizer_dir).resolve() != root.resolve():
        weights.copy_tokenizer(tokenizer_dir, root)
    fsync_dir(root)


def save(root: Path, state: TrainState, engine, *, fmt: str, layout: dict, scheduler: dict,
         fingerprint: dict, keep_last: Optional[int], save_optimizer: bool, rank: int, world: int,
         log: Callable[[str], None], sharded: Optional[bool] = None, async_saves=None,
         on_saved: Optional[Callable[[Path], None]] = None) -> Optional[Path]:
    """Collective: every rank calls it. Returns the folder on rank 0.

    An engine with `saves_sharded` writes its own shards from every rank (torch_dist layout, see
    qwen_trainer.checkpoint.sharded); otherwise rank 0 writes the weights the engine hands over in the backend's
    Megatron layout through the converter. `sharded=False` forces the second path (the checkpoint benchmark's
    baseline). With `async_saves` (a sharded.AsyncSaves) a sharded save returns once the shards are copied off the
    GPU; the commit (rename, tracker, pruning, `on_saved(folder)` on rank 0) runs when every rank's background
    writer is done, from a later `async_saves.poll()` or `wait()`."""
    t0 = time.time()
    rngs = _gather_rng(world)
    target = root / iteration_dir_name(state.iteration)
    use_sharded = getattr(engine, "saves_sharded", False) if sharded is None else sharded

    def finish(saved_fmt: str, started: float, what: str) -> None:
        if rank == 0:
            faults.hit("save_before_tracker", state.iteration, rank)
            write_tracker(root, state.iteration)
            if keep_last:
                prune(root, keep_last, log)
        if world > 1 and dist.is_initialized():
            dist.barrier()
        log(f"saved checkpoint {target} ({saved_fmt}{what}, iteration {state.iteration}) in "
            f"{time.time() - started:.2f}s")
        if rank == 0 and on_saved is not None:
            on_saved(target)

    if use_sharded:
        if async_saves is not None:
            async_saves.wait()  # one checkpoint in flight at a time
        scratch = _sharded_scratch(target, rank, world)
        payload = _payload(state, engine, scheduler, fingerprint, rngs, "torch_dist", None)
        request = engine.save_sharded(scratch, save_optimizer, async_save=async_saves is not None)
        # this rank's files are in the scratch folder (or, in the background, being written) while the other
        # ranks may still be writing theirs; nothing is committed yet
        faults.hit("save_writing", state.iteration, rank)

        def commit(started: float = t0, what: str = ", every rank its shard") -> None:
            faults.hit("save_before_rename", state.iteration, rank)
            if world > 1 and dist.is_initialized():
                dist.barrier()  # every rank's files are written and fsynced
            if rank == 0:
                _commit(scratch, target, payload)
            finish("torch_dist", started, what)

        if request is None:
            commit()
        else:
            async_saves.schedule(request, lambda: commit(t0, ", every rank its shard, written in the background"))
            # what the loop waited for: the scratch folder, the copy off the GPU and starting the writers
            log(f"checkpoint of iteration {state.iteration} copied off the GPU in {time.time() - t0:.2f}s; "
                "written in the background")
    else:
        prepare = getattr(engine, "prepare_checkpoint", None)  # collective: engines spread over ranks gather first
        if prepare is not None:
            prepare(save_optimizer)
        if rank == 0:
            with atomic_directory(target, overwrite=True) as tmp:
                weights.write_megatron(tmp, engine.checkpoint_weights(), engine.hf_config(), fmt, layout=layout,
                                       scratch_parent=root)
                optimizer = engine.optimizer_state_dict() if save_optimizer else None
                _write_payload(tmp, _payload(state, engine, scheduler, fingerprint, rngs, fmt, optimizer))
                faults.hit("save_before_rename", state.iteration, rank)
        finish(fmt, t0, "")
    # Saving must not disturb the run: restore this rank's RNG to what it was before the save.
    set_rng_state(rngs[rank] if len(rngs) > rank else rngs[0])
    faults.hit("after_save", state.iteration, rank)
    return target if rank == 0 else None


def _payload(state: TrainState, engine, scheduler: dict, fingerprint: dict, rngs: list, fmt: str,
             optimizer: Optional[dict]) -> dict:
    return {
        "version": 1,
        "engine": engine.name,
        "iteration": state.iteration,
        "consumed_samples": state.consumed_samples,
        "consumed_valid_samples": state.consumed_valid_samples,
        "flops_so_far": state.flops_so_far,
        "scheduler": scheduler,
        "optimizer": optimizer,
        "rng_state": rngs,
        "fingerprint": fingerprint,
        "layout": engine.layout() if hasattr(engine, "layout") else None,  # the parallel layout that saved it
        "format": fmt,
        "saved_at": time.time(),
    }


def _write_payload(folder: Path, payload: dict) -> None:
    torch.save(payload, folder / STATE_FILE)
    weights.set_iteration(folder, payload["format"], payload["iteration"], {
        "num_floating_point_operations_so_far": payload["flops_so_far"],
        "opt_param_scheduler": payload["scheduler"],
    })


def _scratch_name(target: Path, world: int) -> Path:
    """One scratch folder for every rank: named by rank 0's process id, so a live save is never taken for the
    leftover of a killed one."""
    token = [os.getpid()]
    if world > 1 and dist.is_initialized():
        dist.broadcast_object_list(token, src=0)
    return target.parent / f".{target.name}.tmp-{token[0]}"


def _sharded_scratch(target: Path, rank: int, world: int) -> Path:
    """The one scratch folder every rank writes its shards into, created empty by rank 0."""
    scratch = _scratch_name(target, world)
    if rank == 0:
        if scratch.exists():
            shutil.rmtree(scratch)
        scratch.mkdir(parents=True)
    if world > 1 and dist.is_initialized():
        dist.barrier()
    return scratch


def _commit(scratch: Path, target: Path, payload: dict) -> None:
    """Rank 0, after every rank wrote its shards: the trainer state last, then the folder renamed into place."""
    _write_payload(scratch, payload)
    commit_directory(scratch, target)


def prune(root: Path, keep_last: int, log: Callable[[str], None]) -> None:
    its = complete_iterations(root)
    tracker = read_tracker(root)
    for it in its[:-keep_last] if len(its) > keep_last else []:
        if tracker is not None and tracker.isdigit() and int(tracker) == it:
            continue
        path = root / iteration_dir_name(it)
        # Rename first so a crash mid-delete never leaves a half folder that looks complete.
        doomed = root / f".{path.name}.old-{os.getpid()}"
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        log(f"removed checkpoint {path.name} (keepLastN={keep_last})")
    fsync_dir(root)


@dataclass
class Loaded:
    state: TrainState
    scheduler: dict
    optimizer: Optional[dict]
    rng: Optional[dict]
    fingerprint: dict
    engine: str


def load(root: Path, iteration: int, engine, *, fmt: str, rank: int, load_optimizer: bool,
         log: Callable[[str], None]) -> Loaded:
    """Collective where the checkpoint is sharded and the engine reads shards (every rank its own regions, at any
    layout); otherwise the weights come through the converter as full tensors."""
    folder = root / iteration_dir_name(iteration)
    payload = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)
    saved_fmt = payload.get("format", fmt)
    optimizer = None
    if sharded.is_sharded(folder) and getattr(engine, "saves_sharded", False):
        restored = engine.load_sharded(folder, load_optimizer and payload.get("engine") == engine.name,
                                       payload.get("layout"))
        if load_optimizer and not restored:
            log("optimizer state not restored from the checkpoint; starting the optimizer afresh")
    else:
        engine.load_checkpoint_weights(weights.read_weights(folder, saved_fmt, scratch_parent=root))
        optimizer = payload.get("optimizer") if load_optimizer else None
        if optimizer is not None and payload.get("engine") != engine.name:
            log(f"optimizer state was saved by engine={payload.get('engine')}; starting the optimizer afresh")
            optimizer = None
    rngs = payload.get("rng_state") or []
    rng = rngs[rank] if rank < len(rngs) else None
    state = TrainState(payload["iteration"], payload["consumed_samples"], payload.get("consumed_valid_samples", 0),
                       payload.get("flops_so_far", 0.0))
    return Loaded(state, payload.get("scheduler", {}), optimizer, rng, payload.get("fingerprint", {}),
                  payload.get("engine", "?"))


def fingerprint_problems(saved: dict, current: dict) -> list[str]:
    out = []
    for key in ("architecture",):
        if key in saved and saved[key] != current.get(key):
            diff = [k for k in set(saved[key]) | set(current.get(key, {}))
                    if saved[key].get(k) != current.get(key, {}).get(k)]
            out.append(f"the checkpoint was made for a different model ({', '.join(sorted(diff)[:6])} differ)")
    return out


def describe(root: Path) -> str:
    return json.dumps({"root": str(root), "tracker": read_tracker(root), "iterations": complete_iterations(root)})


__all__ = ["TrainState", "save", "load", "find_latest", "clean_leftovers", "prune", "write_model_description",
           "rng_state", "set_rng_state", "TRACKER", "STATE_FILE"]
