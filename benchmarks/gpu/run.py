"""GPU throughput benchmark: the megatron engine against the Hugging Face transformers baseline, side by side.

    python benchmarks/gpu/run.py --cases qwen2.5-1.5b,qwen1.5-moe-a2.7b-l4 --out DIR [--steps 6 --warmup 3]
    python benchmarks/gpu/run.py --list
    python benchmarks/gpu/run.py --cases qwen1.5-moe-a2.7b-l3 --variants best,no-whole-step-graph --repeat 3 --no-baseline

Every case runs the baseline and the engine variants on the same card(s) in this one invocation. With several GPUs,
one-GPU cases are spread over the cards (a case and its baseline always share one card); cases needing more GPUs
than are visible are skipped and listed as not run. Writes DIR/results.json, DIR/results.md, DIR/throughput.png
and DIR/bench.log.
"""

from __future__ import annotations

import argparse
import re
import datetime
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from cases import CASES, VARIANTS  # noqa: E402


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"


def _launch(case, impl: str, variants: list[str], gpus: list[int], args, part: Path, log) -> int:
    worker = str(HERE / "worker.py")
    common = ["--case", case.name, "--impl", impl, "--variants", ",".join(variants), "--steps", str(args.steps),
              "--warmup", str(args.warmup), "--out", str(part)]
    if len(gpus) == 1:
        cmd = [sys.executable, worker, *common]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={len(gpus)}",
               worker, *common]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(map(str, gpus)), PYTHONUNBUFFERED="1")
    if args.profile:
        env["BENCH_PROFILE"] = str(part.parent / "profiles.txt")
    if args.syncs:
        env["BENCH_SYNCS"] = str(part.parent / "syncs.txt")
    if case.parallelism.get("tensor", 1) > 1:
        env["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    start = time.time()
    log(f"[{time.strftime('%H:%M:%S')}] gpus={gpus} {case.name} {impl} {','.join(variants)}")
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=args.case_timeout)
    tail = "\n".join(proc.stdout.splitlines()[-40:]) if proc.returncode else ""
    log(f"[{time.strftime('%H:%M:%S')}] done {case.name} {impl} rc={proc.returncode} in {time.time() - start:.0f}s"
        + (f"\n{tail}" if tail else ""))
    return proc.returncode


def _run_case(case, gpus, args, part, log):
    if case.baseline != "none" and not args.no_baseline:
        # --only-best is the headline comparison: transformers' default, not its reference rows
        for hf_variant in case.hf_variants[:1] if args.only_best else case.hf_variants:
            _launch(case, "hf", [hf_variant], gpus, args, part, log)
    variants = list(args.variants or case.variants)  # --variants may name any variant, listed by the case or not
    if args.only_best:
        variants = ["best"]
    for order in rounds(variants, args.repeat):
        if args.shared_process:
            _launch(case, "megatron", order, gpus, args, part, log)
        else:  # a fresh process per variant: no compiled-kernel or allocator state carried between measurements
            for v in order:
                _launch(case, "megatron", [v], gpus, args, part, log)


def rounds(variants: list[str], repeat: int) -> list[list[str]]:
    """The variants' order in each of `repeat` rounds: forwards, then backwards, alternately, so that no variant
    always runs first on a cold card or last after the others have warmed it."""
    return [list(variants) if i % 2 == 0 else list(reversed(variants)) for i in range(repeat)] if variants else []


def repeat_summary(rows: list[dict]) -> list[dict]:
    """Per case and engine variant measured more than once (--repeat): the runs' median tokens/s, their range, the
    median MFU, and the median's ratio to the median of the case's "best" runs."""
    import statistics

    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r["impl"] == "megatron" and "error" not in r:
            groups.setdefault((r["case"], r["variant"]), []).append(r)
    out = []
    for (case, variant), runs in groups.items():
        if len(runs) < 2:
            continue
        speeds = [r["tokens_per_s_per_gpu"] for r in runs]
        out.append(dict(case=case, variant=variant, runs=len(runs), median=statistics.median(speeds),
                        low=min(speeds), high=max(speeds), mfu=statistics.median(r["mfu"] for r in runs)))
    best = {s["case"]: s["median"] for s in out if s["variant"] == "best"}
    for s in out:
        if s["case"] in best:
            s["vs_best"] = round(s["median"] / best[s["case"]], 3)
    return out


def curve_difference(losses: list[float], reference: list[float]) -> float:
    """Largest relative difference between two runs' per-step losses over the steps both ran."""
    steps = min(len(losses), len(reference))
    return max(abs(a - b) / abs(b) for a, b in zip(losses[:steps], reference[:steps]))


