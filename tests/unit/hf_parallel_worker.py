"""Run under torchrun (1 or 2 processes, gloo): trains a tiny transformers MoE model for two optimiser steps of
4 micro-batches with the GPU benchmark's baseline wrapper (argv: single | ddp | fsdp) and prints one JSON line:
the loss on a fixed batch afterwards and whether the parameters were sharded."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks" / "gpu")]
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from hf_parallel import wrap  # noqa: E402

GLOBAL_MICRO, STEPS = 4, 2
ARCH = dict(numLayers=2, hiddenSize=64, numAttentionHeads=4, numQueryGroups=4, ffnHiddenSize=128, vocabSize=256,
            maxPositionEmbeddings=64)
MOE = dict(numExperts=4, topK=2, ffnHiddenSize=32, sharedExpertFfnHiddenSize=64)


def main() -> int:
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM

    from qwen_trainer.engines.hf_model import hf_config
    from qwen_trainer.engines.megatron.testing import job_spec
    from qwen_trainer.spec import resolve_architecture

    mode = sys.argv[1]
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    arch = resolve_architecture(job_spec("qwen1.5", "A2.7B", architecture=ARCH, moe=MOE))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config(arch), dtype=torch.float32, attn_implementation="sdpa")
    full_numel = sum(p.numel() for p in model.parameters())
    net, sync = wrap(model, mode)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, fused=True)
    tokens = torch.randint(0, arch.vocab_size, (GLOBAL_MICRO, 2, 32), generator=torch.Generator().manual_seed(1))
    mine = tokens[rank * GLOBAL_MICRO // world:(rank + 1) * GLOBAL_MICRO // world]  # this rank's micro-batches
    for _ in range(STEPS):
        for i, batch in enumerate(mine):
            with sync(i == len(mine) - 1):
                (net(input_ids=batch, labels=batch).loss / len(mine)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        loss = float(net(input_ids=tokens[0], labels=tokens[0]).loss)
    params = list(model.parameters())
    local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params)
    row = dict(mode=mode, rank=rank, world=world, loss=loss, sharded=local < full_numel,
               experts=str(getattr(model.config, "_experts_implementation", None)))
    # one write for the whole line: unbuffered, print() writes the text and the newline apart, and the ranks'
    # lines interleave on the shared pipe
    sys.stdout.write("BASELINE " + json.dumps(row) + "\n")
    sys.stdout.flush()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
