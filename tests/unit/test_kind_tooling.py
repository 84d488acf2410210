"""The pure parts of tools/qwen_kind: the runc capability shim's rewrite, the kind config, the per-node CNI
config, the one-line refusals (no disk, no Docker where none can be installed), and the image stream fed to
every node at once."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

from qwen_kind import cluster, docker, images  # noqa: E402
from qwen_kind.errors import KindSetupError  # noqa: E402


def load_shim():
    loader = importlib.machinery.SourceFileLoader("runc_shim", str(ROOT / "tools" / "qwen_kind" / "runc-shim"))
    spec = importlib.util.spec_from_loader("runc_shim", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_shim_strips_only_the_missing_capabilities_from_a_bundle(tmp_path):
    shim = load_shim()
    caps = ["CAP_SYS_ADMIN", "CAP_SYS_RESOURCE", "CAP_NET_ADMIN"]
    spec = {"process": {"capabilities": {k: list(caps) for k in ("bounding", "effective", "permitted")}},
            "root": {"path": "rootfs"}}
    (tmp_path / "config.json").write_text(json.dumps(spec))
    shim.rewrite(str(tmp_path / "config.json"), {"CAP_SYS_RESOURCE"}, is_spec=True)
    got = json.loads((tmp_path / "config.json").read_text())
    for key in ("bounding", "effective", "permitted"):
        assert got["process"]["capabilities"][key] == ["CAP_SYS_ADMIN", "CAP_NET_ADMIN"]
    assert got["root"] == {"path": "rootfs"}


def test_shim_rewrites_an_exec_process_file(tmp_path):
    shim = load_shim()
    (tmp_path / "process.json").write_text(json.dumps({"capabilities": {"bounding": ["CAP_SYS_RESOURCE", "CAP_KILL"]}}))
    shim.rewrite(str(tmp_path / "process.json"), {"CAP_SYS_RESOURCE"}, is_spec=False)
    assert json.loads((tmp_path / "process.json").read_text())["capabilities"]["bounding"] == ["CAP_KILL"]


def test_shim_reads_runc_options_in_both_spellings():
    shim = load_shim()
    assert shim.option(["--root", "/r", "create", "--bundle", "/b", "id"], "--bundle", "-b") == "/b"
    assert shim.option(["create", "--bundle=/b2", "id"], "--bundle", "-b") == "/b2"
    assert shim.option(["exec", "-p", "/p.json", "id"], "--process", "-p") == "/p.json"
    assert shim.option(["start", "id"], "--bundle", "-b") is None


def test_shim_knows_every_capability_bit():
    # The names follow linux/capability.h's numbering; CAP_SYS_RESOURCE is bit 24.
    shim = load_shim()
    assert shim.CAP_NAMES.index("SYS_RESOURCE") == docker.CAP_SYS_RESOURCE == 24
    assert shim.CAP_NAMES[-1] == "CHECKPOINT_RESTORE" and len(shim.CAP_NAMES) == 41


def test_kind_config_mounts_the_shared_folder_on_every_node(tmp_path):
    cfg = cluster.kind_config(tmp_path, workers=2)
    assert [n["role"] for n in cfg["nodes"]] == ["control-plane", "worker", "worker"]
    for node in cfg["nodes"]:
        assert node["extraMounts"] == [{"hostPath": str(tmp_path), "containerPath": cluster.SHARED_IN_NODE}]
    assert cfg["networking"] == {"disableDefaultCNI": True, "kubeProxyMode": "nftables"}
    patch = yaml.safe_load(cfg["kubeadmConfigPatches"][0])
    assert patch == {"kind": "ClusterConfiguration", "imageRepository": images.REPO}
    # No YAML anchors (kind's own parser handles them, a reader may not).
    assert "&id" not in yaml.safe_dump(cfg)


def test_bridge_conflist_uses_the_node_pod_cidr():
    conf = json.loads(cluster.bridge_conflist("10.244.2.0/24"))
    bridge = conf["plugins"][0]
    assert bridge["type"] == "bridge" and bridge["isGateway"] is True
    assert bridge["ipam"]["ranges"] == [[{"subnet": "10.244.2.0/24"}]]
    assert conf["plugins"][1]["type"] == "portmap"


def test_component_images_use_the_pinned_versions():
    v = {"K8S_VERSION": "v1.34.4", "ETCD_VERSION": "v3.6.5", "COREDNS_VERSION": "v1.12.1",
         "TRAINING_OPERATOR_VERSION": "v1.9.3"}
    refs = {c.name: c.tag for c in images.components(v)}
    assert refs["kube-apiserver"] == "v1.34.4" and refs["etcd"] == "3.6.5-0" and refs["coredns"] == "v1.12.1"
    assert {c.name: c.target for c in images.components(v)}["training-operator"] == "/manager"


def test_trainjob_controller_images_are_apart_from_the_node_image():
    v = {"K8S_VERSION": "v1.34.4", "ETCD_VERSION": "v3.6.5", "COREDNS_VERSION": "v1.12.1",
         "TRAINING_OPERATOR_VERSION": "v1.9.3", "JOBSET_VERSION": "v0.10.1", "TRAINER_V2_VERSION": "v2.3.0"}
    extra = {c.name: c for c in images.trainjob_components(v)}
    assert {n: (c.binary, c.tag, c.target, c.user) for n, c in extra.items()} == {
        "jobset": ("jobset-controller-manager", "v0.10.1-nonroot", "/manager", "65532"),
        "trainer-controller-manager": ("trainer-controller-manager", "v2.3.0-nonroot", "/manager", "65532")}
    # Not preloaded in (nor part of the digest of) the node image: asking for them rebuilds nothing else.
    assert not set(extra) & {c.name for c in images.components(v)}


def test_trainjob_needs_the_node_image_built_here(monkeypatch):
    monkeypatch.setenv("QWEN_KIND_NODE_IMAGE", "kindest/node:v1.34.0")
    with pytest.raises(KindSetupError) as err:
        cluster.up(trainjob_namespace="qwen-kind-trainjob")
    assert "QWEN_KIND_NODE_IMAGE" in str(err.value) and "\n" not in str(err.value)


def test_not_enough_disk_is_one_line(tmp_path):
    with pytest.raises(KindSetupError) as err:
        docker.check_disk(tmp_path, need_gib=10**6)
    assert "GiB free under" in str(err.value) and "\n" not in str(err.value)


def test_no_docker_and_no_way_to_install_it_is_one_line(monkeypatch):
    monkeypatch.setattr(docker.os, "geteuid", lambda: 1000)
    with pytest.raises(KindSetupError) as err:
        docker.install_packages()
    assert "no Docker daemon answers" in str(err.value) and "\n" not in str(err.value)


def test_stock_kind_config_keeps_kinds_own_networking_and_images(tmp_path):
    cfg = cluster.kind_config(tmp_path, workers=2, stock=True)
    assert "networking" not in cfg and "kubeadmConfigPatches" not in cfg
    assert len(cfg["nodes"]) == 3 and all(n["extraMounts"] for n in cfg["nodes"])


def test_one_image_stream_reaches_every_node_and_a_node_that_stops_reading_is_named():
    import io
    import os
    import subprocess

    data = os.urandom(3 * (1 << 20) + 12345)  # several chunks and a partial one
    first, second = io.BytesIO(), io.BytesIO()
    gone = subprocess.Popen(["head", "-c", "100"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        failed = cluster.fan_out(io.BytesIO(data), {"worker": first, "worker2": second, "gone": gone.stdin})
    finally:
        gone.wait(timeout=30)
    assert failed == {"gone"}
    assert first.getvalue() == data and second.getvalue() == data
