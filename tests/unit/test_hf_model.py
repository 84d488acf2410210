"""The CPU engine's transformers model for MoE shapes transformers has no exact class for: a Qwen1.5/Qwen2 MoE
without a shared expert (upcycled or MegaBlocks models)."""

from __future__ import annotations

import torch

from qwen_trainer.engines.hf_model import build_model, checkpoint_state_dict, hf_config, load_checkpoint_state_dict
from qwen_trainer.engines.megatron.testing import job_spec
from qwen_trainer.spec import resolve_architecture

TINY = dict(numLayers=2, hiddenSize=64, numAttentionHeads=4, numQueryGroups=4, ffnHiddenSize=128, vocabSize=256,
            maxPositionEmbeddings=64)


def _arch():
    spec = job_spec("qwen1.5", "A2.7B", architecture=TINY,
                    moe=dict(numExperts=4, topK=2, ffnHiddenSize=32, sharedExpertFfnHiddenSize=0))
    return resolve_architecture(spec)


def test_moe_without_shared_expert_round_trips_without_its_vestigial_tensors():
    arch = _arch()
    torch.manual_seed(0)
    first = build_model(hf_config(arch))
    weights = checkpoint_state_dict(first)
    assert not [k for k in weights if "shared_expert" in k]  # what the converter and the checkpoints see
    assert "model.layers.0.mlp.experts.3.down_proj.weight" in weights
    torch.manual_seed(1)
    second = build_model(hf_config(arch))
    load_checkpoint_state_dict(second, weights)
    tokens = torch.randint(0, arch.vocab_size, (2, 16))
    with torch.no_grad():
        a, b = first(input_ids=tokens).logits, second(input_ids=tokens).logits
    assert torch.allclose(a, b, atol=1e-6)
    for name, t in second.state_dict().items():
        if "shared_expert" in name:
            assert not t.any(), name  # zero-width expert, zero gate
