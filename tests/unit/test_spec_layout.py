"""One Megatron checkpoint layout per spec, for the convert step and every gathered training save."""

from __future__ import annotations

from qwen_trainer.engines.megatron.testing import job_spec
from qwen_trainer.spec.layout import megatron_layout, virtual_chunks


def test_layout_carries_every_parallel_size_the_spec_sets():
    spec = job_spec("qwen3", "A3B", architecture={"numLayers": 8}, moe={"numExperts": 8, "topK": 2},
                    parallelism={"tensor": 2, "pipeline": 2, "expert": 2, "expertTensor": 1,
                                 "virtualPipelineLayers": 2},
                    training={"transformerEngine": True})
    got = megatron_layout(spec)
    lay = got["layout"]
    assert (lay.tp, lay.pp, lay.ep, lay.etp, lay.vpp) == (2, 2, 2, 1, 2)  # 8 layers / 2 stages / 2 per chunk
    assert got["transformer_engine_keys"] is True
    assert got["expert_layout"] == "grouped"  # grouped GEMM (the default) under Transformer Engine
    assert got["padded_vocab_size"] >= 151643


def test_dense_spec_has_no_expert_layout_and_one_chunk():
    spec = job_spec("qwen2.5", "0.5B")
    got = megatron_layout(spec)
    assert "expert_layout" not in got and got["layout"].vpp == 1
    assert virtual_chunks(spec, 24) == 1
