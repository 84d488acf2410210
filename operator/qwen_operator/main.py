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


def configure_logging(cfg: OperatorConfig) -> None:
    fmt = {"json": kopf.LogFormat.JSON, "plain": kopf.LogFormat.PLAIN, "full": kopf.LogFormat.FULL}[cfg.log_format]
    kopf.configure(debug=cfg.debug, verbose=cfg.verbose, log_format=fmt, log_refkey="object")
    # Our own records go through the same (JSON) handler as kopf's.
    logging.getLogger("qwen_operator").setLevel(logging.DEBUG if cfg.debug else logging.INFO)


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
