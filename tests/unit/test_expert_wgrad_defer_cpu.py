"""EngineOptions.defer_expert_wgrad in the engine, in real processes (torchrun, gloo, CPU, bf16): torch's grouped
GEMM experts whose weight gradients wait for the step's last micro-batch train like the per-micro-batch path on one
process (4 micro-batches a step), under data parallelism with the gradient reduction overlapped with the backward
(the flush must land before DDP's hook starts the reduction), with the distributed optimizer, under expert
parallelism with megatron's all-to-all dispatcher, and under pipeline parallelism (megatron's 1F1B schedule): the first step's gradients (Adam's first moment after it,
gathered over ranks) agree to bf16's precision for every weight, the losses of the following steps within 1e-3
relative; and the switch reached every expert weight. With expert_grad_overwrite the step's first product is
written into the never-zeroed buffer ranges: bit for bit what adding it into zeros gives."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("megatron.core")

from tests.unit.test_megatron_resume_cpu import trained_losses  # noqa: E402

STEPS = 3
LAYOUTS = {"one-process": (1, []), "dp2": (2, []), "ep2-alltoall": (2, ["ep=2", "dispatcher=alltoall"]),
           "dp2-distributed-optimizer": (2, ["dopt=1"]),
           # megatron's pipeline schedule raises the last-micro-batch flag itself (one MoE layer a stage)
           "pp2": (2, ["pp=2"])}


def _train(tmp_path, procs: int, keys: list[str], defer: bool, overwrite: bool = True):
    name = f"defer-{int(defer)}-{int(overwrite)}"
    opts = {"experts": "torch-grouped", "defer_expert_wgrad": defer, "expert_grad_overwrite": overwrite}
    losses, built = trained_losses(tmp_path, name, procs, STEPS, *keys, "save_at=1", f"opts={json.dumps(opts)}")
    first_moment = torch.load(tmp_path / name / "save-1.pt")["state"]["exp_avg"]
    return losses, built, first_moment


@pytest.fixture(scope="module")
def per_micro_batch(tmp_path_factory):
    """The per-micro-batch runs both tests compare against, trained once a layout."""
    runs = {}

    def get(layout: str):
        if layout not in runs:
            procs, keys = LAYOUTS[layout]
            runs[layout] = _train(tmp_path_factory.mktemp(f"plain-{layout}"), procs, keys, defer=False)
        return runs[layout]

    return get


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_deferred_expert_weight_gradients_train_like_per_micro_batch_ones(tmp_path, layout, per_micro_batch):
    procs, keys = LAYOUTS[layout]
    plain, plain_built, plain_moment = per_micro_batch(layout)
    deferred, deferred_built, deferred_moment = _train(tmp_path, procs, keys, defer=True)
    assert plain_built["deferring"] == []
    # both grouped weights of both MoE layers (of rank 0's one layer under pipeline parallelism)
    layers = 1 if "pp=2" in keys else 2
    assert len(deferred_built["deferring"]) == 2 * layers
    assert all("experts.weight" in n for n in deferred_built["deferring"])
    assert sorted(deferred_moment) == sorted(plain_moment)
    experts = [k for k in plain_moment if ".experts." in k]
    assert experts
    for key in plain_moment:
        a, b = deferred_moment[key], plain_moment[key]
        assert b.abs().max() > 0, key
        assert float((a - b).norm() / b.norm()) < 1e-2, (key, float((a - b).norm() / b.norm()))
    assert len(deferred) == len(plain) == STEPS
    for a, b in zip(deferred, plain):
        assert abs(a - b) <= 1e-3 * abs(b), (deferred, plain)
    added, added_built, added_moment = _train(tmp_path, procs, keys, defer=True, overwrite=False)
    assert added_built["overwriting"] == [] and deferred_built["overwriting"] == deferred_built["deferring"]
    assert added == deferred
    for key, b in added_moment.items():
        assert torch.equal(deferred_moment[key], b), key


@pytest.mark.parametrize("layout", ["one-process", "ep2-alltoall", "dp2-distributed-optimizer"])
def test_the_kernel_route_sums_kept_micro_batches_like_the_grouped_gemm(tmp_path, layout, per_micro_batch):
    # expert_wgrad_into_buffer with the deferral: every kept micro-batch summed in fp32 into the buffer (on CPU
    # tensors the kernel's torch form), the first product of a step written; against the per-micro-batch path
    procs, keys = LAYOUTS[layout]
    plain, _, plain_moment = per_micro_batch(layout)
    opts = {"experts": "torch-grouped", "defer_expert_wgrad": True, "expert_wgrad_into_buffer": True}
    fused, built = trained_losses(tmp_path, "kernel", procs, STEPS, *keys, "save_at=1", f"opts={json.dumps(opts)}")
    fused_moment = torch.load(tmp_path / "kernel" / "save-1.pt")["state"]["exp_avg"]
    # both grouped weights of both MoE layers
    experts = [n for n in built["into_main_grad"] if ".experts." in n]
    assert experts == built["kernel"] == built["deferring"] == built["overwriting"] and len(experts) == 4
    for key, b in plain_moment.items():
        a = fused_moment[key]
        assert float((a - b).norm() / b.norm()) < 1e-2, (key, float((a - b).norm() / b.norm()))
    for a, b in zip(fused, plain):
        assert abs(a - b) <= 1e-3 * abs(b), (fused, plain)
