"""Run under torchrun (gloo): qwen_trainer.checkpoint.store's every-rank save with an engine whose shards are plain
files, so the store's protocol (one scratch folder, every rank's files, the commit by rank 0, the tracker last)
runs in real processes. argv: ROOT ITERATIONS [LOAD_ITERATION]."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

from qwen_trainer.checkpoint import store
from qwen_trainer.checkpoint.sharded import DCP_METADATA, METADATA
from qwen_trainer.distenv import init_process_group, read_env


class FileShardEngine:
    """Writes `shard_<rank>.json` (and rank 0 the torch_dist markers) where a megatron engine writes its DCP files."""

    name = "files"
    saves_sharded = True

    def __init__(self, rank: int, world: int):
        self.rank, self.world, self.value = rank, world, 0
        self.loaded: dict = {}

    def layout(self) -> dict:
        return {"world": self.world, "tensor": 1, "pipeline": 1, "context": 1, "expert": 1,
                "virtual_pipeline": None, "distributed_optimizer": True}

    def save_sharded(self, folder: Path, save_optimizer: bool, async_save: bool = False):
        (folder / f"shard_{self.rank}.json").write_text(json.dumps({"rank": self.rank, "value": self.value}))
        if self.rank == 0:
            (folder / METADATA).write_text("{}")
            (folder / DCP_METADATA).write_bytes(b"")
        dist.barrier()
        return None

    def load_sharded(self, folder: Path, load_optimizer: bool, saved_layout=None) -> bool:
        self.loaded = {"value": json.loads((folder / f"shard_{self.rank}.json").read_text())["value"],
                       "layout": saved_layout}
        return load_optimizer


def main() -> int:
    root, iterations = Path(sys.argv[1]), int(sys.argv[2])
    env = read_env()
    init_process_group(env, "gloo")
    engine = FileShardEngine(env.rank, env.world_size)
    if env.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        store.clean_leftovers(root, print)
    dist.barrier()
    if len(sys.argv) > 3:
        loaded = store.load(root, int(sys.argv[3]), engine, fmt="mcore", rank=env.rank, load_optimizer=True, log=print)
        # one file per rank: two ranks' lines on a shared pipe can run into one another
        (root.parent / f"loaded-{env.rank}.json").write_text(
            json.dumps({"rank": env.rank, "iteration": loaded.state.iteration, **engine.loaded}))
        return 0
    for it in range(1, iterations + 1):
        engine.value = it * 10 + env.rank
        state = store.TrainState(iteration=it, consumed_samples=it * 4)
        store.save(root, state, engine, fmt="mcore", layout={}, scheduler={}, fingerprint={}, keep_last=None,
                   save_optimizer=True, rank=env.rank, world=env.world_size, log=print)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
