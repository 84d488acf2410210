"""The megatron engine's training checkpoints in real processes (torchrun, gloo, CPU): saved through
qwen_trainer.checkpoint.store.save (every rank its shard, torch_dist) at one parallel layout and resumed at another,
optimizer state included; and a rank killed in the middle of a save.

The worker (megatron_resume_worker.py) runs MegatronEngine itself, with its CUDA calls pointed at the CPU. After the
load, the weights, fp32 master weights, Adam moments and step counts, gathered to full tensors through the
converter's mapping, must equal what was saved, and the losses of the next two steps must match the uninterrupted
run's within 1e-3 relative (the first checks the weights, the second the optimizer state)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")

import torch  # noqa: E402

from qwen_trainer.checkpoint import store  # noqa: E402
from qwen_trainer.distenv import _free_port  # noqa: E402
from qwen_trainer.faults import ENV as FAULT_ENV  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("megatron_resume_worker.py")
RTOL = 1e-3
# On a GPU machine the worker runs one process per GPU (NCCL): the layout changes need two, and the kill test runs
# in one process there (tests/gpu's device command selects it)
GPUS = torch.cuda.device_count()
needs_two = pytest.mark.skipif(0 < GPUS < 2, reason="two processes need two GPUs here")
QUANTITIES = ("weight", "main", "exp_avg", "exp_avg_sq")


MARK = "QWEN_RESUME_TEST_RUN"


def _end_leftovers(token: str) -> None:
    """End the processes of one run that outlived it: megatron's writer starts a multiprocessing manager (and its
    resource tracker) from each rank, which torchrun's ranks, each in a session of their own, leave behind. They are
    found by the marker this run put in their environment."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if f"{MARK}={token}".encode() in environ.split(b"\0"):
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except OSError:
                pass


def _run(procs: int, *args: str, log: Path, fault: str | None = None) -> int:
    """torchrun with its output in a file; whatever it started is ended afterwards."""
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    token = uuid.uuid4().hex
    env[MARK] = token
    # The repository first, then whatever the caller's path holds (the GPU machine's packages live there).
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "operator"), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["TORCHDYNAMO_DISABLE"] = "1"  # megatron's compiled helpers run eagerly: same numbers, no compile time
    if fault:
        env[FAULT_ENV] = fault
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={procs}", f"--master-port={_free_port()}",
           str(WORKER), *map(str, args)]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=240)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _end_leftovers(token)
    return rc


def _tail(log: Path) -> str:
    lines = [x for x in log.read_text().splitlines() if "Warning" not in x and "warnings.warn" not in x]
    return "\n".join(lines[-40:])


def trained_losses(tmp_path: Path, name: str, procs: int, steps: int, *keys: str) -> tuple[list[float], dict]:
    """The tiny MoE case trained `steps` steps under torchrun without a save (worker keys as `keys`): every step's
    loss and what the engine built (the worker's built.pt: dispatcher classes, parameters marked into main_grad)."""
    out, log = tmp_path / name, tmp_path / f"{name}.log"
    rc = _run(procs, "moe", tmp_path / f"ckpt-{name}", out, "save", f"steps={steps}", "extra=0", "save_at=999",
              *keys, log=log)
    assert rc == 0, _tail(log)
    losses = torch.load(out / "losses.pt")
    return [losses[i] for i in range(1, steps + 1)], torch.load(out / "built.pt")


def _same_state(saved: dict, resumed: dict) -> None:
    assert saved["steps"] == resumed["steps"] and len(saved["steps"]) == 1, (saved["steps"], resumed["steps"])
    for q in QUANTITIES:
        a, b = saved[q], resumed[q]
        assert sorted(a) == sorted(b), q
        for name in a:
            assert not torch.isnan(a[name]).any(), (q, name)  # every region of the tensor was gathered
            assert torch.equal(a[name], b[name]), (q, name, float((a[name] - b[name]).abs().max()))


def _close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= RTOL * abs(y) for x, y in zip(a, b))


# (case, saved at, processes, resumed at, processes)
LAYOUT_CHANGES = {
    # the plain mixed-precision optimizer: its state is cut like the parameters, so it follows any change
    "dense-tp2-to-pp2": ("dense", ["tp=2"], 2, ["pp=2"], 2),
    "moe-dp2-to-one-process": ("moe", [], 2, [], 1),
    # megatron chains an expert optimizer apart from the dense one at EP > 1 only: the state is regrouped
    "moe-ep2-to-one-process": ("moe", ["ep=2"], 2, [], 1),
    "moe-one-process-to-ep2": ("moe", [], 1, ["ep=2"], 2),
    # the distributed optimizer ('dp_reshardable'): a changed data-parallel size
    "dense-distopt-dp2-to-one-process": ("dense", ["dopt=1"], 2, ["dopt=1"], 1),
    # checkpoint.reshardableOptimizer ('fully_reshardable'): a changed tensor/pipeline split too
    "dense-distopt-reshardable-tp2-to-pp2": ("dense", ["tp=2", "dopt=1", "reshard=1"], 2, ["pp=2", "dopt=1"], 2),
    "moe-distopt-reshardable-dp2-to-pp2": ("moe", ["dopt=1", "reshard=1"], 2, ["pp=2", "dopt=1"], 2),
    # ... and across the expert optimizer's chain (EP 1 <-> 2), regrouped as the plain optimizer's state is
    "moe-distopt-reshardable-ep2-to-one-process": ("moe", ["ep=2", "dopt=1", "reshard=1"], 2, ["dopt=1"], 1),
    "moe-distopt-reshardable-one-process-to-ep2": ("moe", ["dopt=1", "reshard=1"], 1, ["ep=2", "dopt=1"], 2),
}


