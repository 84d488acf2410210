"""Checkpoint conversion throughput and memory next to the disk's own speed and two load-everything baselines.

For a synthetic (random) Qwen2.5-shaped checkpoint this measures, each in a fresh child process whose peak resident
memory (VmHWM, see PEAK) is that run's own:

    disk copy           read + write + fsync of the same bytes (the ceiling for any converter on this disk)
    convert hf->mcore   qwen_trainer.convert streaming conversion to a Megatron-Core per-rank checkpoint (TP1 PP1)
    convert mcore->hf   qwen_trainer.convert export of that Megatron-Core checkpoint back to HF safetensors
    convert hf->hf      qwen_trainer.convert HF -> HF (same output format as the light baseline)
    light baseline      transformers from_pretrained(dtype=bf16) then save_pretrained(): HF -> HF with no Megatron
                        model at all, the cheapest form of load-everything
    seed-style baseline what Pai-Megatron-Patch's single-process hf2mcore converters do (see seed_style_convert):
                        from_pretrained(dtype=bf16), build the whole megatron-core GPTModel on CPU, copy every
                        tensor into it, torch.save() the rank file: HF -> mcore, the same output as our hf->mcore

Every run ends with its output fsynced. Speed-ups are printed for hf->mcore against both baselines (the seed-style
one is the like-for-like comparison: same input, same output format and bytes) and for hf->hf against the light one.

Usage: python benchmarks/convert_bench.py [--sizes 0.5B 1.5B 7B] [--workdir /tmp/convert-bench] [--keep]
                                          [--check] [--json results.json]
Needs only torch, transformers (which brings safetensors and tqdm) and megatron-core; qwen_trainer.convert imports tqdm
only for its progress bar, which the runs here turn off. Imports happen before each child's clock starts.
Numbers only; it never fails on a target. --check (off by default) compares the seed-style rank file with ours
tensor by tensor and reports the outcome; tests/unit/test_convert_bench.py runs the same comparison on a tiny shape.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # config.json fields of the published models (weights here are random)
    "0.5B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7B": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}

# Peak resident memory of the child itself. ru_maxrss is not that: Linux carries the parent's high-water mark across
# fork/exec into the child's ru_maxrss, so every row would be floored at this script's own peak (about 0.8 GB after
# generating the 0.5B checkpoint). VmHWM belongs to the child's own address space; ru_maxrss is reported next to it.
PEAK = """
def _peak():
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _report(started, **extra):
    import json, resource, time
    print(json.dumps(dict(seconds=time.perf_counter() - started, **extra, maxrss=_peak(),
                          ru_maxrss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)))
"""
CHILD = {
    "copy": """
import os, sys, time
src, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst, exist_ok=True)
t = time.perf_counter(); n = 0
buf = bytearray(64 << 20); view = memoryview(buf)
for name in sorted(os.listdir(src)):
    if not name.endswith('.safetensors'): continue
    with open(os.path.join(src, name), 'rb', buffering=0) as f, open(os.path.join(dst, name), 'wb') as g:
        while (k := f.readinto(view)):
            g.write(view[:k]); n += k
        g.flush(); os.fsync(g.fileno())
_report(t, bytes=n)
""",
    "convert": """
import sys, time, warnings
warnings.filterwarnings('ignore')
from qwen_trainer.convert import convert
src, dst, fmt = sys.argv[1], sys.argv[2], sys.argv[3]
src_fmt = sys.argv[4] if len(sys.argv) > 4 else 'hf'
t = time.perf_counter()
convert(src, src_fmt, dst, fmt, progress=False)
_report(t)
""",
    "load_everything": """
import sys, time, warnings, torch
warnings.filterwarnings('ignore')
from transformers import AutoModelForCausalLM
src, dst = sys.argv[1], sys.argv[2]
t = time.perf_counter()
m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
m.save_pretrained(dst)
import os
for f in os.listdir(dst):
    fd = os.open(os.path.join(dst, f), os.O_RDONLY); os.fsync(fd); os.close(fd)
_report(t)
""",
    "seed_style": """
