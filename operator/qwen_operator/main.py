"""`qwen-operator`: start the kopf operator with the handlers in `qwen_operator.handlers`.

    qwen-operator -n team-a -n team-b --peering qwen-operator --metrics-port 9090
    python -m qwen_operator.main --all-namespaces --standalone

Flags and QWEN_OPERATOR_* environment variables are listed in `qwen_operator.config`.
"""

from __future__ import annotations

import logging
import sys
from typing import Optional, Sequence

import kopf

from . import handlers
from .config import OperatorConfig, from_args


class _QuietWatchHandlers(logging.Filter):
    """Drop kopf's per-event "Handler 'x' succeeded." lines of the watch handlers (one per child status change:
    at hundreds of jobs they are most of the log volume and a measurable share of the CPU)."""

    QUIET = ("Handler 'pytorchjob_event' succeeded.", "Handler 'job_event' succeeded.")

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or record.getMessage() not in self.QUIET


def configure_logging(cfg: OperatorConfig) -> None:
    fmt = {"json": kopf.LogFormat.JSON, "plain": kopf.LogFormat.PLAIN, "full": kopf.LogFormat.FULL}[cfg.log_format]
    kopf.configure(debug=cfg.debug, verbose=cfg.verbose, log_format=fmt, log_refkey="object")
    # Our own records go through the same (JSON) handler as kopf's.
    logging.getLogger("qwen_operator").setLevel(logging.DEBUG if cfg.debug else logging.INFO)
    if not cfg.debug:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_QuietWatchHandlers())


def run(cfg: OperatorConfig) -> None:
    handlers.CONFIG = cfg
    configure_logging(cfg)
    kopf.run(
        clusterwide=cfg.clusterwide,
        namespaces=cfg.namespaces,
        liveness_endpoint=cfg.liveness,
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    cfg = from_args(argv)
    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
