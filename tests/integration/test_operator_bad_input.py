"""What the operator says when the cluster lacks what a resource needs, on the real API server: the TrainJob
runtime is missing, Kueue is absent while a queue is named, or the Trainer v2 CRDs are absent while the operator
runs with the trainjob job API. Each gets one clear condition naming the setting or field, one Warning Event, no
traceback, and the operator keeps serving the other resources.

The last two need a cluster without Kueue and without Trainer v2: the session cluster when it runs no extras,
else a small one of its own (etcd, apiserver, controllers, kwok, training-operator)."""

from __future__ import annotations

import copy

import pytest
from kubernetes import client as k
from kubernetes.client.exceptions import ApiException

import qwen_devcluster
from tests.integration.conftest import TRAINJOB_EXTRAS, need_extras
from tests.integration.operator_support import (  # noqa: F401  (crds is a fixture)
    RUNTIME, Jobs, OperatorProcess, crds, install_crds, tiny_job, wait_for,
)

RESERVED_VOLUME = [{"name": "qwen-dshm", "claimName": "x", "mountPath": "/x"}]  # refused by the operator


def _warnings(jobs: Jobs, name: str, reason: str) -> list:
    return [e for e in jobs.events(name) if e.reason == reason and e.type == "Warning"]


def _attempts(op: OperatorProcess, name: str) -> int:
    """Reconcile attempts of `name` that ended in a temporary failure (kopf logs one line each)."""
    return sum(1 for r in op.log_records() if (r.get("object") or {}).get("name") == name
               and "failed temporarily" in r.get("message", ""))


def _no_traceback(op: OperatorProcess) -> None:
    assert "Traceback" not in op.output(), op.output()[-4000:]


def _still_serving(op: OperatorProcess, jobs: Jobs, namespace: str) -> None:
    """An invalid resource created meanwhile is still refused with its field (the operator has not stalled)."""
    jobs.create(tiny_job("other-bad", namespace, volumes=RESERVED_VOLUME))
    jobs.wait_phase("other-bad", "Invalid", 30)
    assert "spec.volumes[0].name" in jobs.condition("other-bad", "Failed")["message"]
    assert op.alive() and op.ready()


# ------------------------------------------------------------------------- TrainJob runtime missing


def test_missing_trainjob_runtime_is_reported_once_and_picked_up_when_it_appears(cluster, crds, namespace,
                                                                                 tmp_path, trainjob_runtimes):
    need_extras(cluster, *TRAINJOB_EXTRAS)
    missing = f"qwen-missing-{namespace}"
    op = OperatorProcess(cluster.kubeconfig, tmp_path, "--namespace", namespace, "--standalone",
                         "--job-api", "trainjob", "--trainjob-runtime", missing).start()
    custom = k.CustomObjectsApi(crds)
    try:
        op.wait_ready()
        jobs = Jobs(crds, namespace, "trainjob")
        jobs.create(tiny_job("needs-runtime", namespace))
        created = wait_for(lambda: (c := jobs.condition("needs-runtime", "Created")).get("reason")
                           == "TrainingRuntimeNotFound" and c, 30, what="Created False TrainingRuntimeNotFound")
        assert created["status"] == "False"
        assert created["message"].startswith(
            f"TrainJob needs-runtime was refused: its ClusterTrainingRuntime '{missing}' (operator setting "
            "--trainjob-runtime, chart value trainJob.runtime.name) does not exist")
        # The admission webhook quoted: Trainer v2's, or Kueue's (its TrainJob integration checks the runtime too;
        # whichever answers first).
        assert created["message"].endswith((
            f'ClusterTrainingRuntime.trainer.kubeflow.org "{missing}" not found: specified clusterTrainingRuntime '
            "must be created before the TrainJob is created", f"runtime '{missing}' not found")), created["message"]
        status = jobs.get("needs-runtime")["status"]
        assert status["phase"] == "Pending" and jobs.children() == []
        assert next(c for c in status["conditions"] if c["type"] == "Succeeded")["message"] == created["message"]
        (event,) = wait_for(lambda: _warnings(jobs, "needs-runtime", "TrainingRuntimeNotFound"), 30,
                            what="Warning Event")
        assert event.message == created["message"][:1024]
        # Tried again (10 s later), still one Event.
        wait_for(lambda: _attempts(op, "needs-runtime") >= 2, 40, what="a second attempt")
        assert len(_warnings(jobs, "needs-runtime", "TrainingRuntimeNotFound")) == 1
        _still_serving(op, jobs, namespace)
        _no_traceback(op)

        # The runtime is installed: the next attempt creates the TrainJob and it runs.
        doc = copy.deepcopy(trainjob_runtimes[RUNTIME])
        doc["metadata"]["name"] = missing
        custom.create_cluster_custom_object("trainer.kubeflow.org", "v1alpha1", "clustertrainingruntimes", doc)
        jobs.wait_phase("needs-runtime", "Running", 90)
        assert jobs.condition("needs-runtime", "Created")["status"] == "True"
        assert jobs.child("needs-runtime")["spec"]["runtimeRef"]["name"] == missing
    finally:
        op.stop()
        print(op.output()[-3000:])
        try:
            custom.delete_cluster_custom_object("trainer.kubeflow.org", "v1alpha1", "clustertrainingruntimes", missing)
        except ApiException as e:
            if e.status != 404:
                raise


