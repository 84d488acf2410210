"""One benchmark process (run under torchrun for several GPUs): trains one case with the megatron engine (each
listed variant in turn) or with the Hugging Face baseline, and appends one JSON line per run to --out.

Timing: `--warmup` optimiser steps (compilation, allocator warm-up) are discarded, then `--steps` steps are timed
between two device synchronisations. Tokens/s counts every input token of the global batch; TFLOPS uses
Megatron's model-FLOPs formula (qwen_trainer.spec.estimate.flops_per_token, causal attention halved); MFU is against
989 TFLOPS (H100 SXM dense bf16). Peak memory is torch's peak allocation on this rank over the whole run.

Engine runs build and step `MegatronEngine`, the class `qwen_trainer run` trains with, as the training loop does
(process group, build(ctx), train_step with the pretraining loss); only the data (random tokens) and the absent
checkpoints differ.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore")

import torch  # noqa: E402

from cases import CASES, HF_VARIANTS, VARIANTS  # noqa: E402
from hf_parallel import baseline_mode, wrap  # noqa: E402

PEAK_TFLOPS = 989.0
_BASELINE_BYTES = [0]  # memory still allocated from earlier runs in this process, not counted in a run's peak


def _reset_peak() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    _BASELINE_BYTES[0] = torch.cuda.memory_allocated()


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _error_log(out: Path, label: str) -> None:
    """Every rank's traceback, whole, into DIR/errors.txt (a rank other than 0 may be where it starts)."""
    text = f"== {label} rank {_rank()}\n{traceback.format_exc()}"
    with open(out.parent / "errors.txt", "a") as f:
        f.write(text)
    if _rank() == 0:
        print(text, flush=True)


def _record(out: Path, row: dict) -> None:
    if _rank() == 0:
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


KERNEL_GROUPS = [  # (group, substrings of CUDA kernel names), first match wins
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "grouped_mm", "matmul")),
    ("nccl", ("nccl",)),
    ("optimizer", ("adam", "multi_tensor", "foreach", "l2norm", "norm_kernel")),
    ("grad accumulation", ("accumulate",)),  # the engine's kernel adding bf16 gradients into the fp32 buffer
    ("triton/compiled", ("triton",)),
    ("reduce", ("reduce",)),
    ("copy/cast", ("copy", "cast", "convert", "fill", "memcpy", "memset")),
    ("elementwise", ("elementwise", "vectorized", "unrolled")),
]


def _group(name: str) -> str:
    low = name.lower()
    for group, keys in KERNEL_GROUPS:
        if any(k in low for k in keys):
            return group
    return "other"


_NAME_NOISE = ("void ", "at::native::", "(anonymous namespace)::", "c10::")


def _short(kernel_name: str) -> str:
    """A kernel's name without the namespaces and keywords that make every torch kernel name start alike."""
    for noise in _NAME_NOISE:
        kernel_name = kernel_name.replace(noise, "")
    return kernel_name


def kernel_times(events) -> dict[str, list]:
    """name -> [microseconds, calls] of the GPU kernels among (name, on_gpu, is_annotation, us) events. The
    profiler also puts user annotations on the GPU timeline (the optimizer's `Optimizer.step#AdamW.step` spans
    its kernels); they are ranges around kernels already counted, so summing them would count that time twice."""
    kernels: dict[str, list] = {}
    for name, on_gpu, is_annotation, us in events:
        if on_gpu and not is_annotation:
            k = kernels.setdefault(name, [0.0, 0])
            k[0] += us
            k[1] += 1
    return kernels


def kernel_summary(kernels: dict[str, list], label: str, wall: float, top: int = 25) -> list[str]:
    """The profile's report lines: kernel time against the step's wall time, by group, then the top kernels."""
    total_us = sum(v[0] for v in kernels.values()) or 1e-9
    groups: dict[str, float] = {}
    for name, (us, _) in kernels.items():
        groups[_group(name)] = groups.get(_group(name), 0.0) + us
    lines = [f"== {label}: step wall {wall * 1e3:.1f} ms, GPU kernel time {total_us / 1e3:.1f} ms "
             f"({100 * total_us / 1e6 / wall:.1f}% of wall), {sum(v[1] for v in kernels.values())} kernels"]
    for g, us in sorted(groups.items(), key=lambda kv: -kv[1]):
        lines.append(f"   {g:18s} {us / 1e3:9.1f} ms {100 * us / total_us:5.1f}%")
    lines.append("   top kernels (ms, calls):")
    for name, (us, n) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"   {us / 1e3:9.2f} {n:6d}  {_short(name)[:170]}")
    return lines


