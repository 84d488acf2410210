"""Run under torchrun (gloo, CPU): the megatron engine (qwen_trainer.engines.megatron.MegatronEngine, the class
`qwen_trainer run` trains with) on CPU, trained for a few steps and checkpointed through
qwen_trainer.checkpoint.store.save (every rank its shard, torch_dist), or resumed from such a checkpoint at another
parallel layout through store.load.

argv: CASE ROOT OUT PHASE [key=value ...]
  CASE   dense | moe (tiny Qwen3 shapes)
  PHASE  save    train STEPS steps, save, dump the gathered state, train EXTRA more steps (the uninterrupted run)
         resume  load the newest checkpoint, dump the gathered state, train EXTRA steps
  keys   tp, pp, ep (parallel sizes), dopt (distributed optimizer 0/1), reshard (0/1: checkpoint.reshardableOptimizer),
         steps, extra, async (0/1: save as `qwen_trainer run` does by default, in the background),
         dispatcher (allgather | alltoall: the MoE token dispatcher), opts (JSON: EngineOptions fields to change)

OUT/<PHASE>.pt (rank 0) holds the losses of the steps after the checkpoint and the full tensors, in Hugging Face
naming, of the bf16 weights, the fp32 master weights and Adam's exp_avg / exp_avg_sq, plus the Adam step counts:
each rank's part is gathered over gloo and put together by the converter's mapping (not by the checkpoint's own
metadata), so a checkpoint that stored a region in the wrong place shows up as a difference.

Without a GPU, the CUDA calls the engine makes are pointed at the CPU (cpu_stand_ins); the engine's own code,
megatron-core's model, DDP, optimizer and dist_checkpointing run unchanged. With one, it runs on the GPU (NCCL),
one process per GPU.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

TINY = dict(numLayers=2, hiddenSize=64, numAttentionHeads=4, numQueryGroups=2, ffnHiddenSize=128, vocabSize=256,
            maxPositionEmbeddings=64, kvChannels=16)
MOE = dict(numExperts=4, topK=2, ffnHiddenSize=32, normTopkProb=True, tokenDispatcher="allgather")
SEQ, GLOBAL_BATCH, LR = 32, 4, 1e-2

# every fused kernel off (they need a GPU, Triton or torch.compile); SequentialMLP experts
CPU_OPTIONS = dict(attention="sdpa", sdpa_backend=None, fused_rope=False, fused_qkv_rope=False, fused_rmsnorm=False,
                   fused_swiglu=False, triton_swiglu=False, chunked_cross_entropy=False, fused_cross_entropy=False,
                   output_grad_into_buffer=False, experts="sequential", local_dispatch=False, grad_accum_fusion=False,
                   triton_grad_accumulation=False, fused_adam=False, cuda_graphs=False, use_cpu_initialization=True)


@contextlib.contextmanager
def cpu_stand_ins():
    """The engine's CUDA calls pointed at the CPU: device arguments and .cuda() moves become CPU ones, the device
    pin, stream syncs and CUDA RNG calls do nothing, and CPU tensors report CUDA type names (megatron's optimizers
    accept only those)."""
    from megatron.core.tensor_parallel import random as mrandom
    from torch.overrides import TorchFunctionMode

    saved = []

    def put(obj, name, value):
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def cpu(device):
        if isinstance(device, int) and not isinstance(device, bool):
            return "cpu"
        if isinstance(device, str) and device.startswith("cuda"):
            return "cpu"
        if isinstance(device, torch.device) and device.type == "cuda":
            return torch.device("cpu")
        return device

    class CudaToCpu(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if func is torch.Tensor.cuda:
                return args[0]
            if "device" in kwargs:
                kwargs["device"] = cpu(kwargs["device"])
            if func is torch.Tensor.to and len(args) > 1:
                args = (args[0], cpu(args[1]), *args[2:])
            return func(*args, **kwargs)

    tensor_type = torch.Tensor.type

    def cuda_type(self, *args, **kwargs):
        name = tensor_type(self, *args, **kwargs)
        if args or kwargs or not isinstance(name, str) or ".cuda." in name:
            return name
        return name.replace("torch.", "torch.cuda.", 1)

    class HostStream:  # megatron's all-to-all dispatcher copies token counts to the host on a side stream
        def wait_stream(self, other):
            pass

        def record_event(self):
            return HostStream()

        def synchronize(self):
            pass

    host_stream = HostStream()
    from megatron.core.transformer.moe import token_dispatcher

    # its host copies of the all-to-all splits: numpy arrays, as from a GPU (the CPU tensors are never copied)
    put(token_dispatcher, "maybe_move_tensor_to_cpu",
        lambda t, as_numpy=False, record_stream=False: t.numpy() if as_numpy and torch.is_tensor(t) else t)
    put(torch.cuda, "Stream", lambda *a, **k: HostStream())
    put(torch.cuda, "current_stream", lambda *a, **k: host_stream)
    put(torch.cuda, "stream", lambda *a, **k: contextlib.nullcontext())
    put(torch.cuda, "set_device", lambda *a, **k: None)
    put(torch.cuda, "current_device", lambda: "cpu")
    put(torch.cuda, "synchronize", lambda *a, **k: None)
    put(torch.cuda, "get_device_name", lambda *a, **k: "cpu")
    put(torch.cuda, "get_rng_state", lambda *a, **k: torch.get_rng_state())
    put(torch.cuda, "manual_seed", lambda seed: None)
    put(mrandom, "_set_cuda_rng_state", lambda *a, **k: None)
    put(torch.nn.Module, "cuda", lambda self, *a, **k: self)
    put(torch.Tensor, "type", cuda_type)
    mode = CudaToCpu()
    mode.__enter__()
    try:
        yield
    finally:
        mode.__exit__(None, None, None)
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


def make_spec(case: str, tp: int, pp: int, ep: int, dopt: bool, reshardable: bool = False,
              dispatcher: str = "allgather", clip: float | None = None):
    from qwen_trainer.engines.megatron.testing import job_spec

    moe = dict(MOE, tokenDispatcher=dispatcher) if case == "moe" else None
    return job_spec("qwen3", "A3B" if moe else "0.6B", architecture=TINY, moe=moe,
                    parallelism={"tensor": tp, "pipeline": pp, "expert": ep, "distributedOptimizer": dopt,
                                 "sequenceParallel": tp > 1 and moe is not None},
                    training={"seqLength": SEQ, "precision": "bf16", "globalBatchSize": GLOBAL_BATCH,
                              "microBatchSize": 1, "lr": LR, "minLr": LR, "weightDecay": 0.1,
                              "activationCheckpointing": {"mode": "none"},
                              **({"clipGrad": clip} if clip is not None else {})},
                    checkpoint={"reshardableOptimizer": reshardable})


def step_batches(step: int, vocab: int, dp: int, dp_rank: int):
    """This data-parallel rank's micro-batches of global step `step` (the same global batch at every layout)."""
    from qwen_trainer.engines.megatron.testing import random_micro_batches

    everyone = random_micro_batches(GLOBAL_BATCH, 1, SEQ, vocab, seed=1000 + step)
    per = GLOBAL_BATCH // dp
    return everyone[dp_rank * per:(dp_rank + 1) * per]


