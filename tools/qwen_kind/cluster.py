"""A kind cluster (one control-plane node, two workers) running the training-operator and our chart.

Networking without kindnetd (not on any reachable registry): kind's default CNI is off, each node gets a
bridge CNI config for its own pod CIDR (Debian's CNI plugins) and routes to the other nodes' pod CIDRs.
Storage: every node mounts the same host folder at /qwen-shared, so a hostPath PersistentVolume there is
shared by pods on different nodes, as an NFS volume would be.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import images
from .docker import CLUSTER_GIB, IMAGES_GIB, Docker, check_disk, ensure_docker, log, make_room
from .errors import KindSetupError

ROOT = images.ROOT
SHARED_IN_NODE = "/qwen-shared"
CHART = ROOT / "charts" / "qwen-training-operator"
OPERATOR_NAMESPACE = "qwen-system"
TFO_UPSTREAM_IMAGE = "ghcr.io/kubeflow/training-v1/training-operator"
# `up --trainjob`: JobSet and Kubeflow Trainer v2 (controllers built from Go modules, manifests from the same
# modules), and a second release of the chart with jobApi trainjob watching only TRAINJOB_NAMESPACE.
TRAINJOB_EXTRAS = ("jobset", "trainer-v2")
TRAINJOB_RELEASE = "qwen-trainjob"
TRAINJOB_OPERATOR_NAMESPACE = "qwen-trainjob-system"
# In a node: remove the layer blobs of image $1 (a docker-save import: one manifest) from containerd's
# content store; the unpacked snapshots stay, and containerd's garbage collector frees the space.
DISCARD_LAYERS = """
manifest=$(ctr -n k8s.io images ls "name==$1" | awk 'NR==2{print $3}')
test -n "$manifest"
ctr -n k8s.io content get "$manifest" | jq -r '.layers[].digest' | while read -r layer; do
  ctr -n k8s.io content rm "$layer" >/dev/null
