"""What a user sees when things go wrong, on the real control plane (kwok fails pods with an exit code, reason and
termination message): the Failed condition and a Warning Event name the pod, exit code, reason and the trainer's
error; replica counts come from the pods; restarts are counted with Restarting True meanwhile; Normal Events for
Created, Running and Succeeded; refusals carry field paths; names up to 63 characters run; the trainer
ServiceAccount is used by default where it exists."""

from __future__ import annotations

import pytest
from kubernetes import client as k
from kubernetes.client.exceptions import ApiException

from tests.integration.operator_support import (  # noqa: F401  (crds, jobs, operator are fixtures)
    both_apis, crds, jobs, operator, tiny_job, wait_for,
)

MESSAGE = "rank 0 crashed: OutOfMemoryError: CUDA out of memory"


def _events(jobs, name, reason):
    return [e for e in jobs.events(name) if e.reason == reason]


@both_apis
@pytest.mark.no_restarts
def test_failed_pod_is_named_with_exit_code_reason_and_message(cluster, operator, jobs, namespace):
    jobs.create(tiny_job("oom", namespace, runPolicy={"restartPolicy": "Never", "backoffLimit": 0}))
    (pod,) = wait_for(lambda: [p for p in jobs.pods("oom") if p.status.phase == "Running"], 60, what="pod Running")
    pod_name, replica, container = pod.metadata.name, jobs.child_api.replica, jobs.child_api.container
    jobs.wait_phase("oom", "Running", 30)
    cluster.set_pod_outcome(namespace, "training.qwen.dev/job=oom", "fail", delay="1s", exit_code=137,
                            reason="OOMKilled", message=MESSAGE)
    jobs.wait_phase("oom", "Failed", 60)
    failed = wait_for(lambda: (c := jobs.condition("oom", "Failed")) and pod_name in c.get("message", "") and c,
                      30, what="Failed condition naming the pod")
    msg = failed["message"]
    assert f"{replica} replica pod {pod_name} exited with code 137 (OOMKilled): " + MESSAGE in msg
    if jobs.child_api.kind == "TrainJob":
        # A JobSet out of restarts keeps its failed pods: the logs are there.
        assert f"kubectl logs -n {namespace} {pod_name} -c {container}" in msg
        assert [p.metadata.name for p in jobs.pods("oom")] == [pod_name]
    elif "reached the specified backoff limit" in msg:
        # The training-operator failed the job for its backoffLimit and deletes its pods, cleanPodPolicy None or not.
        assert "The pod is deleted: the job reached spec.runPolicy.backoffLimit (0)" in msg and "kubectl logs" not in msg
        # By UID: a reconcile that raced its own status update may start a fresh pod under the same name.
        wait_for(lambda: pod.metadata.uid not in {p.metadata.uid for p in jobs.pods("oom")}, 30,
                 what="the failed pod deleted by the training-operator")
    else:
        # ... or through the Master replica's failure (whichever its reconcile saw first), keeping the pod.
        assert "Master replica(s) failed" in msg and f"Logs: kubectl logs -n {namespace} {pod_name} -c pytorch" in msg
        assert [p.metadata.name for p in jobs.pods("oom")] == [pod_name]
    assert jobs.condition("oom", "Succeeded")["message"] == msg
    status = jobs.get("oom")["status"]
    assert status["replicas"][replica]["failed"] == 1 and status["replicas"][replica]["active"] == 0
    assert status["failures"][-1]["exitCode"] == 137 and status["failures"][-1]["message"] == MESSAGE
    warned = wait_for(lambda: [e for e in jobs.events("oom") if e.type == "Warning" and "137" in (e.message or "")],
                      30, what="Warning Event with the exit code")
    assert any("OOMKilled" in e.message and MESSAGE in e.message for e in warned)
    for reason in ("Created", "Running"):
        assert wait_for(lambda: [e for e in _events(jobs, "oom", reason) if e.type == "Normal"], 30, what=reason)
    # The pod (rendered, or from the chart's runtime) keeps the log's tail when the trainer wrote no message.
    spec_container = next(c for c in pod.spec.containers if c.name == container)
    assert spec_container.termination_message_policy == "FallbackToLogsOnError"
    # No restart was announced: none happens.
    assert not _events(jobs, "oom", "Restarted") and jobs.condition("oom", "Restarting")["status"] == "False"