import sys, time, warnings
warnings.filterwarnings('ignore')
import torch, convert_bench
from transformers import AutoModelForCausalLM
import megatron.core.parallel_state, megatron.core.models.gpt, qwen_trainer.convert.mcore_model
src, dst = sys.argv[1], sys.argv[2]
t = time.perf_counter()
convert_bench.init_single_process_world()
convert_bench.seed_style_convert(src, dst)
_report(t)
""",
}
RANK_FILE = Path("release") / "mp_rank_00" / "model_optim_rng.pt"


def init_single_process_world() -> None:
    """A one-rank gloo group and megatron-core's parallel state (TP1 PP1), as tests/unit/conftest.py sets up."""
    import socket

    import torch.distributed as dist
    from megatron.core import parallel_state

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()


def seed_style_convert(src, dst) -> None:
    """HF -> Megatron-Core TP1 PP1 the way Pai-Megatron-Patch's hf2mcore_qwen2(.5) converters do it, all in memory.

    The seed's steps (toolkits/model_checkpoints_convertor/qwen/hf2mcore_qwen2_dense_and_moe_gqa.py, main()):
    AutoModelForCausalLM.from_pretrained(src, torch_dtype=config.torch_dtype); model_provider() builds the full
    GPTModel in the PR dtype; every HF tensor is fused/copied into it; save_mgmodel() copies config/tokenizer
    files, writes the tracker, takes state_dict_for_save_checkpoint(), drops `_extra_state` and None entries and
    torch.save()s {args, checkpoint_version: 3.0, iteration: 0, model} to release/mp_rank_00/model_optim_rng.pt.
    The HF model stays alive until the end, as in the seed.

    Here: dtype is bf16 for both models (the synthetic checkpoint's config.json torch_dtype, which is what the seed
    loads with, and PR=bf16, so the output is as large as ours). The model is built on CPU with
    use_cpu_initialization (the seed's path for 72B; smaller sizes build on one GPU) with the project's own
    architecture translation (qwen_trainer.convert.mcore_model.build_gpt_model, local layer spec), and the tensors are
    mapped with the project's own tables (the mcore rules of qwen_trainer.convert and each rule kind's fuse(), i.e. the
    same mapping the streaming converter applies, here applied to the whole model in memory). Not done: the seed's
    HF-vs-Megatron forward check on a GPU (check_hf_mg_forward), which is not conversion work. `args` is the
    project's megatron_args namespace where the seed stores its whole Megatron argument namespace (a few KB either way).
    Needs init_single_process_world() (or another initialised one-rank world) first.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from qwen_trainer.checkpoint.layout import RELEASE, write_tracker
    from qwen_trainer.convert.formats.args import megatron_args
    from qwen_trainer.convert.formats.per_rank import FORMATS as PER_RANK
    from qwen_trainer.convert.mcore_model import build_gpt_model
    from qwen_trainer.convert.plan import Placement, format_rules, instances
    from qwen_trainer.convert.rules import KINDS
    from qwen_trainer.convert.dims import ParallelLayout, load_hf_config, model_dims

    src, dst = Path(src), Path(dst)
    dtype = torch.bfloat16
    dims = model_dims(load_hf_config(src))
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
    mg = build_gpt_model(dims, dtype=dtype)
    # As the seed does for PR=bf16 (convert_checkpoint_from_transformers_to_megatron); without it megatron-core's
    # local RMSNorm weights stay fp32.
    mg.bfloat16()

    fmt = PER_RANK["mcore"]
    schemes = fmt.resolve_schemes(False, False)
    layout = ParallelLayout()
    place = Placement(dims, layout, 1, schemes, fmt.tied_head_name)
    hf_state = hf.state_dict()
    mg_state = mg.state_dict(keep_vars=True)
    filled = set()
    with torch.no_grad():
        for inst in instances(dims, format_rules(dims, schemes, "mcore")):
            canon = KINDS[inst.rule.kind].fuse(dims, *(hf_state[n] for n in inst.hf_names))
            for slot in place.slots(inst):
                mg_state[slot.name].copy_(canon)
                filled.add(slot.name)
    left = sorted(k for k, v in mg_state.items() if isinstance(v, torch.Tensor) and k not in filled)
    if left:
        raise RuntimeError(f"seed-style baseline left Megatron tensors unfilled: {left[:10]}")

    dst.mkdir(parents=True, exist_ok=True)
    for p in sorted(src.iterdir()):  # the seed copies config*.json, tokenizer*, vocab.json, merges.txt
        if p.is_file() and (p.name.startswith(("config", "tokenizer")) or p.name in ("vocab.json", "merges.txt")):
            shutil.copy2(p, dst / p.name)
    write_tracker(dst, RELEASE)
    full_model = mg.state_dict_for_save_checkpoint()
    for k in list(full_model):
        if full_model[k] is None or "_extra_state" in k:
            full_model.pop(k)
    args = megatron_args(dims, layout, 1, ckpt_format="torch", transformer_impl="local", dtype=dtype)
    path = dst / RANK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 0, "model": full_model}, path)
    fsync_tree(dst)  # every row ends with its output on disk (the seed itself does not fsync)


def fsync_tree(root: Path) -> None:
    for dirpath, _, names in os.walk(root):
        for name in names:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)


def compare_rank_files(ours: Path, seed: Path) -> dict:
    """Tensor-by-tensor comparison of release/mp_rank_00/model_optim_rng.pt in two TP1 PP1 checkpoints.

    Key mapping: the seed-style file holds exactly our keys minus the `*._extra_state` entries, which qwen_trainer.convert
    writes as None (megatron-core linear layers save them; strict loading expects them) and the seed drops.
    Returns counts and a list of problems (empty when the two agree bit for bit)."""
    import torch

    def load(root: Path) -> dict:
        return torch.load(root / RANK_FILE, map_location="cpu", weights_only=False, mmap=True)

    a, b = load(Path(ours)), load(Path(seed))
    problems = [f"{k}: ours {a.get(k)!r}, seed-style {b.get(k)!r}" for k in ("checkpoint_version", "iteration")
                if a.get(k) != b.get(k)]
    ma, mb = a["model"], b["model"]
    extra = sorted(k for k in ma if k.endswith("._extra_state"))
    problems += [f"{k}: ours holds {type(ma[k]).__name__}, not None" for k in extra if ma[k] is not None]
    ka = set(ma) - set(extra)
    problems += [f"only in ours: {k}" for k in sorted(ka - set(mb))]
    problems += [f"only in seed-style: {k}" for k in sorted(set(mb) - ka)]
    nbytes = 0
    for k in sorted(ka & set(mb)):
        x, y = ma[k], mb[k]
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
            problems.append(f"{k}: not a tensor on both sides ({type(x).__name__}, {type(y).__name__})")
        elif x.dtype != y.dtype or x.shape != y.shape:
            problems.append(f"{k}: {x.dtype} {tuple(x.shape)} vs {y.dtype} {tuple(y.shape)}")
        elif not torch.equal(x.view(torch.uint8) if x.dim() else x, y.view(torch.uint8) if y.dim() else y):
            problems.append(f"{k}: values differ")
        else:
            nbytes += x.numel() * x.element_size()
    return {"tensors_compared": len(ka & set(mb)), "bytes_equal": nbytes, "extra_state_entries_skipped": len(extra),
            "problems": problems}


def make_checkpoint(shape: dict, directory: Path) -> int:
    """Random bf16 weights written straight to safetensors, ~2 GB per shard, one tensor in memory at a time."""
    import torch

    sys.path.insert(0, str(ROOT))
    from qwen_trainer.convert.safetensors_io import SafetensorsWriter

    h, f, n = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    d = h // heads
    names: list[tuple[str, tuple]] = [("model.embed_tokens.weight", (shape["vocab_size"], h))]
    for i in range(n):
        p = f"model.layers.{i}."
        names += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
                  (p + "self_attn.q_proj.weight", (heads * d, h)), (p + "self_attn.q_proj.bias", (heads * d,)),
                  (p + "self_attn.k_proj.weight", (kv * d, h)), (p + "self_attn.k_proj.bias", (kv * d,)),
                  (p + "self_attn.v_proj.weight", (kv * d, h)), (p + "self_attn.v_proj.bias", (kv * d,)),
                  (p + "self_attn.o_proj.weight", (h, heads * d)), (p + "mlp.gate_proj.weight", (f, h)),
                  (p + "mlp.up_proj.weight", (f, h)), (p + "mlp.down_proj.weight", (h, f))]
    names.append(("model.norm.weight", (h,)))
    if not shape["tie_word_embeddings"]:
        names.append(("lm_head.weight", (shape["vocab_size"], h)))
    shards, cur, size = [], [], 0
    for name, s in names:
        nbytes = 2 * int(torch.Size(s).numel())
        if cur and size + nbytes > 2 << 30:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, s))
        size += nbytes
    shards.append(cur)
    directory.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    gen = torch.Generator().manual_seed(0)
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        w = SafetensorsWriter(directory / fname, [(nm, torch.bfloat16, s) for nm, s in shard])
        for nm, s in shard:
            w.write(nm, torch.empty(s, dtype=torch.bfloat16).uniform_(-0.05, 0.05, generator=gen))
            weight_map[nm] = fname
        w.close()
        total += w.bytes_written
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config = dict(shape, architectures=["Qwen2ForCausalLM"], model_type="qwen2", torch_dtype="bfloat16",
                  hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return total


def drop_caches() -> bool:
    """Start each run with a cold page cache when the machine allows it (root outside a locked-down container)."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def run_child(kind: str, *args: str) -> dict:
    paths = [str(ROOT), str(ROOT / "benchmarks")] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    r = subprocess.run([sys.executable, "-c", PEAK + CHILD[kind], *args], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


COPY, MCORE, HF = "disk copy (read+write+fsync)", "qwen_trainer.convert hf -> mcore", "qwen_trainer.convert hf -> hf"
EXPORT = "qwen_trainer.convert mcore -> hf (export of the hf -> mcore output)"
LIGHT = "light baseline: from_pretrained + save_pretrained (hf -> hf)"
SEED = "seed-style baseline: from_pretrained + GPTModel + torch.save (hf -> mcore)"


def bench(size: str, work: Path, keep: bool, check: bool) -> dict:
    src = work / f"qwen2.5-{size}-hf"
    if not (src / "config.json").is_file():
        t = time.perf_counter()
        make_checkpoint(SHAPES[size], src)
        print(f"[{size}] generated random checkpoint in {time.perf_counter() - t:.0f} s")
    nbytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    gb = nbytes / 1e9
    runs = [(COPY, "copy", [str(src), str(work / "copy")]),
            (MCORE, "convert", [str(src), str(work / "mcore"), "mcore"]),
            (EXPORT, "convert", [str(work / "mcore"), str(work / "export-hf"), "hf", "mcore"]),
            (HF, "convert", [str(src), str(work / "hf-out"), "hf"]),
            (LIGHT, "load_everything", [str(src), str(work / "hf-baseline")]),
            (SEED, "seed_style", [str(src), str(work / "seed-style")])]
    # The export reads our mcore output; --check keeps it until the seed-style one exists to compare against it.
    held = {MCORE}
    results = {}
    cold = None
    for label, kind, args in runs:
        shutil.rmtree(args[1], ignore_errors=True)
        cold = drop_caches()
        results[label] = run_child(kind, *args)
        if label not in held and not (check and label == SEED):
            shutil.rmtree(args[1], ignore_errors=True)  # keep disk use at one extra copy (two with --check)
        if label == EXPORT and not check:
            shutil.rmtree(work / "mcore", ignore_errors=True)
    comparison = None
    if check:
        comparison = compare_rank_files(work / "mcore", work / "seed-style")
        shutil.rmtree(work / "mcore", ignore_errors=True)
        shutil.rmtree(work / "seed-style", ignore_errors=True)

    print(f"\n[{size}] {gb:.2f} GB of bf16 weights; page cache dropped before each run: {cold}")
    print(f"{'run':75s} {'seconds':>8s} {'GB/s':>7s} {'peak RSS GB':>12s}")
    rows = []
    for label, r in results.items():
        rows.append({"size": size, "run": label, "seconds": r["seconds"], "gb_per_s": gb / r["seconds"],
                     "peak_rss_bytes": r["maxrss"], "ru_maxrss_bytes": r["ru_maxrss"]})
        print(f"{label:75s} {r['seconds']:8.1f} {gb / r['seconds']:7.2f} {r['maxrss'] / 1e9:12.2f}")
    sec = {label: r["seconds"] for label, r in results.items()}
    ratios = {
        "convert_hf_to_mcore_rate_over_disk_copy_rate": sec[COPY] / sec[MCORE],
        "convert_hf_to_hf_rate_over_disk_copy_rate": sec[COPY] / sec[HF],
        "export_mcore_to_hf_rate_over_disk_copy_rate": sec[COPY] / sec[EXPORT],
        "speedup_hf_to_mcore_vs_seed_style": sec[SEED] / sec[MCORE],
        "speedup_hf_to_mcore_vs_light": sec[LIGHT] / sec[MCORE],
        "speedup_hf_to_hf_vs_light": sec[LIGHT] / sec[HF],
        "peak_rss_seed_style_over_hf_to_mcore": results[SEED]["maxrss"] / results[MCORE]["maxrss"],
    }
    for text, key, unit in [
            ("convert hf->mcore rate / disk-copy rate", "convert_hf_to_mcore_rate_over_disk_copy_rate", ""),
            ("convert hf->hf rate / disk-copy rate", "convert_hf_to_hf_rate_over_disk_copy_rate", ""),
            ("export mcore->hf rate / disk-copy rate", "export_mcore_to_hf_rate_over_disk_copy_rate", ""),
            ("speed-up hf->mcore vs seed-style baseline (same output)", "speedup_hf_to_mcore_vs_seed_style", "x"),
            ("speed-up hf->mcore vs light baseline (hf output, no model)", "speedup_hf_to_mcore_vs_light", "x"),
            ("speed-up hf->hf vs light baseline (same output)", "speedup_hf_to_hf_vs_light", "x"),
            ("peak RSS seed-style / hf->mcore", "peak_rss_seed_style_over_hf_to_mcore", "x")]:
        print(f"{text:60s}: {ratios[key]:.2f}{unit}")
    if comparison is not None:
        print(f"check seed-style vs hf->mcore rank file: {comparison['tensors_compared']} tensors, "
              f"{comparison['bytes_equal'] / 1e9:.2f} GB bit-identical, "
              f"{comparison['extra_state_entries_skipped']} None _extra_state entries only in ours, "
              f"{len(comparison['problems'])} differences")
        for line in comparison["problems"][:20]:
            print(f"  {line}")
    if not keep:
        shutil.rmtree(src, ignore_errors=True)
    return {"size": size, "bytes": nbytes, "page_cache_dropped": cold, "rows": rows, "ratios": ratios,
            "check": comparison}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["1.5B"], choices=sorted(SHAPES))
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/convert-bench"))
    ap.add_argument("--keep", action="store_true", help="keep the generated source checkpoints")
    ap.add_argument("--check", action="store_true",
                    help="compare the seed-style rank file with ours tensor by tensor (needs a second output copy)")
    ap.add_argument("--json", type=Path, help="also write every row, ratio and check result to this file")
    a = ap.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    from importlib.metadata import PackageNotFoundError, version

    def ver(dist: str):
        try:
            return version(dist)
        except PackageNotFoundError:
            return None

    report = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                          "workdir": str(a.workdir),
                          **{d: ver(d) for d in ("torch", "transformers", "safetensors", "megatron-core")}},
              "sizes": []}
    for size in a.sizes:
        report["sizes"].append(bench(size, a.workdir, a.keep, a.check))
        if a.json:  # written after every size, so a long run leaves its finished sizes behind
            a.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
