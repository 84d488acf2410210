"""The training loop shared by every engine: pretrain (continued pretraining) and finetune (SFT).

Read top to bottom: pick the engine, build the data, plan the schedule, build the model, resume or load initial
weights, then step -> log -> evaluate -> save until the last iteration.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from qwen_trainer import faults, progress
from qwen_trainer.checkpoint import store, weights
from qwen_trainer.data import batches
from qwen_trainer.data.prefetch import StepPrefetcher
from qwen_trainer.data.tokenizer import has_tokenizer
from qwen_trainer.distenv import DistEnv, init_process_group
from qwen_trainer.engines import EngineContext, select_engine
from qwen_trainer.engines.base import launch_step
from qwen_trainer.spec.layout import megatron_layout
from qwen_trainer.errors import UserError, UserErrors
from qwen_trainer.metrics import Metrics
from qwen_trainer.readback import StepReader
from qwen_trainer.schedule import plan as plan_steps
from qwen_trainer.spec import JobSpec, derive, resolve_architecture
from qwen_trainer.spec.estimate import flops_per_token
from qwen_trainer.spec.resolve import checkpoint_formats
from qwen_trainer.status_reporter import StatusReporter

QWEN_EOD = 151643  # <|endoftext|> in every Qwen vocabulary


def tokenizer_dir(spec: JobSpec) -> Optional[str]:
    if spec.model.tokenizer_path:
        return spec.model.tokenizer_path
    src = spec.checkpoint.source
    if src is not None and has_tokenizer(src.path):
        return src.path
    return None


def _barrier(world: int) -> None:
    if world > 1 and dist.is_initialized():
        dist.barrier()


def _set_threads(d: DistEnv) -> None:
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(d.local_world_size, 1)))


def build_data(spec: JobSpec, arch, tok_dir: Optional[str], out_root: Path, train_samples: Optional[int],
               valid_samples: int, log):
    """(train source, valid source or None). train_samples is None for epoch-based SFT (known after loading)."""
    t = spec.training
    if spec.stage == "pretrain":
        from qwen_trainer.data import pretrain

        if tok_dir:
            from qwen_trainer.data.tokenizer import eod_id, load_tokenizer

            eod = eod_id(load_tokenizer(tok_dir))
        elif QWEN_EOD < arch.vocab_size:
            eod = QWEN_EOD
        else:
            raise UserError("no tokenizer to take the end-of-document id from; set model.tokenizerPath",
                            path="model.tokenizerPath")
        p = spec.data.pretrain
        splits = pretrain.build([x.path for x in p.prefixes], [x.weight for x in p.prefixes], p.split, t.seq_length,
                                t.seed, train_samples, valid_samples, str(out_root / "data_cache"), eod,
                                arch.vocab_size, log)
        return splits.train, splits.valid
    from qwen_trainer.data import sft
    from qwen_trainer.data.tokenizer import load_tokenizer

    if not tok_dir:
        raise UserError("SFT needs the tokenizer: set model.tokenizerPath or use a source checkpoint with "
                        "tokenizer files", path="model.tokenizerPath")
    tok = load_tokenizer(tok_dir)
    if len(tok) > arch.vocab_size:
        raise UserError(f"the tokenizer has {len(tok)} tokens but the model's vocabulary is {arch.vocab_size}",
                        path="model.architecture.vocabSize")
    s = spec.data.sft
    length = t.pad_length or t.seq_length
    train = sft.build(s.train_path, "data.sft.trainPath", tok, length, s.packing, t.seed, "train")
    st = train.stats
    log(f"SFT data: {st.samples} samples -> {st.sequences} sequences of {length} tokens "
        f"({'packed' if s.packing else 'padded'}; {st.skipped} skipped, {st.truncated} truncated, "
        f"{st.loss_tokens} loss tokens)")
    valid = None
    if s.valid_path:
        valid = sft.build(s.valid_path, "data.sft.validPath", tok, length, s.packing, t.seed, "valid", shuffle=False)
    return train, valid


def run_training(spec: JobSpec, d: DistEnv, log: Callable[[str], None]) -> int:
    t = spec.training
    arch = resolve_architecture(spec)
    derived = derive(spec, d.world_size)
    src_fmt, out_fmt = checkpoint_formats(spec)
    out_root = Path(spec.checkpoint.output.path)
    main = d.is_main
    say = log if main else (lambda _m: None)

    engine = select_engine(spec, say)
    _set_threads(d)
    init_process_group(d, "gloo" if engine.device == "cpu" else "nccl")
    dp, dp_rank = d.world_size, d.rank  # CPU engine: every process is a data-parallel replica
    if engine.name != "cpu":  # the engine's rank order decides which processes share micro-batches
        dp, dp_rank = engine.data_parallel_size, engine.data_parallel_rank
    if engine.name == "cpu" and (spec.parallelism.tensor, spec.parallelism.pipeline, spec.parallelism.expert) != (1, 1, 1):
        say(f"engine=cpu trains data-parallel over {dp} processes; tensor {spec.parallelism.tensor} / pipeline "
            f"{spec.parallelism.pipeline} / expert {spec.parallelism.expert} parallel sizes set the checkpoint layout")

    if main:
        out_root.mkdir(parents=True, exist_ok=True)
        store.clean_leftovers(out_root, say)
    _barrier(d.world_size)

    # ---- data and schedule --------------------------------------------------------------------------------------
    tok_dir = tokenizer_dir(spec)
    basis_iters = derived.train_iters
    mbs_dp = t.micro_batch_size * dp
    if t.global_batch_size % mbs_dp:
        raise UserError(f"global batch size {t.global_batch_size} must be a multiple of micro batch "
                        f"{t.micro_batch_size} x {dp} data-parallel processes", path="training.globalBatchSize")
    valid_samples = t.eval_iters * t.global_batch_size
    train_src, valid_src = build_data(spec, arch, tok_dir, out_root,
                                      basis_iters * t.global_batch_size if basis_iters else None, valid_samples, say)
    plan = plan_steps(spec, dp, len(train_src))
    say(f"stage={spec.stage} engine={engine.name} world={d.world_size} dp={dp} micro={t.micro_batch_size} "
        f"global={t.global_batch_size} grad-accum={plan.grad_accumulation} seq={t.seq_length} "
        f"iters={plan.train_iters} warmup={plan.schedule.warmup_steps} decay={plan.schedule.decay_steps} "
        f"({plan.schedule.style}) lr={t.lr} min-lr={t.min_lr} params={derived.parameters:,} "
        f"checkpoint={out_fmt} -> {out_root}")

    # ---- model, then resume or initial weights --------------------------------------------------------------------
    engine.build(EngineContext(spec, arch, d, derived.init_method_std, t.seed, say))
    fingerprint = {"architecture": arch.to_dict(), "stage": spec.stage, "global_batch_size": t.global_batch_size,
                   "seq_length": t.seq_length}
    state = store.TrainState()
    latest = None if spec.checkpoint.resume == "never" else store.find_latest(out_root, say)
    if spec.checkpoint.resume == "require" and latest is None:
        raise UserError(f"resume is require but {out_root} holds no complete checkpoint", path="checkpoint.resume")
    if latest is not None:
        loaded = store.load(out_root, latest, engine, fmt=out_fmt, rank=d.rank,
                            load_optimizer=spec.checkpoint.load_optimizer, log=say)
        problems = store.fingerprint_problems(loaded.fingerprint, fingerprint)
        if problems:
            raise UserErrors([f"checkpoint.output: {p} ({out_root})" for p in problems])
        if loaded.optimizer is not None:
            engine.load_optimizer_state_dict(loaded.optimizer)
        if loaded.rng is not None:
            store.set_rng_state(loaded.rng)
        state = loaded.state
        say(f"resumed from {out_root}/iter_{latest:07d} (engine={loaded.engine}): iteration {state.iteration}, "
            f"{state.consumed_samples} samples consumed")
    elif spec.checkpoint.source is not None:
        src = spec.checkpoint.source
        say(f"loading initial weights from {src.path} ({src_fmt})")
        try:
            sd = weights.read_weights(Path(src.path), src_fmt, scratch_parent=out_root)
        except Exception as err:
            if type(err).__name__ == "ConversionError":
                raise weights.conversion_error(err, "checkpoint.source") from None
            raise
        from qwen_trainer.engines.cpu import WeightsMismatch

        try:
            engine.load_checkpoint_weights(sd)
        except WeightsMismatch as err:
            raise UserErrors([f"checkpoint.source: {src.path} does not fit the model: {p}" for p in err.problems[:8]])
        del sd
    else:
        say(f"random initialisation (std {derived.init_method_std}, seed {t.seed})")

    if main:
        store.write_model_description(out_root, engine.hf_config(), tok_dir)
    _barrier(d.world_size)

    # ---- loop ---------------------------------------------------------------------------------------------------
    fpt = flops_per_token(arch, t.seq_length)
    run_info = {"stage": spec.stage, "engine": engine.name, "world_size": d.world_size, "train_iters": plan.train_iters,
                "resumed_from": state.iteration, "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))}
    device_name = torch.cuda.get_device_name() if engine.device == "cuda" else None
    metrics = Metrics(out_root, main, engine.name, d.world_size, fpt, run_info, say, device_name=device_name)
    status = StatusReporter(say) if main else None
    if engine.name == "cpu":  # the megatron engine lists its notes in its own start line
        for note in engine.notes:
            say(f"note: {note}")
    if status is not None:
        status.report(force=True, engine=engine.name, notes=list(engine.notes) or None)
    loss_mode = "mean" if spec.stage == "pretrain" else "per_token"
    sched = plan.schedule
    save_kwargs = dict(fmt=out_fmt, layout=megatron_layout(spec),
                       fingerprint=fingerprint, keep_last=t.keep_last_n, save_optimizer=spec.checkpoint.save_optimizer,
                       rank=d.rank, world=d.world_size, log=say)
    last_saved = state.iteration if latest is not None else None
    async_saves = None
    if getattr(engine, "saves_sharded", False) and spec.checkpoint.async_save:
        from qwen_trainer.checkpoint.sharded import AsyncSaves

        async_saves = AsyncSaves()

    def saved(folder: Path) -> None:
        if status is not None:
            status.report(force=True, checkpoint=str(folder))

    def save_checkpoint() -> None:
        store.save(out_root, state, engine, scheduler=sched.state_dict(), async_saves=async_saves, on_saved=saved,
                   **save_kwargs)

    window = {"loss": 0.0, "aux": 0.0, "n": 0, "tokens": 0, "loss_tokens": 0, "t": time.time()}
    end = state.consumed_samples + (plan.train_iters - state.iteration) * t.global_batch_size
    feeder = StepPrefetcher(train_src, t.global_batch_size, t.micro_batch_size, dp, dp_rank, t.num_workers, end=end)
    loop_started, loop_start_iteration = time.time(), state.iteration

    def account(it: int, lr: float, step) -> None:
        """Step `it`'s figures into the logging window (reading them back if still on the device); logs at the
        interval."""
        nonlocal window
        result = step.result()
        window["loss"] += result.loss
        window["aux"] += result.aux_loss or 0.0
        window["n"] += 1
        window["tokens"] += plan.tokens_per_step
        window["loss_tokens"] += result.loss_tokens
        if it % t.log_interval == 0 or it == plan.train_iters:
            elapsed = time.time() - window["t"]
            n = window["n"]
            last = metrics.train(it, plan.train_iters, state.consumed_samples, window["loss"] / n,
                                 window["aux"] / n if result.aux_loss is not None else None, lr,
                                 result.grad_norm, elapsed / n, window["tokens"] / n, window["loss_tokens"])
            if status is not None:
                mfu = {"mfu": round(last["mfu"], 4)} if last.get("mfu") is not None else {}
                how_far = progress.progress_fields(it, plan.train_iters, loop_started, time.time(),
                                                   loop_start_iteration)
                status.report(iteration=it, trainIters=plan.train_iters, loss=last["loss"],
                              tokensPerSecond=round(last["tokens_per_second"], 1), engine=engine.name, **mfu,
                              **how_far, summary=progress.summary(it, plan.train_iters, last["loss"], how_far))
            window = {"loss": 0.0, "aux": 0.0, "n": 0, "tokens": 0, "loss_tokens": 0, "t": time.time()}

    reader = StepReader(account)
    try:
        while state.iteration < plan.train_iters:
            it = state.iteration + 1
            lr = sched.lr_for_iteration(it)
            mbs = feeder.get(state.consumed_samples)
            faults.hit("step", it, d.rank)
            reader.launched(it, lr, launch_step(engine, mbs, lr, loss_mode))
            if async_saves is not None:
                async_saves.poll()  # commits a background checkpoint once every rank's writer is done
            state.iteration = it
            state.consumed_samples += t.global_batch_size
            state.flops_so_far += fpt * plan.tokens_per_step
            evaluating = valid_src is not None and t.eval_iters > 0 and (it % t.eval_interval == 0
                                                                         or it == plan.train_iters)
            saving = it % t.save_interval == 0 or it == plan.train_iters
            if it % t.log_interval == 0 or evaluating or saving:
                reader.flush()
            if evaluating:
                evaluate(engine, valid_src, t, dp, dp_rank, it, metrics)
            if saving:
                save_checkpoint()
                last_saved = it
                window["t"] = time.time()  # keep save time out of the throughput
        if last_saved != state.iteration:
            save_checkpoint()
        if async_saves is not None:
            async_saves.wait()
        metrics.event("end", iteration=state.iteration)
        say(f"training done: iteration {state.iteration}, checkpoint {out_root}/iter_{state.iteration:07d}, "
            f"engine={engine.name}")
    finally:
        feeder.close()
        metrics.close()
        if status is not None:
            status.close()
    return 0


def evaluate(engine, source, t, dp, dp_rank, iteration, metrics) -> None:
    total = tokens = 0
    for k in range(t.eval_iters):
        start = (k * t.global_batch_size) % max(len(source), 1)
        mbs = batches.step_micro_batches(source, start, t.global_batch_size, t.micro_batch_size, dp, dp_rank)
        s, n = engine.eval_step(mbs)
        total += s
        tokens += n
    if tokens:
        metrics.valid(iteration, total / tokens, tokens)
