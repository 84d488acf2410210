"""Training checkpoints on a GPU: the sharded save (every rank its own shard through dist_checkpointing, what
`qwen_trainer run` does now) against the gathered one (every weight and optimizer state gathered to rank 0, renamed to
Hugging Face names and converted to the backend's layout: the path before), in the same run, on the same card.

Each (case, path) runs in a fresh torchrun process group. The worker builds the engine `qwen_trainer run` builds
(`testing.built_engine`: the process group, then `build`), takes a few training steps so Adam's state exists,
then times, through `qwen_trainer.checkpoint.store` exactly as the training loop calls it:

    save     store.save(..., sharded=...) from its first collective until the checkpoint is committed
    blocked  the time the training loop waits: the whole save, or with `sharded-async` (checkpoint.asyncSave) only
             until the shards are copied off the GPU and the background writers started; training steps then run
             while the writers write (their mean time beside the time of a step alone)

Every run saves twice with a training step between: the first save pays one-off costs (pinned host buffers, the
planning), the figures are the second's, as every later checkpoint of a run; `first_*` keep the first. A path
`sharded@N` runs with N writer processes per rank (QWEN_CHECKPOINT_WRITERS). The sharded paths stage the GPU tensors
in one host buffer per rank that the first save makes and the next reuses (qwen_trainer.checkpoint.staging); a path
with `-fresh` (`sharded-async-fresh`) stages as megatron-core does, into new pinned host tensors at every save
(QWEN_CHECKPOINT_STAGING=fresh), the baseline of that buffer. `--drop-previous` removes the last checkpoint before
the next save, for disks that hold one checkpoint of the case but not two.
    disk     the same number of bytes written by one plain writer with an fsync at the end, on the same disk,
             after the checkpoint is removed (the ceiling a save is measured against)
    load     store.load + the optimizer state as the loop restores it, and then the first training step
    memory   peak resident memory of each rank during the save and during the load, above what it held before
             (the larger of the two saves: the first, which makes the staging buffer)
    restored the sum of the model's parameters after the load against the same sum taken when the last save began

    python benchmarks/gpu/checkpoint_bench.py --cases qwen2.5-1.5b,qwen1.5-moe-a2.7b-l3 --paths sharded,gathered \\
        --out DIR [--root /tmp/ckpt-bench]

Prints one row per run and the ratios sharded / gathered and reused / fresh staging per case; appends to
DIR/checkpoint_rows.jsonl (several calls with one DIR make one table).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

# name -> (family, size, architecture overrides, gpus)
CASES = {
    "qwen2.5-1.5b": ("qwen2.5", "1.5B", {}, 1),
    "qwen2.5-3b": ("qwen2.5", "3B", {}, 1),
    # 3 of 24 layers: the whole model's fp32 optimizer state does not fit one card
    "qwen1.5-moe-a2.7b-l3": ("qwen1.5", "A2.7B", {"numLayers": 3}, 1),
    "qwen2.5-1.5b-dp2": ("qwen2.5", "1.5B", {}, 2),
    "qwen2.5-3b-tp2": ("qwen2.5", "3B", {}, 2),
}
PARALLEL = {"qwen2.5-3b-tp2": {"tensor": 2}}
GB = 1e9


class PeakRss:
    """Highest resident set size of this process while the block runs, sampled every 5 ms, minus the start."""

    def __init__(self):
        self.start = self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.rss())

    def __enter__(self):
        self.start = self.peak = self.rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def above_start(self) -> int:
        return self.peak - self.start


def disk_write_rate(folder: Path, nbytes: int) -> float:
    """Bytes per second of one writer putting `nbytes` on the disk of `folder` (64 MiB writes, one fsync)."""
    chunk = bytearray(os.urandom(1 << 20)) * 64
    path = folder / ".disk-rate"
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = nbytes
        while left > 0:
            left -= os.write(fd, memoryview(chunk)[: min(left, len(chunk))])
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - t0
    path.unlink()
    return nbytes / seconds


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def param_checksum(engine) -> float:
    import torch

    return float(torch.stack([p.detach().double().sum() for m in engine.unwrapped() for p in m.parameters()]).sum())


def worker(case: str, path: str, root: Path, out: Path, saves_wanted: int = 2, drop_previous: bool = False) -> int:
    import torch
    import torch.distributed as dist

    from qwen_trainer.checkpoint import store
    from qwen_trainer.checkpoint.staging import HOST_BUFFER
    from qwen_trainer.distenv import read_env
    from qwen_trainer.engines.megatron.testing import built_engine, job_spec, random_micro_batches
    from qwen_trainer.spec import resolve_architecture
    from qwen_trainer.spec.layout import megatron_layout

    family, size, arch_over, _ = CASES[case]
    spec = job_spec(family, size, architecture=arch_over or None, parallelism=PARALLEL.get(case),
                    training={"microBatchSize": 1, "globalBatchSize": 1 * int(os.environ.get("WORLD_SIZE", "1"))
                              // max(PARALLEL.get(case, {}).get("tensor", 1), 1), "seqLength": 4096})
    env = read_env()
    arch = resolve_architecture(spec)
    quiet = lambda _m: None  # noqa: E731
    engine = built_engine(spec, log=quiet)  # as `qwen_trainer run` builds it
    micro = random_micro_batches(spec.training.global_batch_size // engine.data_parallel_size, 1, 4096,
                                 arch.vocab_size, seed=env.rank)

    def timed_steps(n: int, during=None) -> float:
        """Mean seconds of `n` training steps (calling `during` after each, as the loop polls its saves)."""
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            engine.train_step(micro, 1e-5, "mean")
            if during is not None:
                during()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / max(n, 1)

    step_alone_s = timed_steps(3)  # Adam's state exists from here on

    target = root / f"{case}-{path}"
    if env.rank == 0:
        shutil.rmtree(target, ignore_errors=True)
        store.write_model_description(target, engine.hf_config(), None)  # as the loop does before its first save
    dist.barrier()
    kwargs = dict(fmt="mcore", layout=megatron_layout(spec), scheduler={}, fingerprint={}, keep_last=None,
                  save_optimizer=True, rank=env.rank, world=env.world_size, log=quiet)
    async_saves = None
    if path.startswith("sharded-async"):
        from qwen_trainer.checkpoint.sharded import AsyncSaves

        async_saves = AsyncSaves()
    # Two saves with training between them: the first pays one-off costs (the pinned host buffers the GPU copy
    # lands in, the writers' start), the second is what every later checkpoint of a run costs.
    saves = []
    checksum_saved = None
    for iteration in range(1, saves_wanted + 1):
        state = store.TrainState(iteration=iteration, consumed_samples=iteration * spec.training.global_batch_size)
        if drop_previous and iteration > 1:
            if env.rank == 0:
                shutil.rmtree(target / f"iter_{iteration - 1:07d}")
            dist.barrier()
        if iteration == saves_wanted:
            checksum_saved = param_checksum(engine)
        with PeakRss() as save_mem:
            t0 = time.perf_counter()
            store.save(target, state, engine, sharded=path.startswith("sharded"), async_saves=async_saves, **kwargs)
            blocked_s = time.perf_counter() - t0
            steps_during, step_during_s = 0, None
            if async_saves is not None:  # training goes on while the writers write; the loop polls every step
                while async_saves.pending and steps_during < 50:
                    step_during_s = timed_steps(1, during=async_saves.poll)
                    steps_during += 1
                async_saves.wait()
            save_s = time.perf_counter() - t0
        saves.append(dict(save_s=save_s, blocked_s=blocked_s, rss=save_mem.above_start, steps_during=steps_during,
                          step_during_s=step_during_s))
        if iteration < saves_wanted:
            timed_steps(1)
    last = saves[-1]
    save_s, blocked_s = last["save_s"], last["blocked_s"]
    save_peak = max(s["rss"] for s in saves)  # the larger of the two saves' peaks
    nbytes = folder_bytes(target / f"iter_{saves_wanted:07d}")
    dist.barrier()

    with PeakRss() as load_mem:
        t0 = time.perf_counter()
        loaded = store.load(target, saves_wanted, engine, fmt="mcore", rank=env.rank, load_optimizer=True, log=quiet)
        if loaded.optimizer is not None:
            engine.load_optimizer_state_dict(loaded.optimizer)
        torch.cuda.synchronize()
        load_s = time.perf_counter() - t0
    checksum_loaded = param_checksum(engine)
    t0 = time.perf_counter()
    step = engine.train_step(micro, 1e-5, "mean")
    torch.cuda.synchronize()
    first_step_s = time.perf_counter() - t0

    dist.barrier()
    rate = 0.0
    if env.rank == 0:  # after the checkpoints are gone, so the disk holds one copy of the bytes at a time
        for folder in target.glob("iter_*"):
            shutil.rmtree(folder)
        rate = disk_write_rate(target, nbytes)
    mem = torch.tensor([save_peak, load_mem.above_start], dtype=torch.float64, device="cuda")
    everyone = [torch.zeros_like(mem) for _ in range(env.world_size)]
    dist.all_gather(everyone, mem)
    if env.rank == 0:
        params = sum(x.numel() for m in engine.unwrapped() for x in m.parameters())
        row = {"case": case, "path": path, "gpus": env.world_size, "device": torch.cuda.get_device_name(),
               "bytes": nbytes, "save_s": save_s, "blocked_s": blocked_s, "disk_rate": rate,
               "first_save_s": saves[0]["save_s"], "first_blocked_s": saves[0]["blocked_s"],
               "saves": saves_wanted, "step_alone_s": step_alone_s, "steps_during_write": last["steps_during"],
               "step_during_write_s": last["step_during_s"],
               "writers": int(os.environ.get("QWEN_CHECKPOINT_WRITERS", "0")) or None,
               "save_rate": nbytes / save_s, "save_fraction_of_disk": nbytes / save_s / rate,
               "load_s": load_s, "first_step_s": first_step_s, "loss_after_load": step.loss,
               "save_peak_rss_per_rank": [float(m[0]) for m in everyone],
               "load_peak_rss_per_rank": [float(m[1]) for m in everyone],
               "shard_bytes_per_rank": nbytes / env.world_size, "local_parameters_rank0": params,
               "staging": "fresh" if "-fresh" in path else "reuse", "staging_buffer_bytes": HOST_BUFFER.nbytes,
               "staging_buffer_pinned": HOST_BUFFER.pinned, "staging_buffers_made": HOST_BUFFER.allocations,
               "param_checksum_saved": checksum_saved, "param_checksum_loaded": checksum_loaded,
               "restored_exactly": checksum_saved == checksum_loaded}
        with open(out / "checkpoint_rows.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        shutil.rmtree(target, ignore_errors=True)
    engine.close()
    dist.barrier()
    dist.destroy_process_group()
    return 0


def report(rows: list[dict]) -> str:
    lines = ["| case | path | GPUs | checkpoint GB | save s | training blocked s | first save: s, blocked s | "
             "step s alone, during write | save GB/s | disk GB/s | "
             "save / disk | load s | load / save | peak host GB per rank, save | above the shard, GB | "
             "peak host GB per rank, load | restored exactly |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        during = r.get("step_during_write_s")
        lines.append(
            f"| {r['case']} | {r['path']} | {r['gpus']} | {r['bytes'] / GB:.2f} | {r['save_s']:.2f} | "
            f"{r['blocked_s']:.2f} | {r.get('first_save_s', r['save_s']):.2f}, "
            f"{r.get('first_blocked_s', r['blocked_s']):.2f} | {r.get('step_alone_s', 0):.2f}, "
            f"{'-' if during is None else f'{during:.2f}'} | "
            f"{r['save_rate'] / GB:.2f} | {r['disk_rate'] / GB:.2f} | {r['save_fraction_of_disk']:.0%} | "
            f"{r['load_s']:.2f} | {r['load_s'] / r['save_s']:.2f} | "
            f"{' / '.join(f'{m / GB:.2f}' for m in r['save_peak_rss_per_rank'])} | "
            f"{max(r['save_peak_rss_per_rank']) / GB - r['shard_bytes_per_rank'] / GB:+.2f} | "
            f"{' / '.join(f'{m / GB:.2f}' for m in r['load_peak_rss_per_rank'])} | "
            f"{r.get('restored_exactly', '-')} |")
    by_case: dict[str, dict] = {}
    for r in rows:
        by_case.setdefault(r["case"], {})[r["path"]] = r
    for case, paths in by_case.items():
        g = paths.get("gathered")
        for name, s in paths.items():
            if not name.startswith("sharded") or g is None:
                continue
            lines.append(f"{case}, {name} against gathered: save {g['save_s'] / s['save_s']:.1f}x faster, training "
                         f"blocked {g['blocked_s'] / s['blocked_s']:.1f}x shorter, load {g['load_s'] / s['load_s']:.1f}x "
                         f"faster, peak host memory of rank 0 while saving "
                         f"{s['save_peak_rss_per_rank'][0] / max(g['save_peak_rss_per_rank'][0], 1):.2f}x")
        for name, fresh in paths.items():  # the reused staging buffer against megatron-core's per-save tensors
            reuse = paths.get(name.replace("-fresh", ""))
            if "-fresh" not in name or reuse is None:
                continue
            lines.append(f"{case}, {reuse['path']} against {name}: peak host memory of rank 0 while saving "
                         f"{reuse['save_peak_rss_per_rank'][0] / max(fresh['save_peak_rss_per_rank'][0], 1):.2f}x, "
                         f"training blocked {reuse['blocked_s'] / fresh['blocked_s']:.2f}x (first save "
                         f"{reuse['first_blocked_s'] / fresh['first_blocked_s']:.2f}x), save "
                         f"{reuse['save_s'] / fresh['save_s']:.2f}x, load {reuse['load_s'] / fresh['load_s']:.2f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="qwen2.5-1.5b")
    ap.add_argument("--paths", default="sharded,sharded-async,gathered")
    ap.add_argument("--out", type=Path, default=Path("out/checkpoint-bench"))
    ap.add_argument("--root", type=Path, default=Path("/tmp/qwen-checkpoint-bench"))
    ap.add_argument("--saves", type=int, default=2, help="saves per run; the figures are the last one's")
    ap.add_argument("--drop-previous", action="store_true",
                    help="remove the last checkpoint before the next save (a disk that holds only one)")
    ap.add_argument("--worker", nargs=2, metavar=("CASE", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.worker:
        return worker(args.worker[0], args.worker[1], args.root, args.out, args.saves, args.drop_previous)
    failures = 0
    for case in args.cases.split(","):
        if case not in CASES:
            print(f"unknown case {case}; known: {', '.join(CASES)}", file=sys.stderr)
            return 2
        gpus = CASES[case][3]
        for path in args.paths.split(","):
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={gpus}",
                   "--master-port=29533", __file__, "--worker", case, path, "--out", str(args.out),
                   "--root", str(args.root), "--saves", str(args.saves)] + (["--drop-previous"] if args.drop_previous
                                                                              else [])
            writers = path.partition("@")[2]  # sharded@8: eight writer processes per rank
            env = dict(os.environ, **({"QWEN_CHECKPOINT_WRITERS": writers} if writers else {}))
            env["QWEN_CHECKPOINT_STAGING"] = "fresh" if "-fresh" in path else "reuse"
            t0 = time.time()
            done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
            status = "ok" if done.returncode == 0 else f"failed rc={done.returncode}"
            print(f"{case} {path}: {status} ({time.time() - t0:.0f}s)", flush=True)
            if done.returncode != 0:
                failures += 1
                (args.out / f"error-{case}-{path}.txt").write_text(done.stdout[-20000:] + done.stderr[-20000:])
                print(done.stderr[-3000:], file=sys.stderr)
    rows_file = args.out / "checkpoint_rows.jsonl"
    rows = [json.loads(x) for x in rows_file.read_text().splitlines()] if rows_file.is_file() else []
    table = report(rows)
    (args.out / "checkpoint.md").write_text(table + "\n")
    print(table)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
