"""The engine's megatron-core patches: each installer replaces only registered attributes that exist in the
installed megatron-core, and its restore puts every original back."""

from __future__ import annotations

import importlib

import pytest

pytest.importorskip("megatron.core")

from qwen_trainer.checkpoint import staging  # noqa: E402
from qwen_trainer.engines.megatron import kernels, patches, triton_kernels  # noqa: E402


def _snapshot():
    out = {}
    for module_name, attr in patches.PATCHED:
        module = importlib.import_module(module_name)
        out[(module_name, attr)] = getattr(module, attr, "<absent>")
    return out


@pytest.mark.parametrize("install", [kernels.install_torch_grouped_gemm, kernels.install_grad_accum_fusion,
                                     kernels.install_foreach_grad_ops, triton_kernels.install_swiglu,
                                     staging.install],
                         ids=lambda f: f.__name__)
def test_installer_changes_registered_attributes_and_restores_them(install):
    before = _snapshot()
    restore = install()
    during = _snapshot()
    changed = {k for k in before if before[k] is not during[k]}
    restore()
    assert _snapshot() == before
    if install is kernels.install_foreach_grad_ops and not changed:
        pytest.skip("Apex or Transformer Engine kernels are installed: megatron's own are kept")
    assert changed, f"{install.__name__} changed nothing megatron-core looks up"


def test_unregistered_or_missing_attributes_are_refused():
    with pytest.raises(patches.PatchError, match="not a registered"):
        patches.replace("megatron.core.transformer.mlp", {"MLP": object})
    mlp = importlib.import_module("megatron.core.transformer.mlp")
    saved = mlp.bias_swiglu_impl
    del mlp.bias_swiglu_impl
    try:
        with pytest.raises(patches.PatchError, match="does not exist in megatron-core"):
            patches.replace("megatron.core.transformer.mlp", {"bias_swiglu_impl": object})
    finally:
        mlp.bias_swiglu_impl = saved


def test_installed_megatron_core_is_the_pinned_one():
    pins = open(importlib.import_module("pathlib").Path(__file__).parents[2] / "pyproject.toml").read()
    assert f'"megatron-core=={patches.PINNED_MEGATRON_CORE}"' in pins
    assert patches.installed_version() == patches.PINNED_MEGATRON_CORE and patches.version_note() is None


@pytest.mark.parametrize("cls,name", sorted(patches.INSTANCE_ATTRIBUTES))
def test_registered_instance_attributes_are_set_by_the_pinned_megatron_classes(cls, name):
    import inspect
    import re

    from megatron.core.distributed import distributed_data_parallel, param_and_grad_buffer
    from megatron.core.optimizer import distrib_optimizer, optimizer

    klass = next(getattr(m, cls) for m in (distributed_data_parallel, param_and_grad_buffer, optimizer,
                                           distrib_optimizer)
                 if hasattr(m, cls))
    source = "".join(inspect.getsource(k) for k in klass.__mro__ if k.__module__.startswith("megatron."))
    assigned = re.search(rf"self\.{name}\b[\w\s,.)]*=(?!=)", source)  # also within a (parenthesised) tuple assignment
    assert callable(getattr(klass, name, None)) or assigned, f"{cls}.{name}"


def test_require_refuses_a_missing_or_unregistered_attribute():
    class _ParamAndGradBuffer:  # named as megatron's class, lacking what the overwrite reads
        grad_data = None

    buffer = _ParamAndGradBuffer()
    patches.require(buffer, ("grad_data",))
    with pytest.raises(patches.PatchError, match="_ParamAndGradBuffer.reset does not exist.*expert_grad_overwrite"):
        patches.require(buffer, ("reset",))
    with pytest.raises(patches.PatchError, match="not a registered"):
        patches.require(buffer, ("numel",))
