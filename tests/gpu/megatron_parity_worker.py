"""Run under torchrun with 2 processes: trains small dense and MoE models with the megatron engine at TP=2 and EP=2
from the same seeded HF weights and data as an fp32 CPU transformers model, and prints one JSON line per layout."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
warnings.filterwarnings("ignore")

import torch  # noqa: E402

TINY = dict(numLayers=2, hiddenSize=128, numAttentionHeads=8, numQueryGroups=2, ffnHiddenSize=256, vocabSize=1024,
            maxPositionEmbeddings=256)
LAYOUTS = {
    "dense-tp2": ("qwen2.5", "1.5B", dict(architecture=TINY, parallelism={"tensor": 2, "sequenceParallel": True})),
    "dense-dp2": ("qwen2.5", "7B", dict(architecture=dict(TINY, tieWordEmbeddings=False), parallelism={})),
    "moe-tp2": ("qwen1.5", "A2.7B", dict(
        architecture=dict(TINY, numQueryGroups=8),
        moe=dict(numExperts=4, topK=2, ffnHiddenSize=64, sharedExpertFfnHiddenSize=128),
        parallelism={"tensor": 2, "sequenceParallel": True})),
    "moe-ep2": ("qwen3", "A3B", dict(
        architecture=dict(TINY, kvChannels=16),
        moe=dict(numExperts=4, topK=2, ffnHiddenSize=64, normTopkProb=True),
        parallelism={"expert": 2})),
}
SEQ, MICRO, GLOBAL, STEPS = 128, 2, 8, 6


def main() -> int:
    from qwen_trainer.engines.megatron import EngineOptions, data_parallel_info
    from qwen_trainer.engines.megatron.testing import built_engine, hf_loss, hf_reference, job_spec, random_micro_batches
    from qwen_trainer.spec import resolve_architecture

    names = sys.argv[1].split(",") if len(sys.argv) > 1 else list(LAYOUTS)
    rank = int(os.environ.get("RANK", "0"))
    for name in names:
        family, size, kw = LAYOUTS[name]
        spec = job_spec(family, size, training={"seqLength": SEQ, "microBatchSize": MICRO, "globalBatchSize": GLOBAL,
                                                "lr": 1e-3, "minLr": 1e-3, "clipGrad": 1.0,
                                                "activationCheckpointing": {"mode": "none"}}, **kw)
        arch = resolve_architecture(spec)
        hf, weights = hf_reference(arch, seed=7)
        batches = random_micro_batches(GLOBAL // MICRO, MICRO, SEQ, arch.vocab_size, seed=3, ignore_first=5)
        reference = hf_loss(hf, batches, "cpu")  # fp32 on the CPU, as the cpu engine computes it
        row = dict(layout=name, reference_fp32_cpu=reference)
        engine = None
        try:
            engine = built_engine(spec, EngineOptions())
            engine.load_checkpoint_weights(weights)
            dp, dp_rank = data_parallel_info()
            per = len(batches) // dp
            mine = batches[dp_rank * per:(dp_rank + 1) * per]
            total, tokens = engine.eval_step(mine)
            eval_loss = total / tokens
            # "per_token": the parity reference is the token mean over the whole batch
            losses = [engine.train_step(mine, spec.training.lr, "per_token").loss for _ in range(STEPS)]
            row.update(eval_loss_bf16=eval_loss, first_step_loss_bf16=losses[0], losses=losses, dp=dp,
                       experts=engine.plan.experts, attention=engine.plan.attention, notes=engine.notes)
        except Exception as err:
            import traceback

            traceback.print_exc()
            row["error"] = f"{type(err).__name__}: {err}"
        finally:
            if engine is not None:
                engine.close()
        if rank == 0:
            print("PARITY " + json.dumps(row), flush=True)
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
