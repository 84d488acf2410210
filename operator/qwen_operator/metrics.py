"""Prometheus metrics and the readiness endpoint, served by one small aiohttp server in the operator's loop.

GET /metrics  Prometheus text format.
GET /readyz   200 once the startup hook has run and the operator is watching (not paused by peering in favour
              of another replica); 503 otherwise. kopf's own --liveness endpoint serves /healthz.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from typing import Iterator, Optional

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

REGISTRY = CollectorRegistry(auto_describe=True)

RECONCILES = Counter("qwen_operator_reconciles_total", "Handler invocations by handler and result.",
                     ["handler", "result"], registry=REGISTRY)
ERRORS = Counter("qwen_operator_reconcile_errors_total", "Handler invocations that raised, by handler.",
                 ["handler"], registry=REGISTRY)
LATENCY = Histogram("qwen_operator_reconcile_duration_seconds", "Time spent in a handler.", ["handler"],
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=REGISTRY)
JOBS = Gauge("qwen_operator_jobs", "QwenTrainingJobs seen by this operator, by phase.", ["phase"], registry=REGISTRY)
CHILDREN_CREATED = Counter("qwen_operator_children_created_total", "Child objects created, by kind.", ["kind"],
                           registry=REGISTRY)
PHASES = ("Pending", "Created", "Running", "Restarting", "Suspended", "Succeeded", "Failed", "Invalid")


@contextmanager
def observe(handler: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    except Exception:
        ERRORS.labels(handler).inc()
        RECONCILES.labels(handler, "error").inc()
        raise
    else:
        RECONCILES.labels(handler, "ok").inc()
    finally:
        LATENCY.labels(handler).observe(time.perf_counter() - start)


class PhaseTracker:
    """Phase of every job the operator has seen, for the jobs-by-phase gauge (counts kept incrementally: a burst
    of N jobs costs O(N) updates, not O(N) per event)."""

    def __init__(self) -> None:
        self._phases: dict[tuple[str, str], str] = {}
        self._counts: dict[str, int] = dict.fromkeys(PHASES, 0)
        self._lock = threading.Lock()
        for phase in PHASES:
            JOBS.labels(phase).set(0)

    def set(self, namespace: str, name: str, phase: Optional[str]) -> None:
        phase = phase or "Pending"
        with self._lock:
            old = self._phases.get((namespace, name))
            if old == phase:
                return
            self._phases[(namespace, name)] = phase
            self._move(old, phase)

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            old = self._phases.pop((namespace, name), None)
            if old is not None:
                self._move(old, None)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def _move(self, old: Optional[str], new: Optional[str]) -> None:
        for phase, delta in ((old, -1), (new, 1)):
            if phase is not None:
                self._counts[phase] = self._counts.get(phase, 0) + delta
                JOBS.labels(phase).set(self._counts[phase])


class Readiness:
    """Started (startup hook done) and not paused by kopf peering.

    kopf does not expose its pause toggle, so this follows the peering engine's log records: it logs
    "Pausing operations ..." when a higher- or equal-priority peer is alive and "Resuming operations ..." when it
    is gone. With mandatory peering it starts paused (and logs only the resume)."""

    def __init__(self) -> None:
        self.started = False
        self.paused = False

    @property
    def ready(self) -> bool:
        return self.started and not self.paused

    def attach(self) -> None:
        tracker = self

        class _Handler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                msg = record.getMessage()
                if msg.startswith("Pausing "):
                    tracker.paused = True
                elif msg.startswith("Resuming operations"):
                    tracker.paused = False

        logging.getLogger("kopf._core.engines.peering").addHandler(_Handler(level=logging.INFO))


async def start_server(host: str, port: int, readiness: Readiness) -> web.AppRunner:
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def readyz(_: web.Request) -> web.Response:
        if readiness.ready:
            return web.json_response({"ready": True})
        return web.json_response({"ready": False, "started": readiness.started, "paused": readiness.paused},
                                 status=503)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
