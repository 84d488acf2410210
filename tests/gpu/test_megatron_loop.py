"""GPU check of the megatron engine inside the real training loop (2 GPUs): `torchrun -m qwen_trainer run --spec FILE`
with QWEN_TRAINER_ENGINE=auto picks the megatron engine and trains tiny Qwen models on a Megatron dataset.

Cases (each from the same seeded HF checkpoint as its CPU reference, 2 processes):
    dense-tp2   Qwen2.5-shaped (tied embeddings, qkv bias), tensor parallel 2 + sequence parallel
    moe-ep2     Qwen2-MoE-shaped (4 experts top-2, shared expert with gate), expert parallel 2 x data parallel 2
    dense-pp2   Qwen2.5-shaped, pipeline parallel 2 (1F1B schedule)
    dense-dp2-graphs  Qwen2.5-shaped, data parallel 2, every layer captured as CUDA graphs (training.cudaGraphs)

For dense-tp2, moe-ep2 and dense-dp2-graphs the first run is killed (SIGKILL of rank 1 before step 15) after the checkpoint of
iteration 10; the second run resumes from it and finishes 20 iterations. Checked: the loss falls, checkpoints are
every rank's shards (torch_dist) and load back through the converter, the resumed run repeats
iterations 11-14 of the killed one within RESUME_TOLERANCE (optimizer state restored; GPU kernels are not bitwise
deterministic), and the first step's loss equals the fp32 CPU engine's on the same weights and data within
FIRST_STEP_TOLERANCE (bf16 weights and activations against fp32; about 0.3 % of ln 600).

The runs of all cases start together (tiny models share the two GPUs), so the module takes about two launches.

Run on a GPU machine: python -m pytest tests/gpu/test_megatron_loop.py -s
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                 reason="needs 2 CUDA GPUs")]

REPO = Path(__file__).resolve().parents[2]
FIRST_STEP_TOLERANCE = 0.02
RESUME_TOLERANCE = 0.02
TINY_ARCH = {"numLayers": 2, "hiddenSize": 64, "ffnHiddenSize": 128, "numAttentionHeads": 4, "numQueryGroups": 2,
             "vocabSize": 600, "maxPositionEmbeddings": 256}
MOE = {"numExperts": 4, "topK": 2, "ffnHiddenSize": 32, "sharedExpertFfnHiddenSize": 64}
CASES = {
    "dense-tp2": dict(family="qwen2.5", size="0.5B", parallelism={"tensor": 2, "sequenceParallel": True},
                      iters=20, save=10, fault="step@15:1"),
    "moe-ep2": dict(family="qwen2", size="A14B", moe=MOE, parallelism={"expert": 2}, iters=20, save=10,
                    fault="step@15:1"),
    "dense-pp2": dict(family="qwen2.5", size="0.5B", parallelism={"pipeline": 2}, iters=8, save=8, fault=None),
    "dense-dp2-graphs": dict(family="qwen2.5", size="0.5B", parallelism={}, training={"cudaGraphs": True},
                             iters=20, save=10, fault="step@15:1"),
}


@dataclass
class Run:
    case: str
    spec_path: Path
    source: Path
    out: Path
    first: subprocess.CompletedProcess
    second: subprocess.CompletedProcess | None

    @property
    def final(self) -> subprocess.CompletedProcess:
        return self.second or self.first


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"


def _launch(spec_path: Path, log: Path, fault: str | None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "qwen_trainer", "run", "--spec", str(spec_path)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2", "QWEN_TRAINER_ENGINE": "auto"}
    env.pop("QWEN_TRAINER_FAULT", None)
    if fault:
        env["QWEN_TRAINER_FAULT"] = fault
    with open(log, "w") as out, open(str(log) + ".err", "w") as err:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err, text=True)


def _finish(proc: subprocess.Popen, log: Path, timeout: float) -> subprocess.CompletedProcess:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, Path(log).read_text(),
                                       Path(str(log) + ".err").read_text())


def _spec_dict(data: dict, case: str, out: Path, source: Path) -> dict:
    c = CASES[case]
    model = {"family": c["family"], "size": c["size"], "tokenizerPath": data["tokenizer"],
             "architecture": dict(TINY_ARCH)}
    if c.get("moe"):
        model["moe"] = dict(c["moe"])
    return {
        "stage": "pretrain",
        "model": model,
        "parallelism": dict(c["parallelism"]),
        "training": {"microBatchSize": 2, "globalBatchSize": 8, "seqLength": 64, "trainIters": c["iters"],
                     "warmupIters": 2, "lr": 3e-3, "minLr": 3e-4, "saveInterval": c["save"], "evalInterval": 10,
                     "evalIters": 1, "logInterval": 1, "activationCheckpointing": {"mode": "none"},
                     **c.get("training", {})},
        "data": {"pretrain": {"prefixes": [{"path": data["prefix"]}], "split": "95,5,0"}},
        "checkpoint": {"output": {"path": str(out)}, "source": {"path": str(source), "format": "hf"}},
    }


def _write_source(spec_dict: dict, folder: Path, tokenizer: str, seed: int) -> None:
    from qwen_trainer.checkpoint.weights import write_hf_folder
    from qwen_trainer.engines.hf_model import hf_config
    from qwen_trainer.engines.megatron.testing import hf_reference
    from qwen_trainer.spec import JobSpec, resolve_architecture

    arch = resolve_architecture(JobSpec.model_validate(spec_dict))
    _, weights = hf_reference(arch, seed=seed, init_std=0.02)
    write_hf_folder(folder, weights, hf_config(arch), tokenizer)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    from qwen_trainer.data.preprocess import preprocess
    from qwen_trainer.data.synthetic import make_demo_data

    root = tmp_path_factory.mktemp("megatron-loop-data")
    made = make_demo_data(root, vocab_size=600, sft_samples=8, corpus_repeat=2)
    result = preprocess(made["corpus"], str(root / "corpus"), made["tokenizer"], workers=1, progress=False,
                        log=lambda *_a, **_k: None)
    return {**made, "prefix": result.prefix}


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory) -> dict[str, Run]:
    import yaml

    prepared = {}
    for i, case in enumerate(CASES):
        root = tmp_path_factory.mktemp(case)
        out, source = root / "ckpt", root / "hf-source"
        spec = _spec_dict(data, case, out, source)
        _write_source(spec, source, data["tokenizer"], seed=11 + i)
        spec_path = root / "job.yaml"
        spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
        prepared[case] = (root, spec_path, source, out)
    # first runs of every case together, then the resumed runs together
    first = {case: _launch(p[1], p[0] / "first.log", CASES[case]["fault"]) for case, p in prepared.items()}
    first = {case: _finish(proc, prepared[case][0] / "first.log", 300) for case, proc in first.items()}
    again = [case for case in CASES if CASES[case]["fault"]]
    second = {case: _launch(prepared[case][1], prepared[case][0] / "second.log", None) for case in again}
    second = {case: _finish(proc, prepared[case][0] / "second.log", 300) for case, proc in second.items()}
    out = {}
    for case, (root, spec_path, source, ckpt) in prepared.items():
        out[case] = Run(case, spec_path, source, ckpt, first[case], second.get(case))
        print(f"\n===== {case}: first run =====\n{first[case].stdout[-3000:]}\n{first[case].stderr[-3000:]}")
        if case in second:
            print(f"===== {case}: resumed run =====\n{second[case].stdout[-3000:]}\n{second[case].stderr[-3000:]}")
    return out


def _segments(out: Path) -> list[list[dict]]:
    """metrics.jsonl split into runs (each starts with a "start" event)."""
    segs: list[list[dict]] = []
    for line in (out / "logs" / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("event") == "start":
            segs.append([])
        segs[-1].append(r)
    return segs


def _train_losses(records: list[dict]) -> dict[int, float]:
    return {r["iteration"]: r["loss"] for r in records if r.get("event") == "train"}


@pytest.mark.parametrize("case", list(CASES))
def test_trains_with_the_megatron_engine_and_the_loss_falls(runs, case):
    run = runs[case]
    assert run.final.returncode == 0, _explain(run.final)
    if run.second is not None:
        assert run.first.returncode != 0, "the killed rank must bring the first run down"
    assert "engine=megatron" in run.first.stdout and "stage=pretrain engine=megatron" in run.first.stdout
    assert "engine=cpu" not in run.first.stdout
    graphs = "on" if CASES[case].get("training", {}).get("cudaGraphs") else "off"
    assert f"cuda-graphs={graphs}" in run.first.stdout and f"cuda-graphs={graphs}" in run.final.stdout
    segs = _segments(run.out)
    records = [r for seg in segs for r in seg if r.get("event") == "train"]
    assert records and all(r["engine"] == "megatron" for r in records)
    curve: dict[int, float] = {}
    for seg in segs:
        curve.update(_train_losses(seg))  # the resumed run's records win
    iters = CASES[case]["iters"]
    assert sorted(curve) == list(range(1, iters + 1))
    assert all(math.isfinite(v) for v in curve.values())
    first, last = [curve[i] for i in (1, 2, 3)], [curve[i] for i in range(iters - 2, iters + 1)]
    margin = 0.3 if iters >= 20 else 0.05
    print(f"{case}: loss {first} ... {last}")
    assert sum(last) / 3 < sum(first) / 3 - margin, (first, last)
    valid = [r for seg in segs for r in seg if r.get("event") == "valid"]
    if iters >= 10:
        assert valid and all(math.isfinite(r["loss"]) for r in valid), valid
    if CASES[case].get("moe"):
        # megatron's unweighted load-balancing loss (this preset: seq_aux_loss); about 1 for an even router
        assert all(r.get("aux_loss") is not None and 0.0 < r["aux_loss"] < 10.0 for r in records), records[:3]


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_is_sharded_and_loads_back(runs, case):
    """Every rank wrote its own shard (torch_dist, qwen_trainer.checkpoint.sharded), optimizer state included; the
    converter reads the full weights back (what the export stage does)."""
    from qwen_trainer.checkpoint.sharded import is_sharded, saved_keys
    from qwen_trainer.checkpoint.weights import read_weights
    from qwen_trainer.engines.megatron.weights import weight_problems
    from qwen_trainer.spec import JobSpec, resolve_architecture

    run = runs[case]
    assert run.final.returncode == 0, _explain(run.final)
    iters = CASES[case]["iters"]
    last = run.out / f"iter_{iters:07d}"
    assert (run.out / "latest_checkpointed_iteration.txt").read_text() == str(iters)
    assert is_sharded(last) and not list(last.glob("mp_rank_*"))
    keys = saved_keys(last)
    assert any(k.startswith("decoder.layers.") for k in keys) and any(k.startswith("optimizer.") for k in keys)
    import yaml

    arch = resolve_architecture(JobSpec.model_validate(yaml.safe_load(run.spec_path.read_text())))
    trained = read_weights(last, "mcore")  # the spec's format name; the folder is recognised as torch_dist
    assert weight_problems(arch, trained) == []
    assert all(torch.isfinite(v.float()).all() for v in trained.values())
    source = read_weights(run.source, "hf")
    moved = [k for k in source if not torch.equal(source[k].to(trained[k].dtype), trained[k])]
    assert len(moved) > len(source) // 2, "training must have changed the weights"
    state = torch.load(last / "trainer_state.pt", map_location="cpu", weights_only=False)
    assert state["engine"] == "megatron" and state["iteration"] == iters and state["format"] == "torch_dist"
    assert state["layout"]["world"] == 2


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c]["fault"]])
def test_restart_resumes_from_the_checkpoint_and_continues(runs, case):
    run = runs[case]
    assert run.second is not None and run.second.returncode == 0, _explain(run.second)
    assert "resumed from" in run.second.stdout and "iteration 10" in run.second.stdout
    assert "starting the optimizer afresh" not in run.second.stdout
    segs = _segments(run.out)
    assert len(segs) == 2
    killed, resumed = _train_losses(segs[0]), _train_losses(segs[1])
    assert min(resumed) == 11 and max(killed) >= 13, (sorted(killed), sorted(resumed))
    both = sorted(set(killed) & set(resumed))
    diffs = {i: abs(killed[i] - resumed[i]) for i in both}
    print(f"{case}: killed run {[round(killed[i], 5) for i in both]} resumed {[round(resumed[i], 5) for i in both]} "
          f"max abs diff {max(diffs.values()):.2e}")
    assert max(diffs.values()) < RESUME_TOLERANCE, diffs


@pytest.mark.parametrize("case", list(CASES))
def test_first_step_loss_matches_the_cpu_engine(runs, case, tmp_path):
    """The CPU engine (fp32) on the same source weights and the same first global batch."""
    import yaml

    from qwen_trainer.checkpoint.weights import read_weights
    from qwen_trainer.data import batches
    from qwen_trainer.distenv import DistEnv
    from qwen_trainer.engines import EngineContext
    from qwen_trainer.engines.cpu import CpuEngine
    from qwen_trainer.spec import JobSpec, derive, resolve_architecture
    from qwen_trainer.train import build_data, tokenizer_dir

    run = runs[case]
    assert run.first.stdout, _explain(run.first)
    spec = JobSpec.model_validate(yaml.safe_load(run.spec_path.read_text()))
    arch = resolve_architecture(spec)
    derived = derive(spec)
    t = spec.training
    train_src, _ = build_data(spec, arch, tokenizer_dir(spec), tmp_path, derived.train_iters * t.global_batch_size,
                              t.eval_iters * t.global_batch_size, lambda _m: None)
    mbs = batches.step_micro_batches(train_src, 0, t.global_batch_size, t.micro_batch_size, 1, 0)
    engine = CpuEngine()
    engine.build(EngineContext(spec, arch, DistEnv(0, 1, 0, 1, None, None, False), derived.init_method_std, t.seed,
                               lambda _m: None))
    engine.load_checkpoint_weights(read_weights(run.source, "hf"))
    reference = engine.train_step(mbs, 0.0, "mean").loss
    megatron = _train_losses(_segments(run.out)[0])[1]
    print(f"{case}: first-step loss cpu fp32 {reference:.6f} megatron bf16 {megatron:.6f} "
          f"abs diff {abs(reference - megatron):.2e} (tolerance {FIRST_STEP_TOLERANCE})")
    assert abs(reference - megatron) < FIRST_STEP_TOLERANCE
