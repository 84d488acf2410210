"""`qwen-operator`: start the kopf operator with the handlers in `qwen_operator.handlers`.

    qwen-operator -n team-a -n team-b --peering qwen-operator --metrics-port 9090
    python -m qwen_operator.main --all-namespaces --standalone

Flags and QWEN_OPERATOR_* environment variables are listed in `qwen_operator.config`.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from typing import Optional, Sequence

import kopf

from .config import OperatorConfig, from_args

M_ARENA_MAX = -8  # glibc's mallopt parameter number


class _QuietWatchHandlers(logging.Filter):
    """Drop kopf's per-event "Handler 'x' succeeded." lines of the watch handlers (one per child status change:
    at hundreds of jobs they are most of the log volume and a measurable share of the CPU)."""

    QUIET = ("Handler 'pytorchjob_event' succeeded.", "Handler 'trainjob_event' succeeded.",
             "Handler 'job_event' succeeded.", "Handler 'workload_event' succeeded.")

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


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas before the handler threads start. By default every thread that allocates may
    get an arena of its own (up to 8 per core), and the JSON bodies of a burst, decoded in the worker threads,
    leave each of them partly used and fragmented. Returns whether the setting was applied (not on non-glibc platforms)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False


def run(cfg: OperatorConfig) -> None:
    limit_malloc_arenas()
    # The handlers module registers the child watch of the environment's job API when imported: name the chosen one.
    os.environ["QWEN_OPERATOR_JOB_API"] = cfg.job_api
    from . import handlers

    handlers.CONFIG = cfg
    handlers.watch_children(cfg.job_api)
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
