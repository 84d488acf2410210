"""Run under torchrun with 1 process: trains a small model with the megatron engine, CUDA graphs
on or off (argv: case, on|off[, more EngineOptions as JSON[, loss mode[, steps[, spec training fields as JSON[,
"varying": each step's batches carry another number of loss tokens, as SFT batches do]]]]]), evaluating between
steps, and prints
one JSON line with every loss and gradient norm."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
warnings.filterwarnings("ignore")

TINY = dict(numLayers=3, hiddenSize=256, numAttentionHeads=4, numQueryGroups=2, ffnHiddenSize=512, vocabSize=2048,
            maxPositionEmbeddings=1024)
CASES = {
    "dense": ("qwen2.5", "1.5B", dict(architecture=TINY)),
    "dense-untied": ("qwen2.5", "7B", dict(architecture=TINY)),
    "moe": ("qwen1.5", "A2.7B", dict(architecture=dict(TINY, numQueryGroups=4),
                                     moe=dict(numExperts=8, topK=2, ffnHiddenSize=128, sharedExpertFfnHiddenSize=256))),
}
SEQ, MICRO, GLOBAL, STEPS = 512, 2, 8, 5


def run_worker(case: str, graphs: str = "off", options: dict | None = None, loss_mode: str = "mean",
               steps: int = STEPS, training: dict | None = None, varying: bool = False) -> dict:
    """This worker under torchrun (one process): its JSON line, or an AssertionError with its output's tail (the
    GPU tests' way to train a small model)."""
    import os
    import subprocess

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                           str(Path(__file__).resolve()), case, graphs, json.dumps(options or {}), loss_mode,
                           str(steps), json.dumps(training or {}), "varying" if varying else "fixed"],
                          env=env, capture_output=True, text=True, timeout=600)
    for line in proc.stdout.splitlines():
        if line.startswith("GRAPHS "):
            return json.loads(line[len("GRAPHS "):])
    raise AssertionError(f"worker failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def main() -> int:
    from qwen_trainer.engines.megatron import EngineOptions
    from qwen_trainer.engines.megatron.testing import built_engine, job_spec, random_micro_batches
    from qwen_trainer.spec import resolve_architecture

    case, graphs = sys.argv[1], sys.argv[2] == "on"
    family, size, shape = CASES[case]
    training = {"seqLength": SEQ, "microBatchSize": MICRO, "globalBatchSize": GLOBAL,
                "activationCheckpointing": {"mode": "none"}}
    training.update(json.loads(sys.argv[6]) if len(sys.argv) > 6 else {})
    spec = job_spec(family, size, training=training, **shape)
    vocab = resolve_architecture(spec).vocab_size
    extra = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    loss_mode = sys.argv[4] if len(sys.argv) > 4 else "mean"
    steps = int(sys.argv[5]) if len(sys.argv) > 5 else STEPS
    varying = len(sys.argv) > 7 and sys.argv[7] == "varying"
    engine = built_engine(spec, EngineOptions(cuda_graphs=graphs, **extra))
    tied = engine.unwrapped()[-1].share_embeddings_and_output_weights
    train = random_micro_batches(GLOBAL // MICRO, MICRO, SEQ, vocab, seed=1)
    held_out = random_micro_batches(2, MICRO, SEQ, vocab, seed=2)
    losses, evals, norms = [], [], []
    for step in range(steps):
        if varying:  # the same tokens, 3 more positions without loss each step
            train = random_micro_batches(GLOBAL // MICRO, MICRO, SEQ, vocab, seed=1, ignore_first=3 * step)
        result = engine.train_step(train, spec.training.lr, loss_mode)
        losses.append(result.loss)
        norms.append(result.grad_norm)
        if step in (1, steps - 1):
            total, tokens = engine.eval_step(held_out)
            evals.append(total / tokens)
    graphed = engine.model.config.cuda_graph_impl == "local"
    from qwen_trainer.engines.megatron.expert_wgrad import DEFER, KERNEL, MARK, OVERWRITE

    params = [p for c in engine.model.chunks for p in c.parameters()]
    # marked into main_grad by its own backward, other than the experts' (the word embedding)
    wgrad_into_buffer = sum(bool(getattr(p, MARK, False)) and not hasattr(p, KERNEL) for p in params)
    expert_wgrad_kernel = sum(bool(getattr(p, KERNEL, False)) for p in params)
    expert_wgrad_deferred = sum(hasattr(p, DEFER) for p in params)
    expert_wgrad_overwriting = sum(hasattr(p, OVERWRITE) for p in params)
    gather_dispatch = sum(bool(getattr(getattr(m, "token_dispatcher", None), "gather", False))
                          for c in engine.model.chunks for m in c.modules())
    from qwen_trainer.engines.megatron.kernels import megatron_optimizers

    adamw_kernel = sum(hasattr(o, "adamw_stepper") for o in megatron_optimizers(engine.model.optimizer))
    from megatron.core.optimizer import optimizer as optimizer_module

    norm_on_device = optimizer_module.get_grad_norm_fp32.__module__.endswith("clip_in_adam")
    step_graph_replays = engine.whole_step_graph_replays
    step_graph_given_up = engine.whole_step_graph_given_up
    engine.close()
    row = dict(case=case, graphs=graphs, options=extra, loss_mode=loss_mode, tied=tied, graphed=graphed, losses=losses,
               evals=evals, grad_norms=norms, wgrad_into_buffer=wgrad_into_buffer,
               expert_wgrad_kernel=expert_wgrad_kernel, expert_wgrad_deferred=expert_wgrad_deferred,
               expert_wgrad_overwriting=expert_wgrad_overwriting,
               gather_dispatch=gather_dispatch, adamw_kernel=adamw_kernel, norm_on_device=norm_on_device,
               step_graph_replays=step_graph_replays, step_graph_given_up=step_graph_given_up)
    print("GRAPHS " + json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
