"""A Docker daemon to build images and run kind's node containers: the one running, or one we start.

On a fresh Debian machine without Docker this installs Debian's `docker.io` (with containerd, runc,
debootstrap and the CNI plugins the node image also uses) and starts `dockerd` itself; whatever it
starts it stops again. Where root lacks a capability in its bounding set (CAP_SYS_RESOURCE on some VMs),
runc refuses every privileged container, so the daemon gets `runc-shim` as its default runtime.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import KindSetupError

HERE = Path(__file__).resolve().parent
DEBIAN_PACKAGES = ("docker.io", "containerd", "runc", "debootstrap", "containernetworking-plugins", "iptables")
CAP_SYS_RESOURCE = 24
# Measured here (2026-12-06, the trainer-cpu image 5.1 GiB): creating the cluster and loading the images onto the
# two workers took 20.1 GiB at its peak (each worker keeps the unpacked trainer image, and one of them its layer
# blobs too while importing), and building every image from nothing 7.7 GiB of images plus 5.0 GiB of Docker's
# build cache, which only speeds up rebuilds and is dropped when the cluster would not fit beside it. The JobSet and
# Trainer v2 images (make test loads them too) add 0.7 GiB on the workers.
CLUSTER_GIB = 22
IMAGES_GIB = 8
# The Docker CLI that matches Debian's daemon and has BuildKit built in (a newer CLI without the buildx
# plugin cannot build with BuildKit).
DEBIAN_DOCKER_CLI = "/usr/bin/docker"


def log(text: str) -> None:
    print(f"[kind] {text}", flush=True)


def host_lacks_capabilities() -> bool:
    with open("/proc/self/status") as status:
        bounding = next(int(line.split()[1], 16) for line in status if line.startswith("CapBnd:"))
    return not bounding & (1 << CAP_SYS_RESOURCE)


def docker_cli() -> str | None:
    if os.environ.get("QWEN_DOCKER"):
        return os.environ["QWEN_DOCKER"]
    if Path(DEBIAN_DOCKER_CLI).exists():
        return DEBIAN_DOCKER_CLI
    return shutil.which("docker")


def daemon_answers(cli: str) -> bool:
    return subprocess.run([cli, "info"], capture_output=True, timeout=30).returncode == 0


def install_packages() -> None:
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise KindSetupError("no Docker daemon answers, and dockerd/debootstrap can only be installed here as root "
                             "on Debian: start Docker (and install debootstrap), or run as root on Debian")
    log(f"installing Debian packages: {' '.join(DEBIAN_PACKAGES)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *DEBIAN_PACKAGES]):
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
            raise KindSetupError(f"{' '.join(cmd[:2])} failed: {' | '.join(tail)}")


def free_gib(path: Path) -> float:
    path.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(path).free / 2**30


def check_disk(path: Path, need_gib: int) -> None:
    free = free_gib(path)
    if free < need_gib:
        raise KindSetupError(f"only {free:.1f} GiB free under {path}; the images and the kind cluster need about "
                             f"{need_gib} GiB (docker system prune, or free space)")


def make_room(docker: "Docker", path: Path, need_gib: int) -> None:
    """Before the cluster: where it would not fit, Docker's build cache goes first (it only speeds up image
    rebuilds); then the space must be there."""
    if free_gib(path) < need_gib:
        log(f"only {free_gib(path):.1f} GiB free under {path} and the cluster needs about {need_gib} GiB: "
            "removing Docker's build cache")
        docker.run("builder", "prune", "--all", "--force", check=False)
    check_disk(path, need_gib)


@dataclass
class Docker:
    """The daemon in use; `stop()` ends it only if we started it."""

    cli: str
    started: subprocess.Popen | None = None
    log_path: Path | None = None
    env: dict = field(default_factory=dict)

    def run(self, *args: str, check: bool = True, capture: bool = True, stdin=None, timeout: float | None = None,
            env: dict | None = None) -> subprocess.CompletedProcess:
        out = subprocess.run([self.cli, *args], capture_output=capture, text=True, input=stdin, timeout=timeout,
                             env={**os.environ, **self.env, **(env or {})})
        if check and out.returncode != 0:
            detail = (out.stderr or out.stdout or "").strip().splitlines()[-5:] if capture else []
            raise KindSetupError(f"docker {' '.join(args[:3])} failed: {' | '.join(detail)}")
        return out

    def has_image(self, ref: str) -> bool:
        return self.run("image", "inspect", ref, check=False).returncode == 0

    def stop(self) -> None:
        if self.started is None:
            return
        log(f"stopping the dockerd we started (pid {self.started.pid})")
        self.started.terminate()
        try:
            self.started.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.started.kill()
            self.started.wait()
        self.started = None


def write_daemon_config(cache: Path) -> Path | None:
    """dockerd's config: the capability shim as default runtime where it is needed. Kept in our cache,
    passed with --config-file, so the machine's /etc/docker stays untouched."""
    if not host_lacks_capabilities():
        return None
    shim = cache / "runc-shim"
    shutil.copy2(HERE / "runc-shim", shim)
    shim.chmod(0o755)
    config = cache / "daemon.json"
    config.write_text(json.dumps({"runtimes": {"qwen-runc": {"path": str(shim)}}, "default-runtime": "qwen-runc"}))
    return config


def stop_daemon_we_started(cache: Path) -> None:
    """Stop the dockerd an earlier `up` started and left running (its pid file is in our cache; a daemon started
    any other way has none there), as the tests' own fixture stops the one it started."""
    pidfile = cache / "dockerd.pid"
    try:
        pid = int(pidfile.read_text().strip())
        if Path(f"/proc/{pid}/comm").read_text().strip() != "dockerd":
            return
    except (OSError, ValueError):
        return
    log(f"stopping the dockerd an earlier `up` started (pid {pid})")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    if Path(f"/proc/{pid}").exists():
        os.kill(pid, signal.SIGKILL)


def ensure_docker(cache: Path) -> Docker:
    """A reachable Docker daemon. Reuses a running one (whose runtime must then already cope with this
    host's capabilities); otherwise installs Debian's packages if needed and starts dockerd."""
    cache.mkdir(parents=True, exist_ok=True)
    cli = docker_cli()
    if cli and daemon_answers(cli):
        log("using the Docker daemon already running")
        return Docker(cli)
    if not (shutil.which("dockerd") and shutil.which("debootstrap") and Path(DEBIAN_DOCKER_CLI).exists()):
        install_packages()
        cli = docker_cli()
    if os.geteuid() != 0:
        raise KindSetupError("no Docker daemon is running and starting one needs root")
    config = write_daemon_config(cache)
    log_path = cache / "dockerd.log"
    cmd = ["dockerd", "--pidfile", str(cache / "dockerd.pid")]
    if config:
        cmd += ["--config-file", str(config)]
        log("this host cannot grant CAP_SYS_RESOURCE: dockerd runs containers through tools/qwen_kind/runc-shim")
    proc = subprocess.Popen(cmd, stdout=log_path.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text().strip().splitlines()[-3:]
            raise KindSetupError(f"dockerd exited with code {proc.returncode}: {' | '.join(tail)} (log: {log_path})")
        if daemon_answers(cli):
            log(f"started dockerd (pid {proc.pid}; log {log_path})")
            return Docker(cli, started=proc, log_path=log_path)
        time.sleep(0.5)
    proc.terminate()
    raise KindSetupError(f"dockerd did not answer within 60 s (log: {log_path})")