@needs_two
@pytest.mark.parametrize("name", sorted(LAYOUT_CHANGES))
def test_resume_at_another_layout_restores_weights_and_optimizer(name, tmp_path):
    case, before, n_before, after, n_after = LAYOUT_CHANGES[name]
    root, out = tmp_path / "ckpt", tmp_path / "out"
    rc = _run(n_before, case, root, out, "save", *before, log=tmp_path / "save.log")
    assert rc == 0, _tail(tmp_path / "save.log")
    rc = _run(n_after, case, root, out, "resume", *after, log=tmp_path / "resume.log")
    assert rc == 0, _tail(tmp_path / "resume.log")
    saved = torch.load(out / "save.pt", weights_only=False)
    resumed = torch.load(out / "resume.pt", weights_only=False)
    assert resumed["iteration"] == saved["iteration"] == 2
    _same_state(saved["state"], resumed["state"])
    assert _close(resumed["losses"], saved["losses"]), (resumed["losses"], saved["losses"])


RESTARTS = {
    # the distributed optimizer's dp_reshardable state cannot follow a TP/PP/EP change
    "dense-distopt-tp2-to-one-process": ("dense", ["tp=2", "dopt=1"], 2, ["dopt=1"], 1),
}


@needs_two
@pytest.mark.parametrize("name", sorted(RESTARTS))
def test_where_the_optimizer_cannot_follow_the_weights_load_and_the_optimizer_restarts(name, tmp_path):
    """The weights load, the optimizer starts afresh, and the log says so (docs/checkpoints.md)."""
    case, before, n_before, after, n_after = RESTARTS[name]
    root, out = tmp_path / "ckpt", tmp_path / "out"
    assert _run(n_before, case, root, out, "save", *before, "extra=1", log=tmp_path / "save.log") == 0, \
        _tail(tmp_path / "save.log")
    assert _run(n_after, case, root, out, "resume", *after, "extra=1", log=tmp_path / "resume.log") == 0, \
        _tail(tmp_path / "resume.log")
    assert "starting the optimizer afresh" in (tmp_path / "resume.log").read_text()
    saved = torch.load(out / "save.pt", weights_only=False)["state"]
    resumed = torch.load(out / "resume.pt", weights_only=False)
    for name in saved["weight"]:
        assert torch.equal(saved["weight"][name], resumed["state"]["weight"][name]), name
    assert _close(resumed["losses"], torch.load(out / "save.pt", weights_only=False)["losses"])


@pytest.mark.parametrize("how", ["sync", "async"])
def test_a_rank_killed_mid_save_leaves_the_previous_checkpoint(how, tmp_path):
    """An EP 2 MoE run saves at iterations 1 and 2; rank 1 dies while the second save's files are being written
    (on a one-GPU machine: one process, which dies).
    The folder of iteration 2 is never committed, iteration 1 stays the newest complete checkpoint, and a restart
    removes the leftover and resumes from iteration 1 with its exact state."""
    root, out = tmp_path / "ckpt", tmp_path / "out"
    procs, layout, victim = (1, "ep=1", 0) if GPUS == 1 else (2, "ep=2", 1)
    rc = _run(procs, "moe", root, out, "save", layout, "steps=2", "save_at=1,2", f"async={int(how == 'async')}",
              log=tmp_path / "killed.log", fault=f"save_writing@2:{victim}")
    assert rc != 0, _tail(tmp_path / "killed.log")
    assert f"[fault injection] save_writing at iteration 2 on rank {victim}" in (tmp_path / "killed.log").read_text()
    assert store.find_latest(root) == 1
    assert (root / "latest_checkpointed_iteration.txt").read_text() == "1"
    assert not (root / "iter_0000002").exists()
    leftovers = [p.name for p in root.iterdir() if p.name.startswith(".iter_0000002.tmp-")]
    assert len(leftovers) == 1 and not (root / leftovers[0] / store.STATE_FILE).exists()
    killed_losses = torch.load(out / "losses.pt")
    assert sorted(killed_losses) == [1, 2]

    rc = _run(procs, "moe", root, out, "resume", layout, "extra=1", log=tmp_path / "resume.log")
    assert rc == 0, _tail(tmp_path / "resume.log")
    assert f"removing {leftovers[0]}" in (tmp_path / "resume.log").read_text()
    assert not [p for p in root.iterdir() if p.name.startswith(".")]
    resumed = torch.load(out / "resume.pt", weights_only=False)
    assert resumed["iteration"] == 1
    _same_state(torch.load(out / "save-1.pt", weights_only=False)["state"], resumed["state"])
    assert _close(resumed["losses"], [killed_losses[2]]), (resumed["losses"], killed_losses)


@pytest.mark.parametrize("layout", [["dopt=1"], ["ep=2", "dispatcher=alltoall"]], ids=["dp2-distopt", "ep2"])
def test_steps_read_back_after_the_next_launch_train_alike(tmp_path, layout):
    """EngineOptions.read_back_next_step, as the training loop drives it (each step read back once the next one is
    launched, a save in between settling the step before it writes): the same losses and gradient norms, bit for
    bit, as reading every step back as it ends; the data-parallel token count is summed on the host."""
    at_once, _ = trained_losses(tmp_path, "now", 2, 4, *layout)
    later, _ = trained_losses(tmp_path, "next", 2, 4, *layout, "readback=next", "save_at=2",
                             f"opts={json.dumps({'read_back_next_step': True})}")
    assert at_once == later, (at_once, later)
    norms = [torch.load(tmp_path / name / "grad_norms.pt") for name in ("now", "next")]
    assert norms[0] == norms[1] and len(norms[0]) == 4
    assert (tmp_path / "next" / "save-2.pt").exists()