def profile_step(step, label: str) -> None:
    """One more step under torch.profiler: GPU kernel time by group and the top kernels, against the step's
    wall time (the difference is time the GPU sat idle, waiting for the host). Appended to $BENCH_PROFILE."""
    path = os.environ.get("BENCH_PROFILE")
    if not path or _rank() != 0:
        if path:
            step()
        return
    from torch.profiler import ProfilerActivity, profile

    try:
        _profile(step, label, path, ProfilerActivity, profile)
    except Exception as err:  # the profile is a diagnostic: never lose the measured row over it
        print(f"profile of {label} failed: {type(err).__name__}: {err}", flush=True)


def sync_sites(step, label: str, frames: int = 4) -> None:
    """One more step under torch's CUDA sync debug mode: every operation that made the host wait for the GPU,
    counted by its Python call site (the innermost frames outside torch), appended to $BENCH_SYNCS. A wait inside
    the backward is reported where backward() was called (autograd hands its warnings to the calling thread)."""
    import collections
    import traceback as tb

    path = os.environ.get("BENCH_SYNCS")
    if not path:
        return
    sites: collections.Counter = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" not in str(message):
            return
        stack = [f for f in tb.extract_stack()[:-1] if "/torch/" not in f.filename and "warnings" not in f.filename]
        where = " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(stack[-frames:]))
        sites[f"{str(message).split(',')[0][:60]} @ {where}"] += 1

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    except Exception as err:  # a diagnostic: never lose the measured row over it
        sites[f"sync listing failed: {type(err).__name__}: {err}"] += 1
    if _rank() == 0:
        lines = [f"== {label}: {sum(sites.values())} host waits in one step"]
        lines += [f"   {n:4d}x  {site}" for site, n in sites.most_common()]
        with open(path, "a") as f:
            f.write("\n".join(lines) + "\n")


class _Trace:
    """A chrome trace's GPU kernels in time order, and for each the host op stack that launched it."""

    def __init__(self, trace: dict):
        events = trace.get("traceEvents", [])
        self.kernels = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
                               and "dur" in e), key=lambda e: e["ts"])
        self._launches = {e["args"].get("correlation"): e for e in events
                          if e.get("cat") in ("cuda_runtime", "cuda_driver") and "args" in e}
        self._ops = sorted((e for e in events if e.get("cat") in ("cpu_op", "python_function", "user_annotation")
                            and "dur" in e), key=lambda e: e["ts"])
        self._starts = [o["ts"] for o in self._ops]

    def launch(self, kernel: dict) -> dict | None:
        return self._launches.get(kernel.get("args", {}).get("correlation"))

    def stack_at(self, tid, ts) -> str:
        """outermost > innermost host op running on thread `tid` at time `ts`."""
        import bisect

        names, i = [], bisect.bisect_right(self._starts, ts)
        for o in self._ops[max(0, i - 4000):i]:
            if o.get("tid") == tid and o["ts"] <= ts <= o["ts"] + o["dur"]:
                names.append(o["name"])
        return " > ".join([names[0], names[-1]] if len(names) > 1 else names) or "?"

    def launched_by(self, kernel: dict) -> str:
        launch = self.launch(kernel)
        return self.stack_at(launch.get("tid"), launch["ts"]) if launch else "?"


def idle_gaps(trace, min_gap_us: float = 20.0, top: int = 15) -> list[str]:
    """GPU idle time between kernels, from a chrome trace: each gap before a kernel is attributed to the CPU ops
    (outermost > innermost) that were running when that kernel was launched, and marked "host late" when the
    launch itself came after the GPU had gone idle (the host was the bottleneck) rather than before it. `trace`: the
    chrome trace's dict or its parsed `_Trace`."""
    t = trace if isinstance(trace, _Trace) else _Trace(trace)
    gaps: dict[str, list] = {}
    end = t.kernels[0]["ts"] + t.kernels[0]["dur"] if t.kernels else 0
    for k in t.kernels[1:]:
        gap = k["ts"] - end
        if gap >= min_gap_us:
            launch = t.launch(k)
            late = launch is not None and launch["ts"] > end
            g = gaps.setdefault(("host late: " if late else "waiting: ") + t.launched_by(k), [0.0, 0])
            g[0] += gap
            g[1] += 1
        end = max(end, k["ts"] + k["dur"])
    total = sum(v[0] for v in gaps.values())
    lines = [f"   idle gaps >= {min_gap_us:.0f} us: {total / 1e3:.1f} ms in {sum(v[1] for v in gaps.values())} gaps"]
    for where, (us, n) in sorted(gaps.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"   {us / 1e3:8.2f} ms {n:5d}x  {where[:160]}")
    return lines


