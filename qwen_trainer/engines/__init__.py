"""Training engines: `megatron` (megatron-core on CUDA) and `cpu` (transformers + gloo).

`select_engine` picks one from QWEN_TRAINER_ENGINE (auto | cpu | megatron; default auto): auto chooses the
megatron engine when CUDA and megatron-core are present, else the CPU engine, and says why. The training loop
drives an engine through `qwen_trainer.engines.base.Engine`; the megatron module joins the loop through
`create_engine(spec) -> Engine` (qwen_trainer.engines.megatron.engine).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Callable

from qwen_trainer.errors import UserError
from qwen_trainer.spec import JobSpec

from .base import Engine, EngineContext, StepResult

ENGINE_ENV = "QWEN_TRAINER_ENGINE"


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def _megatron_engine_installed() -> bool:
    try:
        return (importlib.util.find_spec("qwen_trainer.engines.megatron") is not None
                and importlib.util.find_spec("megatron.core") is not None)
    except (ImportError, ValueError):
        return False


def _megatron_engine(spec: JobSpec) -> Engine:
    from . import megatron

    factory = getattr(megatron, "create_engine", None)
    if factory is None:
        raise UserError("the megatron engine does not implement the training-loop interface "
                        f"(qwen_trainer.engines.base.Engine) yet; set {ENGINE_ENV}=cpu to train with the CPU engine")
    return factory(spec)


def select_engine(spec: JobSpec, log: Callable[[str], None]) -> Engine:
    choice = os.environ.get(ENGINE_ENV, "auto").strip().lower() or "auto"
    if choice not in ("auto", "cpu", "megatron"):
        raise UserError(f"{ENGINE_ENV}={choice!r}: use auto, cpu or megatron")
    backend = spec.model.backend
    if choice == "megatron" or (choice == "auto" and _cuda() and _megatron_engine_installed()):
        if not _cuda():
            raise UserError(f"{ENGINE_ENV}=megatron needs CUDA, and no GPU is visible")
        if not _megatron_engine_installed():
            raise UserError("the megatron engine needs the megatron-core package, which is not installed; "
                            f"set {ENGINE_ENV}=cpu to train on CPU")
        return _megatron_engine(spec)
    from .cpu import CpuEngine

    if choice == "auto":
        why = "no CUDA device" if not _cuda() else "megatron-core is not installed"
        log(f"engine=cpu ({why}); backend {backend} sets the checkpoint layout, training runs on CPU in fp32")
    return CpuEngine()


__all__ = ["Engine", "EngineContext", "StepResult", "select_engine", "ENGINE_ENV"]
