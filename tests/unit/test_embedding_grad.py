"""The word embedding's gradient added row by row into the fp32 buffer (qwen_trainer.engines.megatron.
embedding_grad): against autograd's dense bf16 gradient added by megatron's hook, and through the engine in real
processes (torchrun, gloo, CPU): training with it matches training without it."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

from qwen_trainer.engines.megatron.embedding_grad import EmbeddingIntoMainGrad  # noqa: E402
from tests.unit.test_megatron_resume_cpu import trained_losses  # noqa: E402

VOCAB, HIDDEN = 97, 24


def _weight() -> torch.nn.Parameter:
    torch.manual_seed(3)
    w = torch.nn.Parameter(torch.randn(VOCAB, HIDDEN, dtype=torch.bfloat16))
    w.main_grad = torch.full((VOCAB, HIDDEN), 0.25)  # what earlier micro-batches left in the buffer
    w.grad_added_to_main_grad = False
    return w


@pytest.mark.parametrize("deterministic", [False, True])
def test_rows_land_in_main_grad_like_autograd_and_an_add(deterministic):
    ids = torch.tensor([[3, 5, 3, 96], [0, 3, 5, 7]])  # repeats: their rows are summed
    upstream = torch.randn(2, 4, HIDDEN, dtype=torch.bfloat16)
    plain, fused = _weight(), _weight()
    out_plain = torch.nn.functional.embedding(ids, plain)
    out_plain.backward(upstream)
    plain.main_grad += plain.grad.float()  # megatron's DDP hook
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        out_fused = EmbeddingIntoMainGrad.apply(ids, fused)
        out_fused.backward(upstream)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(out_fused, out_plain)
    assert fused.grad_added_to_main_grad and fused.grad.shape == fused.shape  # placeholder for DDP's hook
    torch.testing.assert_close(fused.main_grad, plain.main_grad, rtol=1e-2, atol=1e-2)
    exact = torch.full((VOCAB, HIDDEN), 0.25, dtype=torch.float64).index_add_(
        0, ids.reshape(-1), upstream.reshape(-1, HIDDEN).double())
    torch.testing.assert_close(fused.main_grad.double(), exact, rtol=1e-6, atol=1e-6)
    untouched = torch.ones(VOCAB, dtype=torch.bool)
    untouched[ids.reshape(-1)] = False
    assert bool((fused.main_grad[untouched] == 0.25).all())


def _train(tmp_path, name: str, opts: dict):
    losses, built = trained_losses(tmp_path, name, 1, 4, f"opts={json.dumps(opts)}")
    return losses, built["into_main_grad"]


def test_the_engine_trains_the_same_with_the_embedding_gradient_in_the_buffer(tmp_path):
    """The tiny Qwen3-MoE shape (untied output layer), 4 steps through MegatronEngine, bf16 weights."""
    plain, plain_marked = _train(tmp_path, "plain", {"embedding_grad_into_buffer": False})
    fused, fused_marked = _train(tmp_path, "fused", {"embedding_grad_into_buffer": True})
    assert plain_marked == [] and fused_marked == ["embedding.word_embeddings.weight"]
    for a, b in zip(fused, plain):
        assert abs(a - b) <= 1e-3 * abs(b), (fused, plain)
    assert len(fused) == 4


def test_which_embeddings_take_the_path_and_which_notes_are_worth_a_line():
    from types import SimpleNamespace

    from qwen_trainer.engines.megatron import embedding_grad

    def model(tied=False, tp=1, buffer=True, stage_has_embedding=True):
        weight = torch.nn.Parameter(torch.zeros(4, 2))
        if buffer:
            weight.main_grad = torch.zeros(4, 2)
        words = SimpleNamespace(weight=weight, tp_group=SimpleNamespace(size=lambda: tp),
                                reduce_scatter_embeddings=False)
        m = SimpleNamespace(share_embeddings_and_output_weights=tied)
        if stage_has_embedding:
            m.embedding = SimpleNamespace(word_embeddings=words)
        return m

    assert embedding_grad.why_not(model()) is None
    assert embedding_grad.why_not(model(tied=True)) == embedding_grad.TIED
    assert "tensor parallelism" in embedding_grad.why_not(model(tp=2))
    assert "buffer" in embedding_grad.why_not(model(buffer=False))
    untied = model()
    changed, reasons = embedding_grad.install([untied, model(tied=True), model(stage_has_embedding=False),
                                               model(tp=2)])
    assert changed == 1 and reasons == ["tensor parallelism splits the vocabulary"]
    assert getattr(untied.embedding.word_embeddings.weight, embedding_grad.MARK)
