"""The every-rank checkpoint protocol of qwen_trainer.checkpoint.store in two real processes (torchrun, gloo): every
rank's shards land in one folder that becomes the checkpoint only when all of them are in, and a rank killed in
the middle of a save leaves the previous checkpoint the newest complete one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qwen_trainer.checkpoint import store
from qwen_trainer.distenv import _free_port
from qwen_trainer.faults import ENV as FAULT_ENV

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("sharded_store_worker.py")


def _run(root: Path, *args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "operator")])
    if fault:
        env[FAULT_ENV] = fault
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={_free_port()}",
           str(WORKER), str(root), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _loaded(tmp_path: Path) -> list[dict]:
    return [json.loads((tmp_path / f"loaded-{r}.json").read_text()) for r in (0, 1)]


def test_every_rank_writes_its_shard_into_one_committed_folder(tmp_path):
    root = tmp_path / "ckpt"
    done = _run(root, "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert store.find_latest(root) == 2
    assert (root / "latest_checkpointed_iteration.txt").read_text() == "2"
    folder = root / "iter_0000002"
    assert sorted(p.name for p in folder.glob("shard_*.json")) == ["shard_0.json", "shard_1.json"]
    assert json.loads((folder / "shard_1.json").read_text())["value"] == 21
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no scratch left behind
    loaded = _run(root, "0", "2")
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    lines = _loaded(tmp_path)
    assert sorted((x["rank"], x["value"]) for x in lines) == [(0, 20), (1, 21)]
    assert all(x["iteration"] == 2 and x["layout"]["world"] == 2 for x in lines)


@pytest.mark.parametrize("point", ["save_before_rename", "save_before_tracker"])
def test_a_rank_killed_mid_save_keeps_the_previous_checkpoint(tmp_path, point):
    root = tmp_path / "ckpt"
    rank = 1 if point == "save_before_rename" else 0  # the tracker is rank 0's to move
    killed = _run(root, "3", fault=f"{point}@2:{rank}")
    assert killed.returncode != 0
    assert "[fault injection]" in killed.stderr
    if point == "save_before_rename":  # every rank wrote, nothing was committed
        assert store.find_latest(root) == 1
        assert (root / "latest_checkpointed_iteration.txt").read_text() == "1"
        leftovers = [p.name for p in root.iterdir() if p.name.startswith(".iter_0000002.tmp-")]
        assert len(leftovers) == 1
    else:  # renamed into place, tracker not yet moved: the folder is complete and wins
        assert store.find_latest(root) == 2
    again = _run(root, "0", str(store.find_latest(root)))  # the next start cleans up, then loads
    assert again.returncode == 0, again.stderr[-3000:]
    assert not [p for p in root.iterdir() if p.name.startswith(".")]
    values = sorted(x["value"] for x in _loaded(tmp_path))
    assert values == ([10, 11] if point == "save_before_rename" else [20, 21])
