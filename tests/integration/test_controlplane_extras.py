"""The opt-in controllers (JobSet, Kubeflow Trainer v2, Kueue) on the real API server.

Skipped unless they were built (``tools/build-controlplane.sh --with-extras``); each test is
skipped on its own when only some were. The cluster here is separate from the session one (no
training-operator, one fake GPU node) and starts every extra that is built.
"""

from __future__ import annotations

import uuid
from typing import Any, Callable

import pytest

k = pytest.importorskip("kubernetes.client")

import qwen_devcluster  # noqa: E402
from tests.integration import operator_support  # noqa: E402
from qwen_devcluster import BinariesMissing, extras as extras_mod  # noqa: E402


def wait_for(what: str, fn: Callable[[], Any], timeout: float = 90.0) -> Any:
    return operator_support.wait_for(fn, timeout, 0.3, what)


@pytest.fixture(scope="module")
def xcluster():
    try:
        bins = qwen_devcluster.bin_dir()
    except BinariesMissing as e:
        pytest.skip(f"control plane not available: {e}")
    if qwen_devcluster.missing(bins):
        pytest.skip("control-plane binaries not built (run tools/build-controlplane.sh)")
    assets = qwen_devcluster.binaries.assets_dir(bins)
    built = [e for e in extras_mod.EXTRAS if not extras_mod.missing(assets, [e])]
    if "jobset" not in built:
        built = [e for e in built if e != "trainer-v2"]  # Trainer v2 runs its jobs as JobSets
    if not built:
        pytest.skip("no extra controllers built (run tools/build-controlplane.sh --with-extras)")
    c = qwen_devcluster.start_cluster(None, bins, gpu_nodes=1, training_operator=False, extras=built,
                                      timeout=180)
    c.extras = built
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def xclient(xcluster):
    kubernetes = pytest.importorskip("kubernetes")
    client = kubernetes.config.new_client_from_config(config_file=str(xcluster.kubeconfig))
    yield client
    client.close()


@pytest.fixture
def ns(xclient):
    core = k.CoreV1Api(xclient)
    name = f"x-{uuid.uuid4().hex[:8]}"
    core.create_namespace(k.V1Namespace(metadata=k.V1ObjectMeta(name=name)))
    wait_for("default ServiceAccount", lambda: _exists(lambda: core.read_namespaced_service_account("default", name)))
    yield name
    core.delete_namespace(name)


def _exists(fn: Callable[[], Any]) -> bool:
    try:
        fn()
        return True
    except k.ApiException as e:
        if e.status == 404:
            return False
        raise


def need(c, *extras: str) -> None:
    gone = [e for e in extras if e not in c.extras]
    if gone:
        pytest.skip(f"extra controller(s) not built: {', '.join(gone)} (tools/build-controlplane.sh --only ...)")


def pod_template(gpus: int = 0, hold: bool = False) -> dict[str, Any]:
    """A pod kwok runs; ``hold`` keeps it Running (kwok's stock stage would complete a Job's pod at once) until
    the test sets its outcome."""
    res = {"requests": {"cpu": "1", "memory": "1Gi"}}
    if gpus:
        res["limits"] = {"nvidia.com/gpu": str(gpus)}
        res["requests"]["nvidia.com/gpu"] = str(gpus)
    meta = {"annotations": {qwen_devcluster.cluster.OUTCOME_ANNOTATION: "hold"}} if hold else {}
    return {"metadata": meta, "spec": {"restartPolicy": "Never",
                     "containers": [{"name": "c", "image": "registry.invalid/x:1", "resources": res}]}}


def test_extras_are_up(xcluster):
    comps = xcluster.measure()["components"]
    for e in xcluster.extras:
        assert comps[e]["alive"] and comps[e]["ready_s"] is not None, comps[e]


def test_jobset_creates_its_jobs_and_its_webhook_validates(xcluster, xclient, ns):
    need(xcluster, "jobset")
    co, batch = k.CustomObjectsApi(xclient), k.BatchV1Api(xclient)
    js = {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet", "metadata": {"name": "js"},
          "spec": {"replicatedJobs": [{"name": "w", "replicas": 2, "template": {"spec": {
              "parallelism": 1, "completions": 1, "backoffLimit": 0, "template": pod_template()}}}]}}
    co.create_namespaced_custom_object("jobset.x-k8s.io", "v1alpha2", ns, "jobsets", js)
    jobs = wait_for("the JobSet's two Jobs", lambda: [j for j in batch.list_namespaced_job(ns).items
                                                      if j.metadata.labels.get("jobset.sigs.k8s.io/jobset-name") == "js"]
                    if len(batch.list_namespaced_job(ns).items) >= 2 else None)
    assert sorted(j.metadata.name for j in jobs) == ["js-w-0", "js-w-1"]
    assert all(j.metadata.owner_references[0].kind == "JobSet" for j in jobs)
    # The validating webhook (served by the controller, registered by the harness) is live.
    bad = dict(js, metadata={"name": "bad"})
    bad["spec"] = dict(js["spec"], successPolicy={"operator": "All", "targetReplicatedJobs": ["nope"]})
    with pytest.raises(k.ApiException) as exc:
        co.create_namespaced_custom_object("jobset.x-k8s.io", "v1alpha2", ns, "jobsets", bad)
    assert exc.value.status in (400, 403, 422), exc.value.body
    assert "admission webhook" in exc.value.body and "does not appear in .spec.ReplicatedJobs" in exc.value.body