# ------------------------------------------------------------------------------------------------ full state


def _main_and_state(optimizer):
    """{model parameter: (fp32 main param, optimizer state, first element of the parameter it covers)} of this
    rank; the distributed optimizer's hold a flat range of the parameter."""
    out = {}
    for opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        inner = opt.optimizer
        if hasattr(opt, "gbuf_ranges"):  # DistributedOptimizer
            for gbuf_range_maps in opt.gbuf_ranges:
                for by_dtype in gbuf_range_maps.values():
                    for bucket in by_dtype:
                        for param, ranges in bucket["param_map"].items():
                            got = opt._get_main_param_and_optimizer_states(param)
                            main = got.pop("param")
                            out[param] = (main, got, ranges["param"].start)
            continue
        pairs = []
        for model_group, main_group in zip(getattr(opt, "float16_groups", []),
                                           getattr(opt, "fp32_from_float16_groups", [])):
            pairs += list(zip(model_group, main_group))
        for group in getattr(opt, "fp32_from_fp32_groups", []):
            pairs += [(p, p) for p in group]
        for model_param, main in pairs:
            out[model_param] = (main, inner.state.get(main, {}), 0)
    return out


def gathered_state(engine) -> dict | None:
    """Collective: the full tensors of every quantity in HF naming on rank 0 (None elsewhere)."""
    from megatron.core import parallel_state as ps

    from qwen_trainer.engines.megatron.weights import hf_from_shards, is_expert_key, renumber_layers

    model = engine.model
    states = _main_and_state(model.optimizer)
    parts = []  # (quantity, megatron key, tp or ep rank, expert?, start, flat tensor, shape)
    steps = set()
    for chunk, offset in zip(model.unwrapped(), model.layer_offsets):
        named = dict(chunk.named_parameters())
        for key, param in renumber_layers(named, offset).items():
            expert = is_expert_key(key)
            where = ps.get_expert_model_parallel_rank() if expert else ps.get_tensor_model_parallel_rank()
            parts.append(("weight", key, where, expert, 0, param.detach().float().reshape(-1).clone(), param.shape))
            if param not in states or "exp_avg" not in states[param][1]:
                continue  # another data-parallel rank holds all of it (distributed optimizer), or no step yet
            main, st, start = states[param]
            parts.append(("main", key, where, expert, start, main.detach().float().reshape(-1).clone(), param.shape))
            for q in ("exp_avg", "exp_avg_sq"):
                parts.append((q, key, where, expert, start, st[q].detach().float().reshape(-1).clone(), param.shape))
            if "step" in st:
                steps.add(float(st["step"]))
    for opt in getattr(model.optimizer, "chained_optimizers", None) or [model.optimizer]:
        for group in opt.optimizer.param_groups:  # the distributed optimizer keeps the step in its groups
            if "step" in group:
                steps.add(float(group["step"]))
    everyone = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object({"parts": parts, "steps": sorted(steps)}, everyone, dst=0)
    if everyone is None:
        return None
    flat: dict = {}
    for mine in everyone:
        for q, key, where, expert, start, t, shape in mine["parts"]:
            slot = flat.setdefault((q, expert, where, key), (torch.full((int(torch.Size(shape).numel()),), float("nan")),
                                                              shape))
            slot[0][start:start + t.numel()] = t
    out: dict = {"steps": sorted({s for mine in everyone for s in mine["steps"]})}
    for q in ("weight", "main", "exp_avg", "exp_avg_sq"):
        dense: dict = {}
        experts: dict = {}
        for (qq, expert, where, key), (t, shape) in flat.items():
            if qq == q:
                (experts if expert else dense).setdefault(where, {})[key] = t.view(shape)
        if dense:
            out[q] = hf_from_shards(dense, experts, engine.arch)
    return out


