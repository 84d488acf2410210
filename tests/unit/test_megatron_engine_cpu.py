"""The megatron engine's pieces that run without a GPU: spec -> TransformerConfig translation, the layer spec with
our modules, HF weights -> megatron layout, and forward parity with the HF model on CPU in fp32 (dense and MoE),
plus the chunked cross-entropy and the torch grouped-GEMM stand-in against plain references."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("megatron.core")
warnings.filterwarnings("ignore")

from qwen_trainer.engines.megatron import kernels as kernels  # noqa: E402
from qwen_trainer.engines.megatron.config import (  # noqa: E402
    Capabilities,
    EngineOptions,
    gpt_model_kwargs,
    layer_spec,
    plan_model,
)
from qwen_trainer.engines.megatron.loss import (  # noqa: E402
    check_output_grad_scale,
    take_output_grad_scales,
    verify_output_grad_scales,
    linear_cross_entropy,
    loss_sum_from_output,
    make_model_class,
    reference_cross_entropy,
)
from qwen_trainer.engines.megatron.testing import (  # noqa: E402
    hf_loss, hf_reference, job_spec, random_micro_batches, tiny_architecture)
from qwen_trainer.engines.megatron.weights import load_into  # noqa: E402
from qwen_trainer.errors import UserError  # noqa: E402
from qwen_trainer.spec import resolve_architecture  # noqa: E402

TINY = tiny_architecture()
CPU = Capabilities()


# ------------------------------------------------------------------------------------------------ config


def test_dense_config_follows_family_traits():
    spec = job_spec("qwen2.5", "1.5B")
    arch = resolve_architecture(spec)
    plan = plan_model(arch, spec, EngineOptions(), CPU)
    kw = plan.config_kwargs
    assert (kw["num_layers"], kw["hidden_size"], kw["num_query_groups"], kw["kv_channels"]) == (28, 1536, 2, 128)
    assert kw["add_qkv_bias"] and not kw["qk_layernorm"] and kw["normalization"] == "RMSNorm"
    assert kw["gated_linear_unit"] and not kw["add_bias_linear"] and kw["bf16"]
    assert plan.tie_word_embeddings and plan.attention == "sdpa" and plan.fused_rope
    assert kw["recompute_granularity"] == "selective" and kw["recompute_modules"] == ["core_attn"]
    assert gpt_model_kwargs(plan)["position_embedding_type"] == "none"


def test_qwen3_and_moe_routing_semantics():
    q3 = job_spec("qwen3", "A3B")
    kw = plan_model(resolve_architecture(q3), q3, EngineOptions(), CPU).config_kwargs
    assert kw["qk_layernorm"] and not kw["add_qkv_bias"] and kw["kv_channels"] == 128
    assert kw["num_moe_experts"] == 128 and kw["moe_router_topk"] == 8 and kw["moe_router_pre_softmax"] is False
    q15 = job_spec("qwen1.5", "A2.7B")
    kw = plan_model(resolve_architecture(q15), q15, EngineOptions(), CPU).config_kwargs
    assert kw["moe_router_pre_softmax"] is True  # softmax over all experts, no renormalisation
    assert kw["moe_shared_expert_intermediate_size"] == 5632 and kw["moe_shared_expert_gate"] is True
    assert kw["moe_grouped_gemm"] is False  # no grouped kernels on a CPU: SequentialMLP


def test_expert_choice_prefers_grouped_kernels():
    spec = job_spec("qwen1.5", "A2.7B")
    arch = resolve_architecture(spec)
    hopper = Capabilities(cuda=True, torch_grouped_mm=True)
    plan = plan_model(arch, spec, EngineOptions(), hopper)
    assert plan.experts == "torch-grouped"
    assert plan.config_kwargs["moe_grouped_gemm"] and plan.config_kwargs["moe_use_legacy_grouped_gemm"]
    te = Capabilities(cuda=True, transformer_engine=True, torch_grouped_mm=True)
    with_te = job_spec("qwen1.5", "A2.7B", training={"transformerEngine": True})
    assert plan_model(arch, with_te, EngineOptions(), te).experts == "te"
    # Transformer Engine installed but not asked for (the default): the engine's own layers, as measured
    plan = plan_model(arch, spec, EngineOptions(), te)
    assert (plan.attention, plan.experts, plan.use_te) == ("sdpa", "torch-grouped", False)
    # torch's grouped GEMM before the grouped_gemm package (device-side counts); the package where torch has none
    both = Capabilities(cuda=True, torch_grouped_mm=True, grouped_gemm=True)
    assert plan_model(arch, spec, EngineOptions(), both).experts == "torch-grouped"
    assert plan_model(arch, spec, EngineOptions(), Capabilities(cuda=True, grouped_gemm=True)).experts == "grouped-gemm"


def test_cuda_graph_scope_follows_the_dispatch():
    hopper, graphs = Capabilities(cuda=True, torch_grouped_mm=True), EngineOptions(cuda_graphs=True)

    def kw(spec, opts=graphs):
        return plan_model(resolve_architecture(spec), spec, opts, hopper).config_kwargs

    dense = kw(job_spec("qwen2.5", "0.5B"))
    assert dense["cuda_graph_impl"] == "local" and "cuda_graph_scope" not in dense  # whole layers
    assert "cuda_graph_impl" not in kw(job_spec("qwen2.5", "0.5B"), EngineOptions())
    # the spec's knob decides unless the engine options say otherwise
    asked = job_spec("qwen2.5", "0.5B", training={"cudaGraphs": True})
    assert kw(asked, EngineOptions())["cuda_graph_impl"] == "local"
    assert "cuda_graph_impl" not in kw(asked, EngineOptions(cuda_graphs=False))
    assert "cuda_graph_impl" not in kw(job_spec("qwen2.5", "0.5B", training={"cudaGraphs": True},
                                                parallelism={"tensor": 2}), EngineOptions())
    moe = kw(job_spec("qwen1.5", "A2.7B"))
    assert moe["cuda_graph_impl"] == "local" and moe["cuda_graph_scope"] == ["moe_router", "moe_preprocess"]
    whole = kw(job_spec("qwen1.5", "A2.7B"), graphs.replace(graph_moe_experts=True))
    assert whole["cuda_graph_impl"] == "local" and "cuda_graph_scope" not in whole  # whole MoE layers
    # megatron's dispatchers bring token counts to the host inside that scope: no graphs there
    assert "cuda_graph_impl" not in kw(job_spec("qwen1.5", "A2.7B", parallelism={"expert": 2}))
    assert "cuda_graph_impl" not in kw(job_spec("qwen1.5", "A2.7B"), graphs.replace(local_dispatch=False))
    assert "cuda_graph_impl" not in kw(job_spec("qwen1.5", "A2.7B", moe={"capacityFactor": 1.5}))
    # compiled functions stay out of captured layers: q/k norm needs the compiled per-tensor rope
    assert "cuda_graph_impl" not in kw(job_spec("qwen3", "0.6B"))
    assert "cuda_graph_impl" not in kw(job_spec("qwen2.5", "0.5B"), graphs.replace(triton_swiglu=False))


def test_captured_layers_norm_a_copy_of_their_input():
    from megatron.core.transformer import TransformerConfig

    spec = job_spec("qwen2.5", "0.5B", architecture=TINY)
    hopper = Capabilities(cuda=True, torch_grouped_mm=True)
    norms = {}
    for graphs in (False, True):
        plan = plan_model(resolve_architecture(spec), spec, EngineOptions(cuda_graphs=graphs), hopper)
        layer = layer_spec(plan, TransformerConfig(**plan.config_kwargs)).submodules
        norms[graphs] = [(n.params["compiled"], n.params["copy_input"])
                         for n in (layer.input_layernorm, layer.pre_mlp_layernorm)]
    # only the layer's own input can be a reused graph buffer; the pre-MLP norm reads the graph's own tensor
    assert norms == {False: [(True, False), (True, False)], True: [(True, True), (True, False)]}


def test_norm_copy_survives_its_input_being_overwritten():
    """What a captured layer's input buffer suffers when a later graph reuses it: overwritten between forward and
    backward. A norm that keeps its input (fp32 here, so the norm's upcast is the input itself) then computes
    wrong gradients; with copy_input the gradients are those of an undisturbed run."""
    from types import SimpleNamespace

    config = SimpleNamespace(use_cpu_initialization=True, params_dtype=torch.float32, sequence_parallel=False)
    torch.manual_seed(0)
    source, upstream = torch.randn(6, 16), torch.randn(6, 16)

    def grads(copy_input: bool, overwrite: bool) -> torch.Tensor:
        norm = kernels.RMSNorm(config, 16, compiled=False, copy_input=copy_input)
        leaf = source.clone().requires_grad_()
        buffer = leaf * 1.0
        out = norm(buffer)
        if overwrite:
            buffer.data.copy_(torch.randn(6, 16))  # like a graph replay writing into the same memory
        out.backward(upstream)
        return leaf.grad

    clean = grads(False, overwrite=False)
    assert torch.equal(grads(True, overwrite=True), clean)
    assert not torch.allclose(grads(False, overwrite=True), clean)


def test_parallel_and_recompute_mapping():
    spec = job_spec("qwen2.5", "7B", parallelism={"tensor": 2, "pipeline": 2, "virtualPipelineLayers": 7,
                                                  "sequenceParallel": True, "expert": 1},
                    training={"activationCheckpointing": {"mode": "full", "layers": 2}})
    kw = plan_model(resolve_architecture(spec), spec, EngineOptions(), CPU).config_kwargs
    assert kw["tensor_model_parallel_size"] == 2 and kw["pipeline_model_parallel_size"] == 2
    assert kw["virtual_pipeline_model_parallel_size"] == 2 and kw["sequence_parallel"]
    assert (kw["recompute_granularity"], kw["recompute_method"], kw["recompute_num_layers"]) == ("full", "uniform", 2)


@pytest.mark.parametrize(
    "patch, message",
    [
        (dict(training={"precision": "fp8"}), "fp8 needs Transformer Engine"),
        (dict(parallelism={"context": 2}), "context parallelism needs Transformer Engine"),
        (dict(training={"activationCheckpointing": {"mode": "offload"}}), "offload"),
    ],
)
def test_unsupported_without_te_is_one_clear_error(patch, message):
    spec = job_spec("qwen2.5", "0.5B", **patch)
    with pytest.raises(UserError, match=message):
        plan_model(resolve_architecture(spec), spec, EngineOptions(), CPU)


def test_megablocks_needs_cuda_and_package():
    spec = job_spec("qwen3", "A3B", backend="megablocks")
    arch = resolve_architecture(spec)
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        plan_model(arch, spec, EngineOptions(), CPU)
    with pytest.raises(UserError, match="needs the megablocks package"):
        plan_model(arch, spec, EngineOptions(), Capabilities(cuda=True))


def test_megatron_engine_refuses_cpu():
    from qwen_trainer.engines.megatron import MegatronEngine

    with pytest.raises(UserError, match="needs a CUDA GPU"):
        MegatronEngine(job_spec("qwen2.5", "0.5B"), capabilities=CPU)


# ------------------------------------------------------------------------------------------------ numerics


def test_fuse_qkv_groups_heads_per_query_group():
    from types import SimpleNamespace

    from qwen_trainer.convert.rules import KINDS

    heads, groups, d = 4, 2, 3
    q = torch.arange(heads * d).float()[:, None].expand(-1, 2)
    k = 100 + torch.arange(groups * d).float()[:, None].expand(-1, 2)
    v = 200 + torch.arange(groups * d).float()[:, None].expand(-1, 2)
    fused = KINDS["qkv"].fuse(SimpleNamespace(heads=heads, groups=groups, head_dim=d), q, k, v)[:, 0].tolist()
    assert fused[:12] == [0, 1, 2, 3, 4, 5, 100, 101, 102, 200, 201, 202]  # q heads 0-1, k_0, v_0


@pytest.mark.parametrize("fused", [True, False], ids=["fused-chunk", "eager-chunk"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_chunked_cross_entropy_matches_reference(dtype, tol, fused):
    torch.manual_seed(0)
    n, h, vocab = 37, 16, 50
    hidden = torch.randn(n, h, dtype=dtype, requires_grad=True)
    weight = torch.randn(vocab, h, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, vocab, (n,))
    labels[3] = -100
    mask = (torch.rand(n) > 0.2).float()
    out = linear_cross_entropy(hidden, weight, labels, mask, chunk_tokens=8, fused=fused)
    (0.5 * out).backward()
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    ref = reference_cross_entropy(h2, w2, labels, mask)
    (0.5 * ref).backward()
    assert abs(out.item() - ref.item()) <= 1e-5 * abs(ref.item())
    assert torch.allclose(hidden.grad.float(), h2.grad.float(), atol=tol, rtol=tol)
    assert torch.allclose(weight.grad.float(), w2.grad.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-chunk", "eager-chunk"])
def test_output_weight_gradient_goes_into_the_fp32_buffer(fused):
    torch.manual_seed(0)
    n, h, vocab, alpha = 37, 16, 50, 0.125
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(vocab, h, requires_grad=True)
    weight.main_grad = torch.full((vocab, h), 0.5)  # earlier micro-batches' sum is kept
    weight.grad_added_to_main_grad = False
    labels = torch.randint(0, vocab, (n,))
    mask = (torch.rand(n) > 0.2).float()
    out = linear_cross_entropy(hidden, weight, labels, mask, chunk_tokens=8, fused=fused, main_grad_alpha=alpha)
    (alpha * out).backward()  # the schedule's normalisation, as assumed
    check_output_grad_scale()
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    (alpha * reference_cross_entropy(h2, w2, labels, mask)).backward()
    assert torch.allclose(hidden.grad, h2.grad, atol=1e-5, rtol=1e-5)
    assert torch.allclose(weight.main_grad, 0.5 + w2.grad, atol=1e-5, rtol=1e-5)
    assert weight.grad_added_to_main_grad and weight.grad.shape == weight.shape  # DDP's hook will skip its add


def test_output_gradient_scale_other_than_assumed_is_an_error():
    hidden = torch.randn(6, 4, requires_grad=True)
    weight = torch.randn(10, 4, requires_grad=True)
    weight.main_grad = torch.zeros(10, 4)
    out = linear_cross_entropy(hidden, weight, torch.arange(6), torch.ones(6), main_grad_alpha=0.25)
    (0.5 * out).backward()
    with pytest.raises(RuntimeError, match="scaled by 0.25 in the forward, but the backward brought 0.5"):
        check_output_grad_scale()
    check_output_grad_scale()  # reported once, then cleared


def test_output_gradient_scales_are_taken_as_a_tensor_and_verified_after_reading_back():
    assert take_output_grad_scales() == (None, [])
    weight = torch.randn(10, 4, requires_grad=True)
    weight.main_grad = torch.zeros(10, 4)
    for got in (0.25, 0.5):
        hidden = torch.randn(6, 4, requires_grad=True)
        (got * linear_cross_entropy(hidden, weight, torch.arange(6), torch.ones(6), main_grad_alpha=0.25)).backward()
    scales, assumed = take_output_grad_scales()
    assert scales.tolist() == [0.25, 0.5] and assumed == [0.25, 0.25]
    assert take_output_grad_scales() == (None, [])  # taken once
    verify_output_grad_scales([0.25], [0.25])
    with pytest.raises(RuntimeError, match="scaled by 0.25 in the forward, but the backward brought 0.5"):
        verify_output_grad_scales(scales.tolist(), assumed)


def test_output_gradient_into_the_buffer_needs_an_fp32_buffer():
    weight = torch.randn(10, 4, dtype=torch.bfloat16, requires_grad=True)
    for main_grad in (None, torch.zeros(10, 4, dtype=torch.bfloat16)):
        weight.main_grad = main_grad
        with pytest.raises(ValueError, match="fp32 main_grad"):
            linear_cross_entropy(torch.randn(6, 4, dtype=torch.bfloat16), weight, torch.arange(6), torch.ones(6),
                                 main_grad_alpha=1.0)


def test_torch_grouped_mm_matches_per_expert_loop():
    torch.manual_seed(0)
    a = torch.randn(20, 16, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(3, 16, 8, dtype=torch.bfloat16, requires_grad=True)
    sizes = torch.tensor([5, 0, 15])
    out = kernels._TorchGroupedGemmOps.gmm(a, b, sizes)
    out.sum().backward()  # expanded (stride-0) gradient must be accepted
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    ref = torch.cat([a2[:5] @ b2[0], a2[5:5] @ b2[1], a2[5:] @ b2[2]])
    ref.sum().backward()
    assert torch.equal(out, ref) and torch.equal(a.grad, a2.grad) and torch.equal(b.grad, b2.grad)
    bt = b.detach().transpose(1, 2).contiguous()
    assert torch.equal(kernels.grouped_mm(a.detach(), bt, sizes, trans_b=True), ref.detach())


def _megatron_loss(spec_args, monkeypatch, opts=EngineOptions(), caps=CPU, dtype=torch.float32, on_model=None):
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")  # megatron's router moves weights there
    spec = job_spec(*spec_args[:2], training={"seqLength": 64}, **spec_args[2])
    arch = resolve_architecture(spec)
    opts = opts.replace(use_cpu_initialization=True, grad_accum_fusion=False)
    plan = plan_model(arch, spec, opts, caps)
    kw = dict(plan.config_kwargs, recompute_granularity=None, recompute_modules=None)
    if dtype == torch.float32:
        kw.update(bf16=False, params_dtype=dtype, pipeline_dtype=dtype, autocast_dtype=dtype)
    config = TransformerConfig(**kw)
    block = TransformerBlockSubmodules(layer_specs=[layer_spec(plan, config)] * config.num_layers,
                                       layer_norm=kernels.rmsnorm_spec(compiled=False))
    model = make_model_class()(config=config, transformer_layer_spec=block, chunk_tokens=16,
                               chunked_loss=opts.chunked_cross_entropy, **gpt_model_kwargs(plan))
    hf, weights = hf_reference(arch)
    load_into([model], weights, arch, tp_rank=0, tp_size=1, ep_rank=0, ep_size=1, layer_offsets=[0])
    if on_model is not None:
        on_model(model)
    batches = random_micro_batches(2, 2, 64, arch.vocab_size, seed=1, ignore_first=3)
    total, count = 0.0, 0
    with torch.no_grad():
        for mb in batches:
            mask = (mb.targets >= 0).float()
            out = model(mb.tokens, mb.position_ids, None, labels=mb.targets.clamp(min=0), loss_mask=mask)
            total += float(loss_sum_from_output(out, mask))
            count += int(mask.sum())
    return total / count, hf_loss(hf, batches, "cpu")


DENSE_MOE_CASES = {
    "qwen2.5-tied-gqa-bias": ("qwen2.5", "1.5B", dict(architecture=TINY)),
    "qwen2.5-untied": ("qwen2.5", "7B", dict(architecture=dict(TINY, tieWordEmbeddings=False))),
    "qwen3-qk-norm": ("qwen3", "0.6B", dict(architecture=dict(TINY, kvChannels=16))),
    "qwen1.5-moe-shared-gate": ("qwen1.5", "A2.7B", dict(
        architecture=dict(TINY, numQueryGroups=4),
        moe=dict(numExperts=4, topK=2, ffnHiddenSize=32, sharedExpertFfnHiddenSize=64, tokenDispatcher="allgather"))),
    "qwen3-moe-norm-topk": ("qwen3", "A3B", dict(
        architecture=dict(TINY, kvChannels=16),
        moe=dict(numExperts=4, topK=2, ffnHiddenSize=32, normTopkProb=True, tokenDispatcher="allgather"))),
}


@pytest.mark.parametrize("case", sorted(DENSE_MOE_CASES))
def test_forward_matches_hf_on_cpu(case, megatron_world, monkeypatch):
    mine, hf = _megatron_loss(DENSE_MOE_CASES[case], monkeypatch)
    assert abs(mine - hf) < 1e-5, (mine, hf)


def test_forward_matches_hf_with_the_qkv_kernel_interpreted(megatron_world, monkeypatch):
    """The one-kernel QKV split + rope (Triton's CPU interpreter runs it) in the whole model, against HF."""
    pytest.importorskip("triton")
    from megatron.core.transformer.transformer_layer import TransformerLayer

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    used = []

    def watch(model):
        for m in model.modules():
            if isinstance(m, TransformerLayer):
                used.append(type(m.self_attention).__name__)

    mine, hf = _megatron_loss(DENSE_MOE_CASES["qwen2.5-tied-gqa-bias"], monkeypatch, on_model=watch)
    assert used == ["FusedQKVSelfAttention"] * 2
    assert abs(mine - hf) < 1e-5, (mine, hf)


def test_qkv_kernel_is_left_out_where_it_does_not_apply(megatron_world, monkeypatch):
    from megatron.core.transformer.attention import SelfAttention

    seen = {}

    def watch(name):
        def on_model(model):
            seen[name] = {type(m).__name__ for m in model.modules() if isinstance(m, SelfAttention)}
        return on_model

    _megatron_loss(DENSE_MOE_CASES["qwen3-qk-norm"], monkeypatch, on_model=watch("qk-norm"))
    _megatron_loss(DENSE_MOE_CASES["qwen2.5-tied-gqa-bias"], monkeypatch, EngineOptions(fused_qkv_rope=False),
                   on_model=watch("off"))
    assert seen == {"qk-norm": {"SelfAttention"}, "off": {"SelfAttention"}}


def test_chunked_loss_runs_the_output_layer_pre_hooks(megatron_world, monkeypatch):
    """megatron's DDP waits for a parameter's all-gather in the owning module's forward pre-hook; the chunked loss
    reads the untied output weight without calling the module, so it must run those hooks itself."""
    calls = []

    def watch(model):
        model.output_layer.register_forward_pre_hook(lambda module, args: calls.append(module))

    _megatron_loss(DENSE_MOE_CASES["qwen2.5-untied"], monkeypatch, on_model=watch)
    assert len(calls) == 2  # once per micro-batch


def test_stock_norm_and_loss_path_matches_too(megatron_world, monkeypatch):
    opts = EngineOptions(fused_rmsnorm=False, chunked_cross_entropy=False)
    mine, hf = _megatron_loss(DENSE_MOE_CASES["qwen2.5-tied-gqa-bias"], monkeypatch, opts)
    assert abs(mine - hf) < 1e-5, (mine, hf)


def test_grouped_experts_match_sequential_in_bf16(megatron_world, monkeypatch):
    case = DENSE_MOE_CASES["qwen3-moe-norm-topk"]
    restore = kernels.install_torch_grouped_gemm()
    try:
        grouped, _ = _megatron_loss(case, monkeypatch, EngineOptions(experts="torch-grouped"),
                                    Capabilities(torch_grouped_mm=True), dtype=torch.bfloat16)
    finally:
        restore()
    sequential, hf = _megatron_loss(case, monkeypatch, EngineOptions(experts="sequential"), dtype=torch.bfloat16)
    assert abs(grouped - sequential) < 2e-2 and abs(grouped - hf) < 5e-2, (grouped, sequential, hf)


def test_local_dispatch_matches_megatron_dispatcher(megatron_world, monkeypatch):
    """The sync-free dispatcher swapped into every MoE layer gives megatron's dispatcher's loss exactly; with the
    gathered combine (one rounding per token instead of one per atomic add) to bf16's last digits."""
    from qwen_trainer.engines.megatron.dispatch import install_local_dispatch

    case = DENSE_MOE_CASES["qwen1.5-moe-shared-gate"]
    swapped = []

    def swapper(gather):
        return lambda model: swapped.append(install_local_dispatch([model], gather=gather))

    restore = kernels.install_torch_grouped_gemm()
    try:
        opts, caps = EngineOptions(experts="torch-grouped"), Capabilities(torch_grouped_mm=True)
        local, _ = _megatron_loss(case, monkeypatch, opts, caps, dtype=torch.bfloat16, on_model=swapper(False))
        gathered, _ = _megatron_loss(case, monkeypatch, opts, caps, dtype=torch.bfloat16, on_model=swapper(True))
        stock, hf = _megatron_loss(case, monkeypatch, opts, caps, dtype=torch.bfloat16)
    finally:
        restore()
    assert swapped == [(2, [])] * 2
    assert local == stock and abs(local - hf) < 5e-2, (local, stock, hf)
    assert abs(gathered - stock) <= 2e-3 * abs(stock), (gathered, stock)


def test_flash_attention_knob_picks_the_kernels():
    from megatron.core.transformer.enums import AttnBackend

    hopper = Capabilities(cuda=True, torch_grouped_mm=True)
    with_te = Capabilities(cuda=True, torch_grouped_mm=True, transformer_engine=True)

    def plan(flash, caps=hopper):
        training = {"flashAttention": flash, "transformerEngine": caps.transformer_engine}
        spec = job_spec("qwen2.5", "0.5B", architecture=TINY, training=training)
        return plan_model(resolve_architecture(spec), spec, EngineOptions(), caps)

    assert plan(None).options.sdpa_backend == EngineOptions().sdpa_backend == "cudnn"
    assert plan(True).options.sdpa_backend == "flash"
    assert plan(False).options.sdpa_backend == "cudnn"
    assert "attention_backend" not in plan(True).config_kwargs  # SDPA: the backend pin above is the whole choice
    assert plan(True, with_te).config_kwargs["attention_backend"] == AttnBackend.flash
    assert plan(False, with_te).config_kwargs["attention_backend"] == AttnBackend.fused
    assert "attention_backend" not in plan(None, with_te).config_kwargs


@pytest.mark.parametrize("cp", [2, 4])
def test_context_parallel_slice_keeps_chunks_r_and_its_mirror(cp, monkeypatch):
    from megatron.core import parallel_state

    from qwen_trainer.engines.megatron import MegatronEngine

    seq, chunk = 8 * cp, 4
    tokens = torch.arange(2 * seq).view(2, seq)
    hidden = torch.randn(2, seq, 3)
    monkeypatch.setattr(parallel_state, "get_context_parallel_world_size", lambda: cp)
    for rank in range(cp):
        monkeypatch.setattr(parallel_state, "get_context_parallel_rank", lambda: rank)
        t, h = MegatronEngine._slice_for_context_parallel(tokens, hidden)
        mirror = 2 * cp - 1 - rank
        keep = [*range(rank * chunk, (rank + 1) * chunk), *range(mirror * chunk, (mirror + 1) * chunk)]
        assert torch.equal(t, tokens[:, keep]) and torch.equal(h, hidden[:, keep])


# ------------------------------------------------------------------------------------------------ sharded checkpoints

SHARDED_CASES = {
    "qwen2.5-tied-gqa-bias": (EngineOptions(), CPU, torch.float32),
    "qwen3-qk-norm": (EngineOptions(), CPU, torch.float32),
    # the GPU engine's experts (megatron's GroupedMLP on torch's grouped GEMM), which megatron builds in bf16 only
    "qwen1.5-moe-shared-gate": (EngineOptions(experts="torch-grouped"), Capabilities(torch_grouped_mm=True),
                                torch.bfloat16),
    "qwen3-moe-norm-topk": (EngineOptions(experts="sequential"), CPU, torch.float32),
}


@pytest.mark.parametrize("case", sorted(SHARDED_CASES))
def test_sharded_save_reads_back_in_the_converter_and_the_model(case, megatron_world, monkeypatch, tmp_path):
    """What the megatron engine writes at a training checkpoint (its model's sharded state dict through
    dist_checkpointing, every rank its part) is what the export stage's converter reads back as the HF weights,
    and what a fresh model loads back exactly."""
    from qwen_trainer.checkpoint import sharded, store
    from qwen_trainer.checkpoint.layout import write_tracker
    from qwen_trainer.checkpoint.weights import read_weights
    from qwen_trainer.convert.formats.torch_dist import _cpu_only, _in_process_writers
    from qwen_trainer.engines.hf_model import hf_config

    opts, caps, dtype = SHARDED_CASES[case]
    models = []
    restore = kernels.install_torch_grouped_gemm() if opts.experts == "torch-grouped" else (lambda: None)
    try:
        _megatron_loss(DENSE_MOE_CASES[case], monkeypatch, opts, caps, dtype=dtype, on_model=models.append)
        spec = job_spec(*DENSE_MOE_CASES[case][:2], training={"seqLength": 64}, **DENSE_MOE_CASES[case][2])
        arch = resolve_architecture(spec)
        _, reference = hf_reference(arch)
        root = tmp_path / "ckpt"
        folder = root / "iter_0000003"
        folder.mkdir(parents=True)
        md = dict(sharded.SHARDED_STATE_METADATA)
        with _cpu_only(), _in_process_writers():  # the CPU stand-ins for the GPU's staging and writer processes
            sharded.save({"model": models[0].sharded_state_dict(metadata=md)}, folder)
        store.write_model_description(root, hf_config(arch), None)
        write_tracker(root, 3)
        assert sharded.is_sharded(folder)

        exported = read_weights(root, "mcore")  # the spec's per-rank format name: the folder is detected as torch_dist
        assert sorted(exported) == sorted(k for k in reference if not (arch.tie_word_embeddings and k == "lm_head.weight"))
        for name, t in exported.items():
            assert torch.equal(t, reference[name].to(dtype)), name

        _megatron_loss(DENSE_MOE_CASES[case], monkeypatch, opts, caps, dtype=dtype, on_model=models.append)
        fresh = models[1]
        with torch.no_grad():
            for p in fresh.parameters():
                p.zero_()
        state = sharded.load({"model": fresh.sharded_state_dict(metadata=md)}, folder)["model"]
        fresh.load_state_dict(state, strict=True)
        for (name, a), b in zip(models[0].state_dict().items(), fresh.state_dict().values()):
            if isinstance(a, torch.Tensor):
                assert torch.equal(a, b), name
    finally:
        restore()