def launch_sites(trace, top: int = 30) -> list[str]:
    """GPU time by (host op that launched it, kernel), largest first: which model code each kernel's time
    belongs to, where kernel names alone (elementwise, copy) do not say. `trace` as for idle_gaps."""
    t = trace if isinstance(trace, _Trace) else _Trace(trace)
    sites: dict[tuple[str, str], list] = {}
    for k in t.kernels:
        site = sites.setdefault((t.launched_by(k), k.get("name", "?")), [0.0, 0])
        site[0] += k["dur"]
        site[1] += 1
    lines = ["   GPU time by launching host op (ms, kernels):"]
    for (where, name), (us, n) in sorted(sites.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"   {us / 1e3:9.2f} {n:6d}  {where[:90]} :: {_short(name)[:90]}")
    return lines


def _profile(step, label, path, ProfilerActivity, profile) -> None:
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    kernels = kernel_times((e.name, e.device_type == torch.autograd.DeviceType.CUDA,
                            bool(getattr(e, "is_user_annotation", False)), e.time_range.elapsed_us())
                           for e in prof.events())
    if not kernels:  # this torch keeps kernels only under their CPU ops: fall back to its own table
        with open(path, "a") as f:
            f.write(f"== {label}: step wall {wall * 1e3:.1f} ms\n"
                    + prof.key_averages().table(sort_by="self_device_time_total", row_limit=30) + "\n")
        return
    lines = kernel_summary(kernels, label, wall)
    try:
        import tempfile

        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            prof.export_chrome_trace(tmp.name)
            trace = _Trace(json.load(open(tmp.name)))
        lines += launch_sites(trace)
        lines += idle_gaps(trace)
    except Exception as err:
        lines.append(f"   trace analysis failed: {type(err).__name__}: {err}")
    with open(path, "a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def _figures(case, arch, seconds: float, steps: int) -> dict:
    from qwen_trainer.spec.estimate import flops_per_token

    tokens = case.global_batch * case.seq * steps
    tps_gpu = tokens / seconds / case.gpus
    tflops = tps_gpu * flops_per_token(arch, case.seq) / 1e12
    return dict(tokens_per_s_per_gpu=round(tps_gpu, 1), tflops_per_gpu=round(tflops, 1),
                mfu=round(tflops / PEAK_TFLOPS, 4), step_s=round(seconds / steps, 4),
                peak_mem_gib=round((torch.cuda.max_memory_allocated() - _BASELINE_BYTES[0]) / 2**30, 2),
                reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2))


def consecutive_steps(engine, batches, lr, n: int) -> list:
    """`n` steps as the training loop runs them (qwen_trainer.train, through its StepReader): each step's figures
    read back once the next step is launched, the last one's at the end."""
    from qwen_trainer.engines.base import launch_step
    from qwen_trainer.readback import StepReader

    results: list = []
    reader = StepReader(lambda _it, _lr, step: results.append(step.result()))
    for it in range(n):
        reader.launched(it, lr, launch_step(engine, batches, lr, "mean"))
    reader.flush()
    return results


def run_megatron(case, variants, steps, warmup, out):
    from qwen_trainer.engines.megatron import EngineOptions, MegatronEngine, data_parallel_info
    from qwen_trainer.engines.megatron.testing import built_engine, job_spec, random_micro_batches
    from qwen_trainer.spec import resolve_architecture

    spec = job_spec(case.family, case.size, **case.spec_args())
    arch = resolve_architecture(spec)
    lr = spec.training.lr
    for variant in variants:
        row = dict(case=case.name, impl="megatron", variant=variant, gpus=case.gpus,
                   device=torch.cuda.get_device_name(), options=VARIANTS[variant])
        engine = None
        try:
            # The class `qwen_trainer run` trains with, built and stepped as the training loop does (pretraining loss).
            _reset_peak()
            engine = built_engine(spec, EngineOptions(**VARIANTS[variant]))
            row.update(attention=engine.plan.attention, experts=engine.plan.experts, core=type(engine).__name__)
            assert isinstance(engine, MegatronEngine)
            dp, dp_rank = data_parallel_info()
            n_micro = case.global_batch // (case.micro_batch * dp)
            batches = random_micro_batches(n_micro, case.micro_batch, case.seq, arch.vocab_size, seed=100 + dp_rank)
            results = consecutive_steps(engine, batches, lr, warmup)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            results += consecutive_steps(engine, batches, lr, steps)
            torch.cuda.synchronize()
            row.update(_figures(case, arch, time.perf_counter() - t0, steps))
            # every step's loss (the result's floats, read after the timing): the loss curve the variants share
            losses = [float(x.loss) for x in results]
            row.update(first_loss=round(losses[0], 4), last_loss=round(losses[-1], 4), notes=engine.notes,
                       losses=losses)
            if engine.whole_step_graph_replays:  # the timed steps' forward and backward came from the graph
                row["graph_replays"] = engine.whole_step_graph_replays
            profile_step(functools.partial(engine.train_step, batches, lr, "mean"), f"{case.name} megatron {variant}")
            sync_sites(functools.partial(engine.train_step, batches, lr, "mean"), f"{case.name} megatron {variant}")
            gqa = {getattr(m, "_gqa_native", None) for c in engine.unwrapped() for m in c.modules()
                   if type(m).__name__ == "SDPAAttention"}
            if gqa - {None}:
                row["sdpa_gqa_native"] = sorted(gqa - {None})
            paths = {getattr(m, "path", None) for c in engine.unwrapped() for m in c.modules()
                     if type(m).__name__ == "SDPAAttention"} - {None}
            if paths:
                row["sdpa_path"] = sorted(f"{b}{'' if native else '+repeat-kv'}" for b, native in paths)
        except Exception as err:  # record and go on with the next variant
            row.update(error=f"{type(err).__name__}: {str(err)[:400]}", traceback=traceback.format_exc()[-2000:])
            _error_log(out, f"{case.name} megatron {variant}")
        finally:
            if engine is not None:
                try:
                    engine.close()
                except Exception:
                    pass
            del engine
            gc.collect()
            torch.cuda.empty_cache()
        _record(out, row)