@both_apis
def test_restarts_are_counted_with_restarting_true_meanwhile(cluster, operator, jobs, namespace):
    """PyTorchJob: the training-operator replaces the failed pod; TrainJob: the JobSet restarts every node
    (runtime failurePolicy.maxRestarts 3)."""
    jobs.create(tiny_job("flaky", namespace, runPolicy={"restartPolicy": "OnFailure", "backoffLimit": 3}))
    first = wait_for(lambda: [p for p in jobs.pods("flaky") if p.status.phase == "Running"], 60, what="pod Running")
    jobs.wait_phase("flaky", "Running", 30)
    cluster.set_pod_outcome(namespace, "training.qwen.dev/job=flaky", "fail", delay="1s", exit_code=1,
                            message="nccl timeout")
    # Restarting turns True while the pod is replaced (seen here, or by its transition time and the Events).
    failed = wait_for(lambda: _events(jobs, "flaky", "PodFailed"), 60, what="PodFailed event")
    assert first[0].metadata.name in failed[0].message and "nccl timeout" in failed[0].message
    wait_for(lambda: [p for p in jobs.pods("flaky") if p.status.phase == "Running"
                      and p.metadata.uid != first[0].metadata.uid], 90, what="replacement pod Running")
    def restarted():
        # A TrainJob's phase follows its JobSet, which reports the new pods a moment after they run.
        r = jobs.get("flaky")
        restarting = next(c for c in r["status"]["conditions"] if c["type"] == "Restarting")
        return (r["status"].get("restarts") == 1 and restarting["status"] == "False"
                and r["status"]["phase"] == "Running" and r)

    done = wait_for(restarted, 60, what="restart counted, Restarting False again, Running")
    replica = jobs.child_api.replica
    assert done["status"]["replicas"][replica]["restarts"] == 1
    assert done["status"]["replicas"][replica]["failed"] >= 1
    assert done["status"]["failures"][-1]["message"] == "nccl timeout"
    assert wait_for(lambda: _events(jobs, "flaky", "Restarted"), 30, what="Restarted event")
    # It then succeeds: a Normal Event says so, with how long it ran.
    cluster.set_pod_outcome(namespace, "training.qwen.dev/job=flaky", "succeed", delay="1s")
    done = jobs.wait_phase("flaky", "Succeeded", 60)
    assert done["status"]["duration"].endswith("s")
    assert wait_for(lambda: _events(jobs, "flaky", "Succeeded"), 30, what="Succeeded event")


@both_apis
def test_63_character_names_run_and_refusals_carry_field_paths(cluster, operator, jobs, namespace):
    name = "a-very-long-training-job-name-for-the-qwen-operator-tests-63chr"
    assert len(name) == 63
    jobs.create(tiny_job(name, namespace))
    pj = wait_for(lambda: jobs.children(), 30, what=jobs.child_api.kind)[0]
    assert len(pj["metadata"]["name"]) <= 45 and pj["metadata"]["name"] != name
    jobs.wait_phase(name, "Running", 60)
    assert all(len(p.metadata.name) <= 63 for p in jobs.pods(name))

    with pytest.raises(ApiException) as err:
        jobs.create(tiny_job(name + "x", namespace))
    assert err.value.status == 422 and "metadata.name" in err.value.body and "63" in err.value.body

    cpu_7b = tiny_job("cpu-7b", namespace, stage="pretrain",
                      model={"family": "qwen2.5", "size": "7B", "backend": "megatron-core"},
                      training={"globalBatchSize": 8, "trainIters": 10, "transformerEngine": True},
                      data={"pretrain": {"prefixes": [{"path": "/data/p"}]}})
    with pytest.raises(ApiException) as err:
        jobs.create(cpu_7b)
    body = err.value.body
    assert err.value.status == 422
    assert "spec.resources.gpusPerNode" in body and "Transformer Engine" in body
    assert "spec.resources" in body and "resources.memory" in body


@both_apis
def test_trainer_service_account_is_used_where_it_exists(cluster, operator, jobs, namespace):
    # (Where it does not exist the pods run as `default`, as in every other test of this suite.)
    k.CoreV1Api(jobs.api).create_namespaced_service_account(
        namespace, k.V1ServiceAccount(metadata=k.V1ObjectMeta(name="qwen-trainer")))
    jobs.create(tiny_job("with-account", namespace))
    pod = wait_for(lambda: jobs.pods("with-account"), 60, what="pod")[0]
    assert pod.spec.service_account_name == "qwen-trainer"
    jobs.create(tiny_job("own-account", namespace, serviceAccountName="default"))
    pod = wait_for(lambda: jobs.pods("own-account"), 60, what="pod")[0]
    assert pod.spec.service_account_name == "default"
    jobs.wait_phase("with-account", "Running", 60)
    assert jobs.condition("with-account", "Synced")["status"] == "True"


def test_a_stage_whose_memory_estimate_misses_the_card_is_warned_and_still_created(cluster, operator, jobs, namespace):
    """Qwen2.5-7B pretraining on one 80 GB card without model parallelism or the distributed optimizer: the
    estimate (qwenctl explain's) is about 140-150 GiB per GPU. The resource runs anyway (the estimate is a guide), with
    MemoryFits False saying what to change and one Warning Event."""
    jobs.create(tiny_job("too-big", namespace, stage="pretrain", model={"family": "qwen2.5", "size": "7B"},
                         checkpoint={"output": {"path": "/data/out"}},
                         data={"pretrain": {"prefixes": [{"path": "/data/c_text_document"}]}},
                         training={"globalBatchSize": 8, "microBatchSize": 1, "seqLength": 4096, "trainIters": 100},
                         parallelism={"tensor": 1, "pipeline": 1, "distributedOptimizer": False},
                         image={"name": "ghcr.io/qwen-k8s/trainer:0.1.0"},
                         resources={"nodes": 1, "gpusPerNode": 1}))
    fits = wait_for(lambda: jobs.condition("too-big", "MemoryFits"), 60, what="MemoryFits condition")
    assert fits["status"] == "False" and fits["reason"] == "MemoryEstimateExceedsDevice"
    need = float(fits["message"].split("estimated ")[1].split(" GiB")[0])
    assert need > 79 and "exceeds the 79 GiB" in fits["message"]
    warned = wait_for(lambda: _events(jobs, "too-big", "MemoryEstimateExceedsDevice"), 30, what="Warning Event")
    assert warned[0].type == "Warning"
    assert jobs.child("too-big") is not None
