"""Every image the kind cluster runs, built on this machine (no registry is reachable here).

- `qwen-k8s.local/debian:bookworm`: `debootstrap --variant=minbase` imported into Docker;
- `qwen-k8s.local/python:3.11-bookworm`: that plus Debian's Python in a venv (stands in for python:3.11-slim);
- the Kubernetes components kubeadm runs (kube-apiserver, -controller-manager, -scheduler, kube-proxy, etcd,
  CoreDNS, pause) and the training-operator (and, when asked, the JobSet and Kubeflow Trainer v2
  controllers), from the binaries tools/build-controlplane.sh builds from Go modules; all under the local
  name `qwen-k8s.local/...` (kubeadm's imageRepository points there), never under an upstream registry's name;
- the kind node image (`node/Dockerfile`), with those component images preloaded;
- the project's own images through docker/Makefile (`make images`), with the local Python base.

Each build is skipped when its tag (which carries a digest of its inputs) already exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .docker import Docker, log
from .errors import KindSetupError

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
REPO = "qwen-k8s.local"
BASE = f"{REPO}/debian:bookworm"
PYTHON_BASE = f"{REPO}/python:3.11-bookworm"
DNS_WAIT = f"{REPO}/dns-wait:bookworm"
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
LOCAL_LABEL = "dev.qwen.k8s.local-build=1"


NONROOT_UID = "65532"


@dataclass(frozen=True)
class Component:
    """One Kubernetes component image: the binary, where it goes, the Debian packages it needs."""

    name: str
    binary: str
    tag: str
    target: str = ""
    packages: str = ""
    user: str = "0"  # UID the image runs as; a Deployment with runAsNonRoot refuses an image that runs as root


def versions(bin_dir: Path) -> dict[str, str]:
    """The pinned versions tools/build-controlplane.sh wrote next to the binaries."""
    env = bin_dir.parent / "versions.env"
    if not env.exists():
        raise KindSetupError(f"{env} is missing: run tools/build-controlplane.sh --with-kind first")
    return dict(line.split("=", 1) for line in env.read_text().splitlines() if "=" in line)


def components(v: dict[str, str]) -> list[Component]:
    k8s = v["K8S_VERSION"]
    return [
        Component("kube-apiserver", "kube-apiserver", k8s),
        Component("kube-controller-manager", "kube-controller-manager", k8s),
        Component("kube-scheduler", "kube-scheduler", k8s),
        # nftables mode (tools/qwen_kind/cluster.py): knftables runs `nft`; conntrack clears UDP entries.
        Component("kube-proxy", "kube-proxy", k8s, packages="nftables conntrack iptables"),
        # kubeadm's etcd image tag carries an image revision ("-0") after etcd's own version.
        Component("etcd", "etcd", f"{v['ETCD_VERSION'].lstrip('v')}-0"),
        Component("coredns", "coredns", v["COREDNS_VERSION"]),
        Component("training-operator", "training-operator.v1", v["TRAINING_OPERATOR_VERSION"], target="/manager"),
    ]


def digest(*parts: bytes | str | Path) -> str:
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            h.update(part.read_bytes())
        else:
            h.update(part.encode() if isinstance(part, str) else part)
    return h.hexdigest()[:12]


def build(docker: Docker, dockerfile: Path, context: Path, tag: str, args: dict[str, str] | None = None,
          secrets: bool = False) -> None:
    cmd = ["build", "-f", str(dockerfile), "-t", tag, "--label", LOCAL_LABEL]
    for key, value in (args or {}).items():
        cmd += ["--build-arg", f"{key}={value}"]
    if secrets and HOST_CA.exists():
        cmd += ["--secret", f"id=ca,src={HOST_CA}"]
    out = docker.run(*cmd, str(context), check=False, env={"DOCKER_BUILDKIT": "1"})
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-8:]
        raise KindSetupError(f"building {tag} failed:\n  " + "\n  ".join(tail))


def base_image(docker: Docker, cache: Path) -> str:
    if docker.has_image(BASE):
        return BASE
    if not shutil.which("debootstrap"):
        raise KindSetupError("debootstrap is not installed (apt-get install debootstrap)")
    log("making the Debian base image with debootstrap (about a minute)")
    work = Path(tempfile.mkdtemp(prefix="rootfs.", dir=cache))
    try:
        out = subprocess.run(["debootstrap", "--variant=minbase", "--include=ca-certificates", "bookworm",
                              str(work / "rootfs"), os.environ.get("QWEN_DEBIAN_MIRROR", "http://deb.debian.org/debian")],
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise KindSetupError(f"debootstrap failed: {out.stdout.strip().splitlines()[-1:]} (see debootstrap's log "
                                 f"in {work}/rootfs/debootstrap)")
        rootfs = work / "rootfs"
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for item in (rootfs / leftover).glob("*"):
                if item.is_file():
                    item.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run([docker.cli, "import", "--change", "ENV LANG=C.UTF-8", "--change", 'CMD ["bash"]',
                                   "-", BASE], stdin=tar.stdout, capture_output=True, text=True)
        tar.wait()
        if imported.returncode != 0:
            raise KindSetupError(f"docker import of the Debian base failed: {imported.stderr.strip()}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return BASE


def python_base(docker: Docker) -> str:
    if not docker.has_image(PYTHON_BASE):
        log(f"building {PYTHON_BASE}")
        build(docker, HERE / "images" / "python.Dockerfile", HERE / "images", PYTHON_BASE, {"BASE_IMAGE": BASE})
    return PYTHON_BASE


def dns_wait_image(docker: Docker) -> str:
    if not docker.has_image(DNS_WAIT):
        log(f"building {DNS_WAIT}")
        build(docker, HERE / "images" / "dns-wait.Dockerfile", HERE / "images", DNS_WAIT, {"BASE_IMAGE": BASE})
    return DNS_WAIT


def pause_binary(work: Path, kube_src: Path) -> Path:
    source = kube_src / "build" / "pause" / "linux" / "pause.c"
    out = work / "pause"
    result = subprocess.run(["gcc", "-Os", "-static", "-o", str(out), str(source)], capture_output=True, text=True)
    if result.returncode != 0:
        raise KindSetupError(f"compiling pause.c failed: {result.stderr.strip()[-300:]}")
    subprocess.run(["strip", str(out)], check=False)
    return out


def pause_version(kube_src: Path) -> str:
    for line in (kube_src / "build" / "pause" / "Makefile").read_text().splitlines():
        if line.startswith("TAG ?="):
            return line.split("=", 1)[1].strip()
    raise KindSetupError("could not read the pause version from k8s.io/kubernetes' build/pause/Makefile")


def module_dir(component_dir: str, module: str) -> Path:
    out = subprocess.run(["go", "mod", "download", "-json", module], cwd=ROOT / "tools" / "controlplane" / component_dir,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise KindSetupError(f"go mod download {module} failed: {out.stderr.strip()[-300:]}")
    return Path(json.loads(out.stdout)["Dir"])


def trainjob_components(v: dict[str, str]) -> list[Component]:
    """The controllers a TrainJob needs (Kubeflow Trainer v2 and JobSet), from the binaries
    `tools/build-controlplane.sh` builds with the extras; both Deployments run `/manager`. Apart from
    `components()` because they are loaded only when asked for (`up --trainjob`), not preloaded in the node image."""
    return [
        # Both Deployments say runAsNonRoot: the UID their release images (distroless nonroot) run as.
        Component("jobset", "jobset-controller-manager", f"{v['JOBSET_VERSION']}-nonroot", target="/manager",
                  user=NONROOT_UID),
        Component("trainer-controller-manager", "trainer-controller-manager", f"{v['TRAINER_V2_VERSION']}-nonroot",
                  target="/manager", user=NONROOT_UID),
    ]


def _component_image(docker: Docker, bin_dir: Path, c: Component) -> str:
    ref = f"{REPO}/{c.name}:{c.tag}"
    if docker.has_image(ref):
        return ref
    if not (bin_dir / c.binary).exists():
        raise KindSetupError(f"{bin_dir / c.binary} is missing: run tools/build-controlplane.sh --with-kind"
                             + (" --with-extras" if c in trainjob_components(versions(bin_dir)) else ""))
    log(f"building {ref}")
    args = {"BASE_IMAGE": BASE, "BINARY": c.binary, "PACKAGES": c.packages, "USER": c.user}
    if c.target:
        args["TARGET"] = c.target
    build(docker, HERE / "images" / "component.Dockerfile", bin_dir, ref, args)
    return ref


def trainjob_images(docker: Docker, bin_dir: Path) -> dict[str, str]:
    """The JobSet and Trainer v2 controller images; returns name -> image reference."""
    return {c.name: _component_image(docker, bin_dir, c) for c in trainjob_components(versions(bin_dir))}


def component_images(docker: Docker, bin_dir: Path, cache: Path) -> dict[str, str]:
    """Build every component image; returns name -> image reference."""
    v = versions(bin_dir)
    refs: dict[str, str] = {}
    for c in components(v):
        refs[c.name] = _component_image(docker, bin_dir, c)
    kube_src = module_dir("kind-node", f"k8s.io/kubernetes@{v['K8S_VERSION']}")
    pause_ref = f"{REPO}/pause:{pause_version(kube_src)}"
    refs["pause"] = pause_ref
    if not docker.has_image(pause_ref):
        log(f"building {pause_ref} from pause.c")
        with tempfile.TemporaryDirectory(dir=cache) as work:
            pause_binary(Path(work), kube_src)
            build(docker, HERE / "images" / "pause.Dockerfile", Path(work), pause_ref)
    return refs


def node_image(docker: Docker, bin_dir: Path, cache: Path, refs: dict[str, str]) -> str:
    """The kind node image: its tag carries a digest of every input, so a change rebuilds it."""
    v = versions(bin_dir)
    node_dir = HERE / "node"
    ours = sorted(p for p in node_dir.iterdir() if p.is_file())
    stamps = sorted((bin_dir.parent / "extras").glob("*.stamp"))
    tag = f"{REPO}/kind-node:{v['K8S_VERSION']}-" + digest(
        *ours, HERE / "runc-shim", *stamps, json.dumps(refs, sort_keys=True), v["KIND_VERSION"])
    if docker.has_image(tag):
        return tag
    log(f"building the kind node image {tag}")
    kind_files = module_dir("kind", f"sigs.k8s.io/kind@{v['KIND_VERSION']}") / "images" / "base" / "files"
    with tempfile.TemporaryDirectory(prefix="node-context.", dir=cache) as work:
        ctx = Path(work)
        shutil.copytree(kind_files, ctx / "kind-files")
        for item in ours:
            shutil.copy2(item, ctx / item.name)
        shutil.copy2(HERE / "runc-shim", ctx / "runc-shim")
        (ctx / "bin").mkdir()
        for binary in ("kubelet", "kubeadm", "kubectl"):
            shutil.copy2(bin_dir / binary, ctx / "bin" / binary)
        (ctx / "images").mkdir()
        for name, ref in refs.items():
            if name == "training-operator":
                continue
            docker.run("save", "-o", str(ctx / "images" / f"{name}.tar"), ref)
        subprocess.run(["chmod", "-R", "u+w", str(ctx)], check=True)
        build(docker, node_dir / "Dockerfile", ctx, tag, {"BASE_IMAGE": BASE, "KUBE_VERSION": v["K8S_VERSION"]})
    # Node images of earlier inputs (2 GB each); one still used by a cluster stays (docker refuses).
    listed = docker.run("images", "--format", "{{.Repository}}:{{.Tag}}", f"{REPO}/kind-node", check=False).stdout
    for old in listed.split():
        if old != tag:
            docker.run("rmi", old, check=False)
    return tag


def project_images(docker: Docker, tag: str = "kind", local_base: bool = True) -> dict[str, str]:
    """The operator and CPU trainer images through docker/Makefile, as `make images` builds them: on the
    local Python base with torch from PyPI, or (`local_base=False`, a registry is reachable) on the
    Dockerfiles' public bases with the CPU torch wheel."""
    refs = {"operator": f"{REPO}/operator:{tag}", "trainer-cpu": f"{REPO}/trainer-cpu:{tag}"}
    build_args = f"--label {LOCAL_LABEL}"
    if local_base:
        build_args += f" --build-arg PYTHON_IMAGE={PYTHON_BASE} --build-arg TORCH_INDEX_URL="
    if HOST_CA.exists():
        build_args += f" --secret id=ca,src={HOST_CA}"
    log("building the operator and trainer-cpu images (docker/Makefile)")
    out = subprocess.run(["make", "-C", str(ROOT / "docker"), "operator", "trainer-cpu", f"DOCKER={docker.cli}",
                          f"IMAGE_REGISTRY={REPO}", f"IMAGE_TAG={tag}", f"DOCKER_BUILD_ARGS={build_args}"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-10:]
        raise KindSetupError("building the project's images failed:\n  " + "\n  ".join(tail))
    # The images a rebuild replaced (the trainer's is 6 GB); only ours, by label.
    docker.run("image", "prune", "--force", "--filter", f"label={LOCAL_LABEL}", check=False)
    return refs