def test_trainjob_becomes_a_jobset(xcluster, xclient, ns):
    need(xcluster, "trainer-v2", "jobset")
    co = k.CustomObjectsApi(xclient)
    rt_name = f"torch-{ns}"
    runtime = {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "ClusterTrainingRuntime",
               "metadata": {"name": rt_name, "labels": {"trainer.kubeflow.org/framework": "torch"}},
               "spec": {"mlPolicy": {"numNodes": 1, "torch": {}}, "template": {"spec": {"replicatedJobs": [{
                   "name": "node",
                   "template": {"metadata": {"labels": {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}},
                                "spec": {"template": {"spec": {"containers": [
                                    {"name": "node", "image": "registry.invalid/torch:1"}]}}}}}]}}}}
    co.create_cluster_custom_object("trainer.kubeflow.org", "v1alpha1", "clustertrainingruntimes", runtime)
    try:
        tj = {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob", "metadata": {"name": "tj"},
              "spec": {"runtimeRef": {"name": rt_name, "kind": "ClusterTrainingRuntime",
                                      "apiGroup": "trainer.kubeflow.org"},
                       "trainer": {"numNodes": 2, "resourcesPerNode": {"limits": {"nvidia.com/gpu": 1}}}}}
        co.create_namespaced_custom_object("trainer.kubeflow.org", "v1alpha1", ns, "trainjobs", tj)

        def jobset():
            try:
                return co.get_namespaced_custom_object("jobset.x-k8s.io", "v1alpha2", ns, "jobsets", "tj")
            except k.ApiException as e:
                if e.status == 404:
                    return None
                raise

        js = wait_for("the TrainJob's JobSet", jobset)
        assert js["metadata"]["ownerReferences"][0]["kind"] == "TrainJob"
        # ... which the JobSet controller turns into Jobs.
        batch = k.BatchV1Api(xclient)
        wait_for("the JobSet's Job", lambda: [j for j in batch.list_namespaced_job(ns).items
                                              if j.metadata.name.startswith("tj-node-")])
    finally:
        co.delete_cluster_custom_object("trainer.kubeflow.org", "v1alpha1", "clustertrainingruntimes", rt_name)


def test_kueue_admits_within_quota_and_queues_the_rest(xcluster, xclient, ns):
    need(xcluster, "kueue")
    co, batch = k.CustomObjectsApi(xclient), k.BatchV1Api(xclient)
    g, v = "kueue.x-k8s.io", "v1beta2"
    flavor, cq = f"default-{ns}", f"cq-{ns}"
    co.create_cluster_custom_object(g, v, "resourceflavors", {
        "apiVersion": f"{g}/{v}", "kind": "ResourceFlavor", "metadata": {"name": flavor}})
    co.create_cluster_custom_object(g, v, "clusterqueues", {
        "apiVersion": f"{g}/{v}", "kind": "ClusterQueue", "metadata": {"name": cq},
        "spec": {"namespaceSelector": {}, "resourceGroups": [{
            "coveredResources": ["cpu", "memory", "nvidia.com/gpu"],
            "flavors": [{"name": flavor, "resources": [
                {"name": "cpu", "nominalQuota": "64"}, {"name": "memory", "nominalQuota": "256Gi"},
                {"name": "nvidia.com/gpu", "nominalQuota": "8"}]}]}]}})
    co.create_namespaced_custom_object(g, v, ns, "localqueues", {
        "apiVersion": f"{g}/{v}", "kind": "LocalQueue", "metadata": {"name": "lq"}, "spec": {"clusterQueue": cq}})
    try:
        for name in ("first", "second"):
            batch.create_namespaced_job(ns, {
                "apiVersion": "batch/v1", "kind": "Job",
                "metadata": {"name": name, "labels": {"kueue.x-k8s.io/queue-name": "lq"}},
                "spec": {"parallelism": 1, "completions": 1, "backoffLimit": 0,
                         "template": pod_template(gpus=8, hold=True)}})
            if name == "first":
                # Kueue's webhook created it suspended; admission (quota reserved) unsuspends it.
                wait_for("the first Job to be admitted", lambda: batch.read_namespaced_job(name, ns).spec.suspend is False)

        def pending_workload():
            for w in co.list_namespaced_custom_object(g, v, ns, "workloads")["items"]:
                owner = (w["metadata"].get("ownerReferences") or [{}])[0].get("name")
                conds = {c["type"]: c for c in (w.get("status") or {}).get("conditions") or []}
                if owner == "second" and conds.get("QuotaReserved", {}).get("status") == "False":
                    return conds["QuotaReserved"]
            return None

        cond = wait_for("the second Job's Workload to wait for quota", pending_workload)
        assert "nvidia.com/gpu" in cond.get("message", ""), cond
        assert batch.read_namespaced_job("second", ns).spec.suspend is True
        # The first finishes: its quota goes to the second.
        wait_for("the first Job's pod Running", lambda: [p for p in k.CoreV1Api(xclient).list_namespaced_pod(
            ns, label_selector="job-name=first").items if p.status.phase == "Running"])
        xcluster.set_pod_outcome(ns, "job-name=first", "succeed")
        wait_for("the second Job to be admitted", lambda: batch.read_namespaced_job("second", ns).spec.suspend is False)
    finally:
        for name in ("first", "second"):
            try:
                batch.delete_namespaced_job(name, ns, propagation_policy="Background")
            except k.ApiException:
                pass