def summarise(rows: list[dict]) -> list[dict]:
    """Adds speedup over the baseline and data-parallel scaling efficiency."""
    base = {r["case"]: r for r in rows if r["impl"] == "hf" and r["variant"] == "baseline" and "error" not in r}
    eager = {r["case"]: r for r in rows if r["impl"] == "hf" and r["variant"] == "experts-eager" and "error" not in r}
    one_gpu = {r["case"]: r for r in rows if r["impl"] == "megatron" and r["variant"] == "best" and "error" not in r}
    for r in rows:
        ref = one_gpu.get(r["case"])
        if r["impl"] == "megatron" and ref is not None and r is not ref and r.get("losses") and ref.get("losses"):
            r["loss_curve_vs_best"] = curve_difference(r["losses"], ref["losses"])
        b = base.get(r["case"])
        if r["impl"] == "megatron" and b and "error" not in r:
            r["speedup_vs_hf"] = round(r["tokens_per_s_per_gpu"] / b["tokens_per_s_per_gpu"], 3)
        if r["impl"] == "megatron" and r["case"] in eager and "error" not in r:
            r["speedup_vs_hf_experts_eager"] = round(
                r["tokens_per_s_per_gpu"] / eager[r["case"]]["tokens_per_s_per_gpu"], 3)
        dp = re.search(r"-dp\d+$", r["case"])
        single = r["case"][: dp.start()] if dp else r["case"]
        if dp and "error" not in r:
            hf_refs = {"baseline": base, "experts-eager": eager}.get(r["variant"], {})
            ref = one_gpu.get(single) if r["impl"] == "megatron" else hf_refs.get(single)
            if ref:
                r["scaling_efficiency"] = round(r["tokens_per_s_per_gpu"] / ref["tokens_per_s_per_gpu"], 3)
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"Device: **{meta['device']}** x{meta['gpus_visible']}, {meta['date']}; "
             f"torch {meta['torch']}, transformers {meta['transformers']}, megatron-core {meta['megatron_core']}.",
             "", "| case | impl | variant | tokens/s/GPU | TFLOPS/GPU | MFU | vs HF | DP scaling | peak GiB | note |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['impl']} | {r['variant']} | - | - | - | - | - | - | error: "
                         f"{r['error'][:120].replace('|', '/')} |")
            continue
        speed = f"{r['speedup_vs_hf']:.2f}x" if "speedup_vs_hf" in r else ""
        scale = f"{100 * r['scaling_efficiency']:.0f}%" if "scaling_efficiency" in r else ""
        note = r.get("experts") if r.get("experts") not in (None, "none") else ""
        if "speedup_vs_hf_experts_eager" in r:
            note += f"; {r['speedup_vs_hf_experts_eager']:.2f}x vs HF experts-eager"
        if "loss_curve_vs_best" in r:
            note += f"; {len(r['losses'])}-step losses within {r['loss_curve_vs_best']:.1e} of best"
        if r["impl"] == "hf":
            parts = [f"experts: {r.get('experts_implementation')}"] if "moe" in r["case"] else []
            parts += [r["parallel"].upper()] if r.get("parallel") in ("ddp", "fsdp") else []
            note = ", ".join(parts)
        lines.append(
            f"| {r['case']} | {r['impl']} | {r['variant']} | {r['tokens_per_s_per_gpu']:,.0f} | {r['tflops_per_gpu']:.0f} "
            f"| {100 * r['mfu']:.1f}% | {speed} | {scale} | {r['peak_mem_gib']:.1f} | {note or ''} |")
    summary = repeat_summary(rows)
    if summary:
        lines += ["", "Repeated runs (rounds in alternating order): median tokens/s per GPU, range, median MFU, "
                  "median against the median of best:", "",
                  "| case | variant | runs | median | range | MFU | vs best |", "|---|---|---:|---:|---:|---:|---:|"]
        for s in summary:
            vs = f"{s['vs_best']:.3f}x" if "vs_best" in s else ""
            lines.append(f"| {s['case']} | {s['variant']} | {s['runs']} | {s['median']:,.0f} | "
                         f"{s['low']:,.0f}-{s['high']:,.0f} | {100 * s['mfu']:.1f}% | {vs} |")
    if meta.get("not_run"):
        lines += ["", "Not run here: " + "; ".join(meta["not_run"])]
    return "\n".join(lines) + "\n"