# ------------------------------------------------------------- a cluster without Kueue or Trainer v2


@pytest.fixture(scope="module")
def bare(cluster):
    """(cluster, admin client) without Kueue and Trainer v2 CRDs, with the QwenTrainingJob CRD."""
    own = None
    if getattr(cluster, "extras", None):
        own = qwen_devcluster.start_cluster(None, cluster.bin_dir, gpu_nodes=1)
    c = own or cluster
    import kubernetes

    api = kubernetes.config.new_client_from_config(config_file=str(c.kubeconfig))
    ext = k.ApiextensionsV1Api(api)
    names = {crd.metadata.name for crd in ext.list_custom_resource_definition().items}
    assert not any(n.endswith((".kueue.x-k8s.io", ".trainer.kubeflow.org")) for n in names), names
    install_crds(api)
    try:
        yield c, api
    finally:
        api.close()
        if own is not None:
            own.stop()


@pytest.fixture
def bare_ns(bare):
    import uuid

    _, api = bare
    core = k.CoreV1Api(api)
    name = f"b-{uuid.uuid4().hex[:8]}"
    core.create_namespace(k.V1Namespace(metadata=k.V1ObjectMeta(name=name)))
    wait_for(lambda: core.read_namespaced_service_account("default", name), 30, what="default ServiceAccount")
    yield name
    core.delete_namespace(name)


def _operator(c, tmp_path, namespace, *args: str) -> OperatorProcess:
    return OperatorProcess(c.kubeconfig, tmp_path, "--namespace", namespace, "--standalone", *args).start()


def test_trainjob_api_absent_is_reported_and_the_operator_keeps_serving(bare, bare_ns, tmp_path):
    c, api = bare
    op = _operator(c, tmp_path, bare_ns, "--job-api", "trainjob")
    try:
        op.wait_ready()
        jobs = Jobs(api, bare_ns, "trainjob")
        jobs.create(tiny_job("no-trainer", bare_ns))
        created = wait_for(lambda: (c_ := jobs.condition("no-trainer", "Created")).get("reason")
                           == "JobAPINotInstalled" and c_, 30, what="Created False JobAPINotInstalled")
        assert created["status"] == "False"
        assert created["message"].startswith(
            "the operator setting jobApi (trainjob) creates a TrainJob, but this cluster does not serve "
            "trainjobs.trainer.kubeflow.org/v1alpha1 (Kubeflow Trainer v2): install it, or run the operator with "
            "--job-api pytorchjob (chart value jobApi)")
        assert jobs.phase("no-trainer") == "Pending"
        (event,) = wait_for(lambda: _warnings(jobs, "no-trainer", "JobAPINotInstalled"), 30, what="Warning Event")
        assert event.message == created["message"]
        wait_for(lambda: _attempts(op, "no-trainer") >= 2, 40, what="a second attempt")
        assert len(_warnings(jobs, "no-trainer", "JobAPINotInstalled")) == 1
        _still_serving(op, jobs, bare_ns)
        # The ConfigMap went first and stays (owned; the garbage collector removes it with the resource).
        assert [cm.metadata.name for cm in jobs.configmaps()] == ["no-trainer-spec"]
        _no_traceback(op)
    finally:
        op.stop()
        print(op.output()[-3000:])


def test_kueue_absent_while_a_queue_is_named(bare, bare_ns, tmp_path):
    c, api = bare
    op = _operator(c, tmp_path, bare_ns)
    try:
        op.wait_ready()
        jobs = Jobs(api, bare_ns, "pytorchjob")
        queued = tiny_job("wants-queue", bare_ns)
        queued["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "lq"}
        jobs.create(queued)
        condition = wait_for(lambda: (q := jobs.condition("wants-queue", "Queued")).get("reason")
                             == "KueueNotInstalled" and q, 30, what="Queued KueueNotInstalled")
        assert condition["status"] == "True"
        assert condition["message"].startswith(
            "metadata.labels[kueue.x-k8s.io/queue-name] names the Kueue queue 'lq' but Kueue is not installed (the "
            "cluster does not serve kueue.x-k8s.io/v1beta2): PyTorchJob wants-queue stays suspended until Kueue "
            "admits it; install Kueue, or remove the queue name")
        assert jobs.get("wants-queue")["status"]["phase"] == "Queued"
        # The child exists, suspended and labelled for Kueue (it is admitted if Kueue is installed later).
        assert jobs.child_suspended("wants-queue") is True
        assert jobs.child("wants-queue")["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "lq"
        assert jobs.pods("wants-queue") == []
        (event,) = wait_for(lambda: _warnings(jobs, "wants-queue", "KueueNotInstalled"), 30, what="Warning Event")
        assert event.message == condition["message"]
        # A resource without a queue runs as usual meanwhile.
        jobs.create(tiny_job("no-queue", bare_ns))
        jobs.wait_phase("no-queue", "Running", 60)
        assert jobs.condition("no-queue", "Queued") == {}
        assert len(_warnings(jobs, "wants-queue", "KueueNotInstalled")) == 1
        _still_serving(op, jobs, bare_ns)
        _no_traceback(op)
    finally:
        op.stop()
        print(op.output()[-3000:])
