"""One benchmark process (run under torchrun for several GPUs): trains one case with the megatron engine (each
listed variant in turn) or with the Hugging Face baseline, and appends one JSON line per run to --out.

Timing: `--warmup` optimiser steps (compilation, allocator warm-up) are discarded, then `--steps` steps are timed
between two device synchronisations. Tokens/s counts every input token of the global batch; TFLOPS uses
Megatron's model-FLOPs formula (trainer.spec.estimate.flops_per_token, causal attention halved); MFU is against
989 TFLOPS (H100 SXM dense bf16). Peak memory is torch's peak allocation on this rank over the whole run.
"""

from __future__ import annotations

import argparse
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

from cases import CASES, VARIANTS  # noqa: E402

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


def _record(out: Path, row: dict) -> None:
    if _rank() == 0:
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def _figures(case, arch, seconds: float, steps: int) -> dict:
    from trainer.spec.estimate import flops_per_token

    tokens = case.global_batch * case.seq * steps
    tps_gpu = tokens / seconds / case.gpus
    tflops = tps_gpu * flops_per_token(arch, case.seq) / 1e12
    return dict(tokens_per_s_per_gpu=round(tps_gpu, 1), tflops_per_gpu=round(tflops, 1),
                mfu=round(tflops / PEAK_TFLOPS, 4), step_s=round(seconds / steps, 4),
                peak_mem_gib=round((torch.cuda.max_memory_allocated() - _BASELINE_BYTES[0]) / 2**30, 2),
                reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2))


def run_megatron(case, variants, steps, warmup, out):
    from trainer.engines.megatron import EngineOptions, MegatronEngine, data_parallel_info
    from trainer.engines.megatron_testing import job_spec, random_micro_batches
    from trainer.spec import resolve_architecture

    spec = job_spec(case.family, case.size, **case.spec_args())
    arch = resolve_architecture(spec)
    for variant in variants:
        row = dict(case=case.name, impl="megatron", variant=variant, gpus=case.gpus,
                   device=torch.cuda.get_device_name(), options=VARIANTS[variant])
        engine = None
        try:
            engine = MegatronEngine(spec, EngineOptions(**VARIANTS[variant]))
            row.update(attention=engine.plan.attention, experts=engine.plan.experts)
            _reset_peak()
            engine.setup()
            dp, dp_rank = data_parallel_info()
            n_micro = case.global_batch // (case.micro_batch * dp)
            batches = random_micro_batches(n_micro, case.micro_batch, case.seq, arch.vocab_size, seed=100 + dp_rank)
            first = None
            for _ in range(warmup):
                r = engine.train_step(batches)
                first = first or r
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                r = engine.train_step(batches)
            torch.cuda.synchronize()
            row.update(_figures(case, arch, time.perf_counter() - t0, steps))
            row.update(first_loss=round(first.loss, 4), last_loss=round(r.loss, 4), notes=engine.notes)
            gqa = {getattr(m, "_gqa_native", None) for c in engine.unwrapped() for m in c.modules()
                   if type(m).__name__ == "SDPAAttention"}
            if gqa - {None}:
                row["sdpa_gqa_native"] = sorted(gqa - {None})
        except Exception as err:  # record and go on with the next variant
            row.update(error=f"{type(err).__name__}: {str(err)[:400]}", traceback=traceback.format_exc()[-2000:])
            if _rank() == 0:
                traceback.print_exc()
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


def run_hf(case, steps, warmup, out):
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from trainer.engines.hf_model import hf_config
    from trainer.engines.megatron_testing import job_spec, random_micro_batches
    from trainer.spec import resolve_architecture

    spec = job_spec(case.family, case.size, **case.spec_args())
    arch = resolve_architecture(spec)
    world, rank = _world(), _rank()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl")
    row = dict(case=case.name, impl="hf", variant="baseline", gpus=case.gpus, device=torch.cuda.get_device_name())
    try:
        torch.manual_seed(0)
        _reset_peak()
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(hf_config(arch), dtype=torch.bfloat16,
                                                     attn_implementation="sdpa")
        model.config.use_cache = False
        model.train()
        row["experts_implementation"] = str(getattr(model.config, "_experts_implementation", None))
        row["transformers"] = __import__("transformers").__version__
        net = model
        if world > 1:
            net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local], gradient_as_bucket_view=True)
        t = spec.training
        opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                                weight_decay=t.weight_decay, fused=True)
        n_micro = case.global_batch // (case.micro_batch * world)
        batches = random_micro_batches(n_micro, case.micro_batch, case.seq, arch.vocab_size, seed=100 + rank)
        batches = [(b.tokens.cuda(), b.position_ids.cuda()) for b in batches]

        def step():
            total = 0.0
            for i, (tokens, pos) in enumerate(batches):
                sync = world == 1 or i == n_micro - 1
                ctx = net.no_sync() if not sync else _null()
                with ctx:
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
    except Exception as err:
        row.update(error=f"{type(err).__name__}: {str(err)[:400]}", traceback=traceback.format_exc()[-2000:])
        if rank == 0:
            traceback.print_exc()
    _record(out, row)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", required=True, choices=sorted(CASES))
    ap.add_argument("--impl", required=True, choices=["megatron", "hf"])
    ap.add_argument("--variants", default="best")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    case = CASES[a.case]
    out = Path(a.out)
    if a.impl == "hf":
        run_hf(case, a.steps, a.warmup, out)
    else:
        run_megatron(case, [v for v in a.variants.split(",") if v], a.steps, a.warmup, out)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
