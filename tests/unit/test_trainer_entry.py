"""Reading the job file and the distributed environment; checkpoint folder bookkeeping; status reporting."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from qwen_trainer import jobfile
from qwen_trainer.checkpoint import store
from qwen_trainer.distenv import read_env
from qwen_trainer.errors import UserError, UserErrors
from qwen_trainer.status_reporter import StatusReporter

JOB = {"stage": "pretrain", "model": {"family": "qwen2.5", "size": "0.5B"},
       "training": {"globalBatchSize": 8, "trainIters": 10},
       "data": {"pretrain": {"prefixes": [{"path": "/data/p"}]}}, "checkpoint": {"output": {"path": "/out"}}}


def _write(tmp_path: Path, doc) -> str:
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(doc))
    return str(p)


def test_plain_resource_and_resolved_forms(tmp_path):
    assert jobfile.load(_write(tmp_path, JOB), 2).spec.stage == "pretrain"
    resource = {"apiVersion": "training.qwen.dev/v1alpha1", "kind": "QwenTrainingJob", "metadata": {"name": "x"},
                "spec": {**JOB, "image": {"name": "i"}, "resources": {"nodes": 2}, "volumes": [], "env": [],
                         "scheduling": {}, "runPolicy": {}, "nccl": {}, "suspend": False,
                         "serviceAccountName": "sa"}}
    assert jobfile.load(_write(tmp_path, resource), 8).spec.training.train_iters == 10
    resolved = {"spec": JOB, "derived": {"train_iters": 10}, "worldSize": 4}
    assert jobfile.load(_write(tmp_path, resolved), 4).declared_world_size == 4
    with pytest.raises(UserError, match="resolved for 4 processes"):
        jobfile.load(_write(tmp_path, resolved), 2)


def test_spec_problems_name_their_fields(tmp_path):
    bad = {**JOB, "training": {"globalBatchSize": 6, "trainIters": 10, "typo": 1}}
    with pytest.raises(UserErrors) as err:
        jobfile.load(_write(tmp_path, bad), 4)
    assert err.value.lines() == ["training.typo: unknown field"]
    with pytest.raises(UserErrors) as err:
        jobfile.load(_write(tmp_path, {"spec": {**JOB, "training": {"globalBatchSize": 6, "trainIters": 10}}}), 4)
    assert any(line.startswith("spec.training.globalBatchSize") for line in err.value.lines())
    (tmp_path / "broken.yaml").write_text("stage: [\n")
    with pytest.raises(UserError, match="not valid YAML"):
        jobfile.load(str(tmp_path / "broken.yaml"), 1)
    with pytest.raises(UserError, match="does not exist"):
        jobfile.load(str(tmp_path / "nope.yaml"), 1)


def test_env_from_torchrun_and_training_operator():
    d = read_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                  "MASTER_ADDR": "m", "MASTER_PORT": "23456", "TORCHELASTIC_RUN_ID": "x"})
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size, d.master_port) == (3, 4, 1, 2, 23456)
    assert read_env({}).world_size == 1
    single = read_env({"PET_NPROC_PER_NODE": "1", "PET_MASTER_ADDR": "a", "PET_MASTER_PORT": "1", "WORLD_SIZE": "2",
                       "RANK": "1"})
    assert (single.rank, single.world_size, single.master_addr) == (1, 2, "a")
    with pytest.raises(UserError, match="without torchrun"):
        read_env({"PET_NPROC_PER_NODE": "8", "WORLD_SIZE": "2", "RANK": "0"})
    with pytest.raises(UserError, match="outside"):
        read_env({"RANK": "5", "WORLD_SIZE": "2"})


def _iter(root: Path, it: int, complete: bool = True) -> Path:
    d = root / f"iter_{it:07d}"
    d.mkdir(parents=True)
    if complete:
        (d / store.STATE_FILE).write_bytes(b"x")
    return d


def test_latest_complete_checkpoint_and_leftovers(tmp_path):
    assert store.find_latest(tmp_path) is None
    _iter(tmp_path, 10)
    _iter(tmp_path, 20)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("10")  # crashed before the tracker moved
    (tmp_path / ".iter_0000030.tmp-123").mkdir()  # crashed before the rename
    (tmp_path / "iter_0000040").mkdir()  # not a trainer checkpoint
    logs = []
    assert store.find_latest(tmp_path, logs.append) == 20 and "using 20" in logs[0]
    store.clean_leftovers(tmp_path, logs.append)
    assert not (tmp_path / ".iter_0000030.tmp-123").exists()


def test_prune_keeps_last_n_and_the_tracked_one(tmp_path):
    for it in (5, 10, 15, 20):
        _iter(tmp_path, it)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("5")
    store.prune(tmp_path, 2, lambda m: None)
    assert store.complete_iterations(tmp_path) == [5, 15, 20]


def test_status_reporter_is_off_without_env_and_never_raises(monkeypatch):
    monkeypatch.delenv("QWEN_STATUS_RESOURCE", raising=False)
    assert not StatusReporter(lambda m: None).enabled
    logs = []
    r = StatusReporter(logs.append, resource="ns/job")

    def broken():
        raise ConnectionError("no API server")

    monkeypatch.setattr(r, "_client", broken)
    r.report(force=True, iteration=1, loss=2.0)
    r.close()
    assert r.enabled and any("training continues" in m for m in logs)
    assert not StatusReporter(logs.append, resource="no-slash").enabled
