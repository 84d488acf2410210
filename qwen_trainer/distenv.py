"""The distributed environment a trainer process runs in.

Read from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT). A pod
started by the Kubeflow training-operator also carries PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK,
PET_MASTER_ADDR and PET_MASTER_PORT, which torchrun turns into its own arguments; they are consulted only to
explain a process that was started without torchrun although the job expects several per pod.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Mapping, Optional

from qwen_trainer.errors import UserError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: Optional[str]
    master_port: Optional[int]
    under_torchrun: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _int(env: Mapping[str, str], name: str, default: Optional[int] = None) -> Optional[int]:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"environment variable {name}={raw!r} is not an integer") from None


def read_env(env: Optional[Mapping[str, str]] = None) -> DistEnv:
    env = os.environ if env is None else env
    under_torchrun = "TORCHELASTIC_RUN_ID" in env or "LOCAL_RANK" in env
    world = _int(env, "WORLD_SIZE", 1)
    rank = _int(env, "RANK", 0)
    local_rank = _int(env, "LOCAL_RANK", 0)
    local_world = _int(env, "LOCAL_WORLD_SIZE", 1 if not under_torchrun else world)
    if not under_torchrun:
        nproc = env.get("PET_NPROC_PER_NODE")
        if nproc not in (None, "", "1", "auto", "cpu", "gpu"):
            raise UserError(
                f"this pod expects PET_NPROC_PER_NODE={nproc} processes but the trainer was started without torchrun; "
                "start it as `torchrun -m qwen_trainer run --spec FILE`"
            )
    if world < 1:
        raise UserError(f"WORLD_SIZE={world} must be at least 1")
    if not 0 <= rank < world:
        raise UserError(f"RANK={rank} is outside WORLD_SIZE={world}")
    addr = env.get("MASTER_ADDR") or env.get("PET_MASTER_ADDR")
    port = _int(env, "MASTER_PORT", None) or _int(env, "PET_MASTER_PORT", None)
    return DistEnv(rank, world, local_rank, local_world, addr, port, under_torchrun)


TIMEOUT_ENV = "QWEN_DIST_TIMEOUT_SECONDS"


def init_process_group(dist_env: DistEnv, backend: str, timeout_s: Optional[float] = None) -> None:
    """Join the process group (env:// rendezvous). A world of one still gets a group, so collectives work.
    The collective timeout comes from QWEN_DIST_TIMEOUT_SECONDS (the operator sets it), default 600 s."""
    import torch.distributed as dist

    if timeout_s is None:
        timeout_s = float(_int(os.environ, TIMEOUT_ENV, 600))
    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", dist_env.master_addr or "127.0.0.1")
    if dist_env.master_port is not None:
        os.environ.setdefault("MASTER_PORT", str(dist_env.master_port))
    elif not dist_env.distributed:
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    else:
        raise UserError("MASTER_PORT is not set for a multi-process run")
    os.environ.setdefault("RANK", str(dist_env.rank))
    os.environ.setdefault("WORLD_SIZE", str(dist_env.world_size))
    dist.init_process_group(backend=backend, init_method="env://", rank=dist_env.rank,
                            world_size=dist_env.world_size, timeout=datetime.timedelta(seconds=timeout_s))


def destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