def chart(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r]
    labels = [f"{r['case']}\n{r['impl']}:{r['variant']}" for r in ok]
    values = [r["tokens_per_s_per_gpu"] for r in ok]
    colors = ["#999999" if r["impl"] == "hf" else ("#1f77b4" if r["variant"] == "best" else "#9ecae1") for r in ok]
    fig, ax = plt.subplots(figsize=(10, max(3, 0.32 * len(ok) + 1)))
    ax.barh(range(len(ok)), values, color=colors)
    ax.set_yticks(range(len(ok)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("tokens/s per GPU")
    for i, r in enumerate(ok):
        ax.text(values[i], i, f" {values[i]:,.0f} ({100 * r['mfu']:.0f}% MFU)", va="center", fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="")
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--variants", default="", help="comma list: run these engine variants instead of the case's own list")
    ap.add_argument("--only-best", action="store_true",
                    help="the engine's best variant against transformers' default only")
    ap.add_argument("--shared-process", action="store_true",
                    help="run all engine variants of a case in one process (faster, but memory of one run can "
                         "linger into the next)")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run the engine variants this many rounds, alternating their order, and print each "
                         "variant's median against best's (runs of one variant vary by 3-15%% on one card)")
    ap.add_argument("--case-timeout", type=int, default=900)
    ap.add_argument("--profile", action="store_true",
                    help="after the timed steps, profile one more step and write the kernel-time breakdown to "
                         "DIR/profiles.txt")
    ap.add_argument("--syncs", action="store_true",
                    help="after the timed steps, run one more step with torch's CUDA sync debug mode and write "
                         "where the host waited for the GPU (Python call sites, counted) to DIR/syncs.txt")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--report-only", action="store_true", help="rebuild results.* from DIR/rows.jsonl")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    args.variants = [v for v in args.variants.split(",") if v]
    if [v for v in args.variants if v not in VARIANTS]:
        ap.error(f"unknown variants: {', '.join(v for v in args.variants if v not in VARIANTS)}")
    if args.list:
        for c in CASES.values():
            print(f"{c.name:28s} gpus={c.gpus} seq={c.seq} mbs={c.micro_batch} gbs={c.global_batch} "
                  f"variants={','.join(c.variants)}")
        print("variants:", ", ".join(f"{k}={v}" for k, v in VARIANTS.items()))
        return 0
    names = [n for n in args.cases.split(",") if n] or [n for n in CASES if not n.startswith("smoke")]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        print(f"unknown cases: {unknown}; see --list", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    part = out / "rows.jsonl"
    logf = open(out / "bench.log", "a")
    lock = threading.Lock()

    def log(msg):
        with lock:
            print(msg, flush=True)
            logf.write(msg + "\n")
            logf.flush()

    ngpu = gpu_count()
    cases = [CASES[n] for n in names]
    if args.report_only:
        return report(out, names, cases, args, ngpu, device_name())
    not_run = [f"{c.name} (needs {c.gpus} GPUs, {ngpu} visible)" for c in cases if c.gpus > ngpu]
    if not_run:
        log("not run here: " + ", ".join(not_run))
    single = [c for c in cases if c.gpus == 1 and ngpu >= 1]
    multi = [c for c in cases if 1 < c.gpus <= ngpu]
    # one-GPU cases: one lane per card, each case (baseline + variants) stays on its card
    lanes: list[list] = [[] for _ in range(max(ngpu, 1))]
    load = [0] * len(lanes)
    for c in sorted(single, key=lambda c: -len(c.variants)):  # longest first, onto the least loaded card
        i = load.index(min(load))
        lanes[i].append(c)
        load[i] += len(c.variants) + 1
    threads = [threading.Thread(target=lambda g=g, lane=lane: [_run_case(c, [g], args, part, log) for c in lane])
               for g, lane in enumerate(lanes) if lane]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in multi:
        _run_case(c, list(range(c.gpus)), args, part, log)

    return report(out, names, cases, args, ngpu, device_name())


def report(out: Path, names, cases, args, ngpu: int, device: str) -> int:
    part = out / "rows.jsonl"
    rows = [json.loads(line) for line in part.read_text().splitlines()] if part.exists() else []
    if rows and device in ("none", ""):
        device = rows[0].get("device", device)
        ngpu = max(r["gpus"] for r in rows)
    not_run = [f"{c.name} (needs {c.gpus} GPUs, {ngpu} visible)" for c in cases if c.gpus > ngpu]
    order = {n: i for i, n in enumerate(names)}
    rows.sort(key=lambda r: (order.get(r["case"], 99), r["impl"] != "hf", r["variant"] != "best"))
    rows = summarise(rows)
    import torch
    import transformers

    try:
        from importlib.metadata import version

        mcore = version("megatron-core")
    except Exception:
        mcore = "?"
    versions = dict(torch=torch.__version__, transformers=transformers.__version__, megatron_core=mcore)
    if args.report_only and (out / "results.json").exists():  # keep the versions of the machine that ran it
        old = json.loads((out / "results.json").read_text()).get("meta", {})
        versions = {k: old.get(k, v) for k, v in versions.items()}
        meta_date = old.get("date")
    else:
        meta_date = None
    meta = dict(device=device, gpus_visible=ngpu,
                date=meta_date or datetime.datetime.now().isoformat(timespec="minutes"), **versions,
                steps=args.steps, warmup=args.warmup, not_run=not_run,
                notes={c.name: c.note for c in cases if c.note})
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / "results.md").write_text(markdown(rows, meta))
    if rows and importlib.util.find_spec("matplotlib") is not None:
        chart(rows, out / "throughput.png", f"{meta['device']} - megatron engine vs HF transformers (bf16, seq 4096)")
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