done
"""


def cache_dir() -> Path:
    return Path(os.environ.get("QWEN_K8S_CACHE", Path.home() / ".cache" / "qwen-k8s")) / "kind"


def controlplane_bin_dir(trainjob: bool = False) -> Path:
    """Builds (or finds) the Go-built binaries, kind's node parts included; `trainjob`: the JobSet and Kubeflow
    Trainer v2 controllers too."""
    env = dict(os.environ)
    if trainjob:
        named = env.get("QWEN_CONTROLPLANE_EXTRAS", "").replace(",", " ").split()
        env["QWEN_CONTROLPLANE_EXTRAS"] = ",".join(dict.fromkeys([*named, *TRAINJOB_EXTRAS]))
    out = subprocess.run([str(ROOT / "tools" / "build-controlplane.sh"), "--with-kind"], capture_output=True, text=True,
                         env=env)
    if out.returncode != 0:
        raise KindSetupError("tools/build-controlplane.sh --with-kind failed:\n  "
                             + "\n  ".join(out.stderr.strip().splitlines()[-8:]))
    return Path(out.stdout.strip().splitlines()[-1])


def kind_config(shared: Path, workers: int, stock: bool = False) -> dict:
    """kind's cluster config. `stock`: kind's own node image (kindnetd, registry.k8s.io images); else the
    node image built here (no default CNI, kubeadm's images under the local name)."""
    def mounts() -> list[dict]:
        return [{"hostPath": str(shared), "containerPath": SHARED_IN_NODE}]

    config = {
        "kind": "Cluster",
        "apiVersion": "kind.x-k8s.io/v1alpha4",
        "nodes": [{"role": "control-plane", "extraMounts": mounts()}]
                 + [{"role": "worker", "extraMounts": mounts()} for _ in range(workers)],
    }
    if not stock:
        config["networking"] = {"disableDefaultCNI": True, "kubeProxyMode": "nftables"}
        # kubeadm takes every control-plane image from the local name the images were built under.
        config["kubeadmConfigPatches"] = [yaml.safe_dump({"kind": "ClusterConfiguration", "imageRepository": images.REPO})]
    return config


def bridge_conflist(pod_cidr: str) -> str:
    return json.dumps({
        "cniVersion": "0.4.0",
        "name": "qwen-bridge",
        "plugins": [
            {"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": True, "hairpinMode": True,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": pod_cidr}]], "routes": [{"dst": "0.0.0.0/0"}]}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }, indent=1)


@dataclass
class KindCluster:
    name: str
    kubeconfig: Path
    shared: Path
    docker: Docker
    kind: Path
    refs: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    _snapshotters: dict[str, str] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------------------------------ helpers
    def kind_cmd(self, *args: str, timeout: float = 900) -> str:
        env = {**os.environ, "PATH": f"{Path(self.docker.cli).parent}:{os.environ.get('PATH', '')}"}
        out = subprocess.run([str(self.kind), *args], capture_output=True, text=True, env=env, timeout=timeout)
        if out.returncode != 0:
            raise KindSetupError(f"kind {' '.join(args[:2])} failed:\n  "
                                 + "\n  ".join((out.stderr or out.stdout).strip().splitlines()[-10:]))
        return out.stdout

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True, timeout: float = 120) -> str:
        out = subprocess.run(["kubectl", f"--kubeconfig={self.kubeconfig}", *args], input=stdin, capture_output=True,
                             text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise KindSetupError(f"kubectl {' '.join(args[:3])} failed: {out.stderr.strip()[-500:]}")
        return out.stdout

    def nodes(self) -> list[dict]:
        return json.loads(self.kubectl("get", "nodes", "-o", "json"))["items"]

    def node_exec(self, node: str, *cmd: str, stdin: str | None = None) -> None:
        self.docker.run("exec", "-i", node, *cmd, stdin=stdin)

    def workers(self) -> list[str]:
        return [n["metadata"]["name"] for n in self.nodes()
                if "node-role.kubernetes.io/control-plane" not in n["metadata"].get("labels", {})]

    # ------------------------------------------------------------------------------------------- steps
    def network(self) -> None:
        """Bridge CNI per node and routes between the nodes' pod CIDRs (what kindnetd would do)."""
        nodes = []
        for n in self.nodes():
            ip = next(a["address"] for a in n["status"]["addresses"] if a["type"] == "InternalIP")
            nodes.append((n["metadata"]["name"], ip, n["spec"]["podCIDR"]))
        for name, _, cidr in nodes:
            self.node_exec(name, "sh", "-c", "mkdir -p /etc/cni/net.d && cat > /etc/cni/net.d/10-qwen-bridge.conflist",
                           stdin=bridge_conflist(cidr))
            for other, other_ip, other_cidr in nodes:
                if other != name:
                    self.node_exec(name, "ip", "route", "replace", other_cidr, "via", other_ip)

    def wait_ready(self, timeout: float = 300) -> None:
        self.kubectl("wait", "--for=condition=Ready", "node", "--all", f"--timeout={int(timeout)}s", timeout=timeout + 30)
        self.kubectl("-n", "kube-system", "rollout", "status", "deployment/coredns", f"--timeout={int(timeout)}s",
                     timeout=timeout + 30)

    def load(self, ref: str, nodes: list[str]) -> None:
        """What `kind load` does, but streamed: one `docker save` fed into every node's containerd at once, with
        no archive on the host disk (the trainer image would need its size once more there) and the image read
        out of Docker once rather than once a node. Then the image's layer blobs are dropped on each node once
        unpacked, as containerd's CRI does for pulled images (discard_unpacked_layers): otherwise it would take
        twice its size on every node."""
        env = {**os.environ, **self.docker.env}
        with tempfile.TemporaryFile() as save_errors:
            save = subprocess.Popen([self.docker.cli, "save", ref], stdout=subprocess.PIPE, stderr=save_errors,
                                    env=env)
            imports = {node: self._start_import(node, env) for node in nodes}
            try:
                failed = fan_out(save.stdout, {node: proc.stdin for node, (proc, _) in imports.items()})
            finally:
                save.stdout.close()
                save.wait(timeout=60)
                for proc, _ in imports.values():
                    if proc.stdin and not proc.stdin.closed:
                        try:
                            proc.stdin.close()
                        except BrokenPipeError:
                            pass
            errors = {}
            for node, (proc, output) in imports.items():
                rc = proc.wait(timeout=1800)
                output.seek(0)
                if rc != 0 or node in failed:
                    errors[node] = output.read().decode(errors="replace").strip()[-300:]
                output.close()
            save_errors.seek(0)
            # a node that stopped reading mid-stream is the cause (docker save then dies of the closed pipe);
            # otherwise a failed save is (the nodes then got a truncated archive)
            if save.returncode != 0 and not failed:
                raise KindSetupError(f"docker save {ref} failed: {save_errors.read().decode().strip()[-300:]}")
        if errors:
            raise KindSetupError(f"loading {ref} failed on " + "; ".join(f"{n}: {why}" for n, why in errors.items()))
        for node in nodes:
            self.node_exec(node, "sh", "-euc", DISCARD_LAYERS, "discard", ref)

    def _start_import(self, node: str, env: dict) -> tuple[subprocess.Popen, object]:
        """`ctr images import` in the node, reading an image archive from its stdin; its output into a file (a
        pipe nobody reads while the archive streams could fill and stop it)."""
        command = ["ctr", "--namespace=k8s.io", "images", "import", "--all-platforms", "--digests",
                   f"--snapshotter={self.snapshotter(node)}", "-"]
        output = tempfile.TemporaryFile()
        proc = subprocess.Popen([self.docker.cli, "exec", "-i", node, *command], stdin=subprocess.PIPE,
                                stdout=output, stderr=subprocess.STDOUT, env=env)
        return proc, output

    def snapshotter(self, node: str) -> str:
        """The snapshotter the node's CRI unpacks images with (an import must use the same one); read once a node."""
        if node not in self._snapshotters:
            self._snapshotters[node] = self._read_snapshotter(node)
        return self._snapshotters[node]

    def _read_snapshotter(self, node: str) -> str:
        config = tomllib.loads(self.docker.run("exec", node, "containerd", "config", "dump").stdout)
        plugins = config.get("plugins", {})
        if config.get("version", 1) >= 3:
            return plugins.get("io.containerd.cri.v1.images", {}).get("snapshotter") or "overlayfs"
        return plugins.get("io.containerd.grpc.v1.cri", {}).get("containerd", {}).get("snapshotter") or "overlayfs"

    def install_training_operator(self, bin_dir: Path) -> None:
        v = images.versions(bin_dir)
        src = images.module_dir("training-operator",
                                f"github.com/kubeflow/training-operator@{v['TRAINING_OPERATOR_VERSION']}")
        with tempfile.TemporaryDirectory() as work:
            shutil.copytree(src / "manifests", Path(work) / "manifests")
            subprocess.run(["chmod", "-R", "u+w", work], check=True)
            rendered = self.kubectl("kustomize", str(Path(work) / "manifests" / "overlays" / "standalone"))
        docs = [d for d in yaml.safe_load_all(rendered) if d]
        for doc in docs:
            if doc.get("kind") == "Deployment" and "training-operator" in self.refs:  # built here, else upstream's
                for c in doc["spec"]["template"]["spec"]["containers"]:
                    if c["image"].startswith(TFO_UPSTREAM_IMAGE):
                        c["image"] = self.refs["training-operator"]
                        c["imagePullPolicy"] = "Never"
                        c.setdefault("args", []).append(f"--pytorch-init-container-image={self.refs['dns-wait']}")
        self.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", stdin=yaml.safe_dump_all(docs))
        self.kubectl("-n", "kubeflow", "rollout", "status", "deployment/training-operator", "--timeout=300s",
                     timeout=330)

    def install_trainjob_controllers(self, bin_dir: Path) -> None:
        """JobSet, then Kubeflow Trainer v2, from their modules' manifests (JobSet's config/default, Trainer's
        manifests/overlays/manager without its JobSet release URL, which is not reachable here), with the
        controller images built here. Both manage their webhook certificates themselves."""
        v = images.versions(bin_dir)
        jobset_src = images.module_dir("jobset", f"sigs.k8s.io/jobset@{v['JOBSET_VERSION']}")
        trainer_src = images.module_dir("trainer-v2", f"github.com/kubeflow/trainer/v2@{v['TRAINER_V2_VERSION']}")
        with tempfile.TemporaryDirectory() as work:
            w = Path(work)
            shutil.copytree(jobset_src / "config", w / "jobset")
            shutil.copytree(trainer_src / "manifests", w / "trainer")
            subprocess.run(["chmod", "-R", "u+w", work], check=True)
            overlay = w / "trainer" / "overlays" / "manager"
            kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text())
            kustomization["resources"] = [r for r in kustomization["resources"] if "third-party" not in r]
            (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
            rendered = [(self.kubectl("kustomize", str(w / "jobset" / "default")), self.refs["jobset"],
                         "jobset-system", "jobset-controller-manager"),
                        (self.kubectl("kustomize", str(overlay)), self.refs["trainer-controller-manager"],
                         "kubeflow-system", "kubeflow-trainer-controller-manager")]
        for text, ref, namespace, deployment in rendered:
            docs = [d for d in yaml.safe_load_all(text) if d]
            for doc in docs:
                if doc.get("kind") == "Deployment":
                    for c in doc["spec"]["template"]["spec"]["containers"]:
                        if c["name"] == "manager":
                            c["image"], c["imagePullPolicy"] = ref, "Never"
                            # JobSet asks for half a CPU; the kind workers have the host's 2 and the tests'
                            # two-node pods take 1.5 each, so the controllers ask for a tenth.
                            requests = c.setdefault("resources", {}).setdefault("requests", {})
                            requests["cpu"] = "100m"
            self.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", stdin=yaml.safe_dump_all(docs),
                         timeout=300)
            self.kubectl("-n", namespace, "rollout", "status", f"deployment/{deployment}", "--timeout=300s",
                         timeout=330)
        # The webhooks answer once each controller has written its certificate and injected its CA.
        self.wait_webhooks(("jobset-", ".trainer.kubeflow.org"))

    def wait_webhooks(self, names: tuple[str, ...], timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while True:
            pending = []
            for kind in ("validatingwebhookconfigurations", "mutatingwebhookconfigurations"):
                for cfg in json.loads(self.kubectl("get", kind, "-o", "json"))["items"]:
                    if not any(n in cfg["metadata"]["name"] for n in names):
                        continue
                    pending += [w["name"] for w in cfg.get("webhooks") or [] if not w["clientConfig"].get("caBundle")]
            if not pending:
                return
            if time.monotonic() > deadline:
                raise KindSetupError(f"webhooks without a CA bundle after {timeout:.0f} s: {', '.join(pending)}")
            time.sleep(2)

    def install_chart(self, helm: Path, namespaces: tuple[str, ...] = (), release: str = "qwen-training-operator",
                      operator_namespace: str = OPERATOR_NAMESPACE, extra: tuple[str, ...] = ()) -> None:
        """The chart as a user installs it; `namespaces` (created here) get the trainer ServiceAccount that
        may report progress into the resources' status; `extra`: more helm arguments."""
        for ns in namespaces:
            self.kubectl("create", "namespace", ns, check=False)
        trainer_ns = ["--set", f"trainer.serviceAccount.namespaces={{{','.join(namespaces)}}}"] if namespaces else []
        repo, tag = self.refs["operator"].rsplit(":", 1)
        out = subprocess.run([str(helm), "upgrade", "--install", release, str(CHART), *trainer_ns,
                              "--kubeconfig", str(self.kubeconfig), "--namespace", operator_namespace,
                              "--create-namespace", "--wait", "--timeout", "5m",
                              "--set", f"image.repository={repo}", "--set", f"image.tag={tag}",
                              "--set", "image.pullPolicy=Never", *extra], capture_output=True, text=True, timeout=400)
        if out.returncode != 0:
            raise KindSetupError(f"helm install of the chart failed: {out.stderr.strip()[-800:]}")

    def install_trainjob_chart(self, helm: Path, namespace: str) -> None:
        """A second release with jobApi trainjob watching only `namespace` (the first release, cluster-wide
        with jobApi pytorchjob, is told to leave it alone by watching only its own namespaces)."""
        self.install_chart(helm, (namespace,), release=TRAINJOB_RELEASE, operator_namespace=TRAINJOB_OPERATOR_NAMESPACE,
                           extra=("--set", "jobApi=trainjob", "--set", "watch.scope=namespaces",
                                  "--set", f"watch.namespaces={{{namespace}}}",
                                  "--set", f"trainJob.runtime.image={self.refs['trainer-cpu']}"))

    def shared_volume(self, namespace: str, claim: str, subdir: str) -> Path:
        """A ReadWriteMany claim bound to <shared>/<subdir>, which every node mounts; returns the host folder."""
        host = self.shared / subdir
        host.mkdir(parents=True, exist_ok=True)
        pv = f"{namespace}-{claim}"
        self.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all([
            {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
             "spec": {"capacity": {"storage": "10Gi"}, "accessModes": ["ReadWriteMany"], "storageClassName": "",
                      "persistentVolumeReclaimPolicy": "Retain",
                      "hostPath": {"path": f"{SHARED_IN_NODE}/{subdir}", "type": "Directory"},
                      "claimRef": {"namespace": namespace, "name": claim}}},
            {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim, "namespace": namespace},
             "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "", "volumeName": pv,
                      "resources": {"requests": {"storage": "10Gi"}}}},
        ]))
        return host

    def delete(self) -> None:
        try:
            self.kind_cmd("delete", "cluster", "--name", self.name, timeout=300)
            log(f"deleted kind cluster {self.name}")
        except (KindSetupError, subprocess.TimeoutExpired) as err:
            log(f"could not delete kind cluster {self.name}: {err}")


def fan_out(source, sinks: dict, chunk: int = 1 << 20) -> set:
    """Copy the byte stream `source` into every writable of `sinks` (name -> file); a sink whose reader went away
    is dropped and the others go on. Returns the names of the dropped ones."""
    failed = set()
    while True:
        block = source.read(chunk)
        if not block:
            return failed
        for name, sink in sinks.items():
            if name in failed:
                continue
            try:
                sink.write(block)
            except (BrokenPipeError, ValueError):  # ValueError: the sink was closed
                failed.add(name)
        if len(failed) == len(sinks):
            return failed


def timed(timings: dict, key: str):
    class _T:
        def __enter__(self):
            self.t0 = time.monotonic()
            log(f"{key} ...")

        def __exit__(self, *exc):
            timings[key] = round(time.monotonic() - self.t0, 1)
            if exc[0] is None:
                log(f"{key}: {timings[key]} s")
    return _T()


def up(name: str = "qwen-e2e", workers: int = 2, work: Path | None = None,
       namespaces: tuple[str, ...] = (), trainjob_namespace: str | None = None) -> KindCluster:
    """Everything from nothing: Docker, images, the cluster, the training-operator and the chart (with the
    trainer ServiceAccount in `namespaces`). On failure everything started so far is stopped again.

    `trainjob_namespace`: also JobSet and Kubeflow Trainer v2 (controller images built here from the Go
    binaries) and a second release of the chart with jobApi trainjob watching only that namespace; the first
    release then watches only `namespaces` (two operators must not both act on one resource).

    With QWEN_KIND_NODE_IMAGE set (e.g. a kindest/node image; needs a registry), kind's stock node image, its
    default CNI and the upstream images are used and the project images build on their public bases;
    otherwise everything is built here (no registry needed)."""
    stock_node = os.environ.get("QWEN_KIND_NODE_IMAGE", "").strip()
    if trainjob_namespace and stock_node:
        raise KindSetupError("the TrainJob controllers are built here: unset QWEN_KIND_NODE_IMAGE for them")
    cache = cache_dir()
    docker_root = Path("/var/lib/docker") if Path("/var/lib/docker").exists() else cache
    timings: dict[str, float] = {}
    docker = ensure_docker(cache)
    built = docker.has_image(f"{images.REPO}/trainer-cpu:kind")
    check_disk(docker_root, CLUSTER_GIB + (0 if built else IMAGES_GIB))
    cluster = None
    try:
        with timed(timings, "Go-built binaries"):
            bin_dir = controlplane_bin_dir(trainjob=bool(trainjob_namespace))
        with timed(timings, "component and node images"):
            if stock_node:
                refs, node = {}, stock_node
            else:
                images.base_image(docker, cache)
                images.python_base(docker)
                refs = images.component_images(docker, bin_dir, cache)
                node = images.node_image(docker, bin_dir, cache, refs)
                refs["dns-wait"] = images.dns_wait_image(docker)
                if trainjob_namespace:
                    refs.update(images.trainjob_images(docker, bin_dir))
        with timed(timings, "project images"):
            refs.update(images.project_images(docker, local_base=not stock_node))
        make_room(docker, docker_root, CLUSTER_GIB)
        work = work or Path(tempfile.mkdtemp(prefix="qwen-kind."))
        shared = work / "shared"
        shared.mkdir(parents=True, exist_ok=True)
        kubeconfig = work / "kubeconfig"
        cluster = KindCluster(name, kubeconfig, shared, docker, bin_dir / "kind", refs, timings)
        # A cluster left by an interrupted run would make `kind create` fail.
        subprocess.run([str(cluster.kind), "delete", "cluster", "--name", name], capture_output=True,
                       env={**os.environ, "PATH": f"{Path(docker.cli).parent}:{os.environ.get('PATH', '')}"})
        config = work / "kind.yaml"
        config.write_text(yaml.safe_dump(kind_config(shared, workers, stock=bool(stock_node))))
        with timed(timings, "kind create cluster"):
            cluster.kind_cmd("create", "cluster", "--name", name, "--image", node, "--config", str(config),
                             "--kubeconfig", str(kubeconfig), "--retain")
            if not stock_node:
                cluster.network()
            cluster.wait_ready()
        with timed(timings, "kind load (images onto the workers)"):
            for key in ("training-operator", "dns-wait", "operator", "trainer-cpu", "jobset",
                        "trainer-controller-manager"):
                if key in refs:
                    cluster.load(refs[key], cluster.workers())
        with timed(timings, "training-operator and chart"):
            cluster.install_training_operator(bin_dir)
            scope = ("--set", "watch.scope=namespaces", "--set", f"watch.namespaces={{{','.join(namespaces)}}}") \
                if trainjob_namespace and namespaces else ()
            cluster.install_chart(bin_dir / "helm", namespaces, extra=scope)
        if trainjob_namespace:
            with timed(timings, "JobSet, Trainer v2 and the trainjob chart release"):
                cluster.install_trainjob_controllers(bin_dir)
                cluster.install_trainjob_chart(bin_dir / "helm", trainjob_namespace)
        return cluster
    except BaseException:
        if os.environ.get("QWEN_KIND_KEEP_ON_FAILURE") == "1" and cluster is not None:
            log(f"keeping the failed cluster {name} (QWEN_KIND_KEEP_ON_FAILURE=1; kubeconfig {cluster.kubeconfig})")
            raise
        if cluster is not None:
            cluster.delete()
        docker.stop()
        raise


def attach(name: str, work: Path) -> KindCluster:
    """A cluster `up` left running (python tools/qwen_kind up --work DIR), for iterating on tests; it is not
    deleted by `down(..., keep=True)`."""
    docker = ensure_docker(cache_dir())
    bin_dir = controlplane_bin_dir()
    refs = {c.name: f"{images.REPO}/{c.name}:{c.tag}" for c in images.components(images.versions(bin_dir))}
    refs.update({"operator": f"{images.REPO}/operator:kind", "trainer-cpu": f"{images.REPO}/trainer-cpu:kind",
                 "dns-wait": images.DNS_WAIT})
    refs.update({c.name: f"{images.REPO}/{c.name}:{c.tag}"
                 for c in images.trainjob_components(images.versions(bin_dir))})
    return KindCluster(name, work / "kubeconfig", work / "shared", docker, bin_dir / "kind", refs)


def down(cluster: KindCluster, keep: bool = False) -> None:
    if keep:
        log(f"leaving kind cluster {cluster.name} running")
        return
    cluster.delete()
    cluster.docker.stop()