def run_hf(case, steps, warmup, out, variant: str = "baseline"):
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from qwen_trainer.engines.hf_model import hf_config
    from qwen_trainer.engines.megatron.testing import job_spec, random_micro_batches
    from qwen_trainer.spec import resolve_architecture

    spec = job_spec(case.family, case.size, **case.spec_args())
    arch = resolve_architecture(spec)
    world, rank = _world(), _rank()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl")
    row = dict(case=case.name, impl="hf", variant=variant, gpus=case.gpus, device=torch.cuda.get_device_name())
    try:
        torch.manual_seed(0)
        _reset_peak()
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(hf_config(arch), dtype=torch.bfloat16,
                                                     attn_implementation="sdpa", **HF_VARIANTS[variant])
        model.config.use_cache = False
        model.train()
        row["experts_implementation"] = str(getattr(model.config, "_experts_implementation", None))
        row["transformers"] = __import__("transformers").__version__
        mode = baseline_mode(case.baseline, world)
        row["parallel"] = mode
        net, sync = wrap(model, mode, local)
        t = spec.training
        opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                                weight_decay=t.weight_decay, fused=True)
        n_micro = case.global_batch // (case.micro_batch * world)
        batches = random_micro_batches(n_micro, case.micro_batch, case.seq, arch.vocab_size, seed=100 + rank)
        batches = [(b.tokens.cuda(), b.position_ids.cuda()) for b in batches]

        def step():
            total = 0.0
            for i, (tokens, pos) in enumerate(batches):
                with sync(i == n_micro - 1):
                    loss = net(input_ids=tokens, position_ids=pos, labels=tokens).loss
                    (loss / n_micro).backward()
                total += loss.detach()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(total) / n_micro

        first = None
        for _ in range(warmup):
            loss = step()
            first = first if first is not None else loss
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = step()
        torch.cuda.synchronize()
        row.update(_figures(case, arch, time.perf_counter() - t0, steps))
        row.update(first_loss=round(first, 4), last_loss=round(loss, 4))
        profile_step(step, f"{case.name} hf {variant}")
    except Exception as err:
        row.update(error=f"{type(err).__name__}: {str(err)[:400]}", traceback=traceback.format_exc()[-2000:])
        _error_log(out, f"{case.name} hf {variant}")
    _record(out, row)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", required=True, choices=sorted(CASES))
    ap.add_argument("--impl", required=True, choices=["megatron", "hf"])
    ap.add_argument("--variants", default=None, help="comma list (default: best, or baseline with --impl hf)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    case = CASES[a.case]
    out = Path(a.out)
    known = HF_VARIANTS if a.impl == "hf" else VARIANTS
    variants = [v for v in (a.variants or ("baseline" if a.impl == "hf" else "best")).split(",") if v]
    unknown = [v for v in variants if v not in known]
    if unknown:
        ap.error(f"unknown {a.impl} variant(s) {', '.join(unknown)}; known: {', '.join(known)}")
    if a.impl == "hf":
        for variant in variants:
            run_hf(case, a.steps, a.warmup, out, variant)
    else:
        run_megatron(case, variants, a.steps, a.warmup, out)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
