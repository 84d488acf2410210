"""Operator flags, environment and pinned kopf settings."""

from __future__ import annotations

import logging
import sys

import kopf

from qwen_operator.config import OperatorConfig, from_args
from qwen_operator.handlers import apply_settings


def test_defaults_watch_all_namespaces():
    cfg = from_args([], env={})
    assert cfg.clusterwide and cfg.namespaces == []
    assert cfg.metrics_port == 9090 and cfg.liveness.endswith("/healthz")
    assert cfg.log_format == "json"


def test_namespaces_from_flags_and_env():
    assert from_args(["-n", "a", "--namespace", "b,c"], env={}).namespaces == ["a", "b", "c"]
    assert from_args([], env={"QWEN_OPERATOR_NAMESPACES": "x, y"}).namespaces == ["x", "y"]
    assert from_args([], env={"QWEN_OPERATOR_NAMESPACES": "*"}).clusterwide
    assert from_args(["-A"], env={"QWEN_OPERATOR_NAMESPACES": "x"}).clusterwide  # flags win


def test_peering_flags():
    cfg = from_args(["--peering", "qwen", "--priority", "7"], env={})
    assert cfg.peering == "qwen" and not cfg.standalone and cfg.effective_priority() == 7
    assert from_args(["--standalone"], env={"QWEN_OPERATOR_PEERING": "qwen"}).standalone
    random_prio = OperatorConfig(peering="p").effective_priority()
    assert 1 <= random_prio < 2**31


def test_pinned_kopf_settings():
    settings = kopf.OperatorSettings()
    apply_settings(settings, OperatorConfig(namespaces=["a"], peering="qwen", priority=5, workers=7))
    assert settings.posting.level == logging.WARNING
    assert isinstance(settings.persistence.progress_storage, kopf.AnnotationsProgressStorage)
    assert isinstance(settings.persistence.diffbase_storage, kopf.AnnotationsDiffBaseStorage)
    assert settings.persistence.finalizer.startswith("training.qwen.dev/")
    assert settings.execution.max_workers == 7
    assert settings.scanning.disabled is True  # exact namespace names need no namespace scanning
    assert settings.peering.name == "qwen" and settings.peering.mandatory and settings.peering.priority == 5
    assert settings.watching.inactivity_timeout and settings.watching.client_timeout
    # long enough for a lagging watch under a burst: otherwise the create handler runs twice on a stale body
    assert settings.persistence.consistency_timeout >= 30


def test_no_handler_needs_a_finalizer():
    import qwen_operator.handlers  # noqa: F401  (registers the handlers)

    registry = kopf.get_default_registry()
    for handler in registry._changing.get_all_handlers():
        assert not handler.requires_finalizer, handler.id
    assert not registry._spawning.get_all_handlers()  # no daemons or timers (they would add finalizers)


def test_package_is_not_importable_as_operator():
    import operator

    assert operator.__file__ is None or "qwen_operator" not in operator.__file__
    assert hasattr(operator, "itemgetter")
    assert "qwen_operator" in sys.modules or True
