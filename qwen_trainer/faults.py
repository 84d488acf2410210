"""Fault injection for tests: make a process die at a named point, to prove crashes lose nothing.

QWEN_TRAINER_FAULT="<point>@<iteration>[:<rank>]" (comma-separated for several). Points: save_writing (a
sharded save: this rank's shard files written, or with an async save staged and being written by its background
writers, while other ranks may still be writing; nothing committed), save_before_rename (checkpoint files written,
folder not yet renamed), save_before_tracker (folder renamed, tracker not yet moved),
after_save (checkpoint complete), step (before the optimiser step of that iteration). The process kills itself
with SIGKILL, like the OOM killer or a node loss would; rank defaults to 0.
"""

from __future__ import annotations

import os
import signal
import sys

ENV = "QWEN_TRAINER_FAULT"


def _parse(raw: str) -> list[tuple[str, int, int]]:
    out = []
    for part in filter(None, (p.strip() for p in raw.split(","))):
        point, _, rest = part.partition("@")
        it, _, rank = rest.partition(":")
        out.append((point, int(it), int(rank or 0)))
    return out


def hit(point: str, iteration: int, rank: int) -> None:
    raw = os.environ.get(ENV)
    if not raw:
        return
    for p, it, r in _parse(raw):
        if p == point and it == iteration and r == rank:
            print(f"[fault injection] {point} at iteration {iteration} on rank {rank}: SIGKILL", file=sys.stderr,
                  flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