# ------------------------------------------------------------------------------------------------ main


def main() -> int:
    from qwen_trainer.checkpoint import store
    from qwen_trainer.checkpoint.sharded import AsyncSaves
    from qwen_trainer.distenv import init_process_group, read_env
    from qwen_trainer.engines.base import EngineContext
    from qwen_trainer.engines.megatron import MegatronEngine
    from qwen_trainer.engines.megatron.config import Capabilities, EngineOptions
    from qwen_trainer.spec.resolve import init_method_std, resolve_architecture

    case, root, out, phase = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
    kv = dict(a.split("=", 1) for a in sys.argv[5:])
    tp, pp, ep = int(kv.get("tp", 1)), int(kv.get("pp", 1)), int(kv.get("ep", 1))
    dopt, steps, extra = kv.get("dopt", "0") == "1", int(kv.get("steps", 2)), int(kv.get("extra", 2))
    save_at = [int(x) for x in kv.get("save_at", str(steps)).split(",")]
    use_async = kv.get("async", "0") == "1"
    spec = make_spec(case, tp, pp, ep, dopt, reshardable=kv.get("reshard", "0") == "1",
                     dispatcher=kv.get("dispatcher", "allgather"),
                     clip=float(kv["clip"]) if "clip" in kv else None)
    options = EngineOptions(**dict(CPU_OPTIONS, **json.loads(kv.get("opts", "{}"))))
    env = read_env()
    started = time.time()
    say = print if env.rank == 0 else (lambda _m: None)
    if env.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    stand_ins = cpu_stand_ins() if not torch.cuda.is_available() else contextlib.nullcontext()
    with stand_ins:
        torch.manual_seed(spec.training.seed)  # megatron initialises weights on the CPU with torch's generator
        # torch's grouped GEMM runs on the CPU too (bf16, sizes in multiples of 8), so its experts can be asked for
        caps = Capabilities(cuda=True, torch_grouped_mm=options.experts == "torch-grouped")
        engine = MegatronEngine(spec, options, env=env, capabilities=caps)
        init_process_group(env, "nccl" if torch.cuda.is_available() else "gloo")
        arch = resolve_architecture(spec)
        engine.build(EngineContext(spec, arch, env, init_method_std(spec), spec.training.seed, say))
        dp, dp_rank = engine.data_parallel_size, engine.data_parallel_rank
        say(f"built in {time.time() - started:.1f}s")
        from qwen_trainer.engines.megatron.expert_wgrad import DEFER, KERNEL, OVERWRITE
        from qwen_trainer.engines.megatron.kernels import megatron_optimizers
        from qwen_trainer.engines.megatron.triton_kernels import WGRAD_IN_MAIN_GRAD

        chunks = engine.model.unwrapped()
        built = {"dispatchers": [type(m.token_dispatcher).__name__ for c in chunks for m in c.modules()
                                 if hasattr(m, "token_dispatcher")],
                 "into_main_grad": sorted(n for c in chunks for n, p in c.named_parameters()
                                          if getattr(p, WGRAD_IN_MAIN_GRAD, False)),
                 "deferring": sorted(n for c in chunks for n, p in c.named_parameters() if hasattr(p, DEFER)),
                 "overwriting": sorted(n for c in chunks for n, p in c.named_parameters() if hasattr(p, OVERWRITE)),
                 "kernel": sorted(n for c in chunks for n, p in c.named_parameters() if getattr(p, KERNEL, False)),
                 "adamw_kernel": sum(hasattr(o, "adamw_stepper") for o in megatron_optimizers(engine.model.optimizer))}
        if env.rank == 0:
            torch.save(built, out / "built.pt")

        norms: dict[int, float] = {}
        losses: dict[int, float] = {}
        # readback=next: each step's figures read back once the next step is launched, as the training loop does
        read_next = kv.get("readback") == "next"

        def launch(it: int):
            return engine.launch_step(step_batches(it, arch.vocab_size, dp, dp_rank), LR, "mean")

        def record(it: int, step) -> float:
            result = step.result()
            norms[it], losses[it] = result.grad_norm, result.loss
            return result.loss

        def train(it: int) -> float:
            return record(it, launch(it))

        state = store.TrainState()
        full = None
        if env.rank == 0:  # as the training loop starts: leftovers of an interrupted save go first
            root.mkdir(parents=True, exist_ok=True)
            store.clean_leftovers(root, say)
        dist.barrier()
        if phase == "resume":
            latest = store.find_latest(root, say)
            loaded = store.load(root, latest, engine, fmt="mcore", rank=env.rank, load_optimizer=True, log=say)
            state = loaded.state
            full = gathered_state(engine)
        else:
            saves = AsyncSaves() if use_async else None
            pending = None
            for it in range(1, steps + 1):
                step = launch(it)
                if pending is not None:
                    record(*pending)
                pending = (it, step)
                if not read_next:
                    record(*pending)
                    pending = None
                state.iteration, state.consumed_samples = it, it * GLOBAL_BATCH
                if env.rank == 0:  # what a run killed later leaves behind
                    torch.save(losses, out / "losses.pt")
                    torch.save(norms, out / "grad_norms.pt")
                if it in save_at:
                    store.save(root, state, engine, fmt="mcore", layout={}, scheduler={}, fingerprint={},
                               keep_last=None, save_optimizer=True, rank=env.rank, world=env.world_size, log=say,
                               async_saves=saves)
                    if saves is not None:
                        saves.wait()
                    full = gathered_state(engine)
                    if env.rank == 0:
                        torch.save({"iteration": it, "state": full}, out / f"save-{it}.pt")
            if pending is not None:
                record(*pending)
            if env.rank == 0:
                torch.save(losses, out / "losses.pt")
                torch.save(norms, out / "grad_norms.pt")
        say(f"{phase} done at {time.time() - started:.1f}s")
        after = [train(it) for it in range(state.iteration + 1, state.iteration + extra + 1)]
        if env.rank == 0:
            torch.save({"losses": after, "iteration": state.iteration, "state": full}, out / f"{phase}.pt")
            say(f"{phase}: iteration {state.iteration}, next losses {after}")
        engine.close()
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("QWEN_CHECKPOINT_WRITERS", "1")
    raise SystemExit(main())
