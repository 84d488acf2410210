"""Checkpoint conversion throughput and memory, side by side with the disk's own speed and a load-everything baseline.

For a synthetic (random) Qwen2.5-shaped checkpoint this measures, each in a fresh child process so ru_maxrss is that
run's peak resident memory:

    disk copy         read + write + fsync of the same bytes (the ceiling for any converter on this disk)
    convert hf->mcore trainer.convert streaming conversion to a Megatron-Core per-rank checkpoint (TP1 PP1)
    convert hf->hf    trainer.convert HF -> HF (same output format as the baseline below)
    load-everything   transformers from_pretrained() then save_pretrained()

Usage: python benchmarks/convert_bench.py [--sizes 1.5B 7B] [--workdir /tmp/convert-bench] [--keep]
Numbers only; it never fails on a target.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # config.json fields of the published models (weights here are random)
    "1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7B": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}

CHILD = {
    "copy": """
import os, sys, time, json, resource
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
print(json.dumps({'seconds': time.perf_counter() - t, 'bytes': n,
                  'maxrss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
""",
    "convert": """
import sys, time, json, resource, warnings
warnings.filterwarnings('ignore')
from trainer.convert import convert
src, dst, fmt = sys.argv[1], sys.argv[2], sys.argv[3]
t = time.perf_counter()
convert(src, 'hf', dst, fmt, progress=False)
print(json.dumps({'seconds': time.perf_counter() - t,
                  'maxrss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
""",
    "load_everything": """
import sys, time, json, resource, warnings, torch
warnings.filterwarnings('ignore')
from transformers import AutoModelForCausalLM
src, dst = sys.argv[1], sys.argv[2]
t = time.perf_counter()
m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
m.save_pretrained(dst)
import os
for f in os.listdir(dst):
    fd = os.open(os.path.join(dst, f), os.O_RDONLY); os.fsync(fd); os.close(fd)
print(json.dumps({'seconds': time.perf_counter() - t,
                  'maxrss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
""",
}


def make_checkpoint(shape: dict, directory: Path) -> int:
    """Random bf16 weights written straight to safetensors, ~2 GB per shard, one tensor in memory at a time."""
    import torch

    sys.path.insert(0, str(ROOT))
    from trainer.convert.safetensors_io import SafetensorsWriter

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
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", CHILD[kind], *args], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench(size: str, work: Path, keep: bool) -> None:
    src = work / f"qwen2.5-{size}-hf"
    if not (src / "config.json").is_file():
        t = time.perf_counter()
        make_checkpoint(SHAPES[size], src)
        print(f"[{size}] generated random checkpoint in {time.perf_counter() - t:.0f} s")
    nbytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    gb = nbytes / 1e9
    runs = [("disk copy (read+write+fsync)", "copy", [str(src), str(work / "copy")]),
            ("trainer.convert hf -> mcore", "convert", [str(src), str(work / "mcore"), "mcore"]),
            ("trainer.convert hf -> hf", "convert", [str(src), str(work / "hf-out"), "hf"]),
            ("load-everything (from_pretrained + save_pretrained)", "load_everything",
             [str(src), str(work / "hf-baseline")])]
    results = {}
    cold = None
    for label, kind, args in runs:
        shutil.rmtree(args[1], ignore_errors=True)
        cold = drop_caches()
        results[label] = run_child(kind, *args)
        shutil.rmtree(args[1], ignore_errors=True)  # keep disk use at one extra copy
    print(f"\n[{size}] {gb:.2f} GB of bf16 weights; page cache dropped before each run: {cold}")
    print(f"{'run':55s} {'seconds':>8s} {'GB/s':>7s} {'peak RSS GB':>12s}")
    for label, r in results.items():
        print(f"{label:55s} {r['seconds']:8.1f} {gb / r['seconds']:7.2f} {r['maxrss'] / 1e9:12.2f}")
    disk = results["disk copy (read+write+fsync)"]["seconds"]
    ours = results["trainer.convert hf -> mcore"]["seconds"]
    ours_hf = results["trainer.convert hf -> hf"]["seconds"]
    base = results["load-everything (from_pretrained + save_pretrained)"]["seconds"]
    print(f"ratio convert(hf->mcore) rate / disk-copy rate : {disk / ours:.2f}  (target >= 0.60)")
    print(f"ratio convert(hf->hf) rate / disk-copy rate    : {disk / ours_hf:.2f}")
    print(f"speed-up vs load-everything (hf->mcore)        : {base / ours:.2f}x  (target >= 3x)")
    print(f"speed-up vs load-everything (hf->hf)           : {base / ours_hf:.2f}x")
    print(f"peak RSS convert(hf->mcore)                    : "
          f"{results['trainer.convert hf -> mcore']['maxrss'] / 1e9:.2f} GB (target < 2 GB for 1.5B)")
    if not keep:
        shutil.rmtree(src, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["1.5B"], choices=sorted(SHAPES))
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/convert-bench"))
    ap.add_argument("--keep", action="store_true", help="keep the generated source checkpoints")
    a = ap.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    for size in a.sizes:
        bench(size, a.workdir, a.keep)


if __name__ == "__main__":
    main()
