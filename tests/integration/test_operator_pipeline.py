"""A three-step pipeline on the real control plane: steps run in order as separate child jobs (PyTorchJobs on the
training-operator, TrainJobs on Trainer v2) with the right inputs, a failing middle step stops the chain naming the
step, and re-applying a fix resumes from that step."""

from __future__ import annotations

import copy

import pytest
import yaml

from tests.integration.operator_support import (  # noqa: F401  (crds, jobs, operator are fixtures)
    EXAMPLES, Jobs, both_apis, crds, ensure_pvcs, example, jobs, operator, wait_for,
)

NAME = "cpu-tiny-moe-pipeline"


def _step_job(jobs: Jobs, child: str) -> dict:
    return wait_for(lambda: jobs.child(child), 60, what=f"{jobs.child_api.kind} {child}")


def _job_yaml(jobs: Jobs, child: str) -> dict:
    cm = jobs.core.read_namespaced_config_map(f"{child}-spec", jobs.ns)
    return yaml.safe_load(cm.data["job.yaml"])["spec"]


def _finish(cluster, jobs: Jobs, child: str, outcome: str) -> None:
    wait_for(lambda: (pods := jobs.child_pods(child)) and all(p.status.phase == "Running" for p in pods), 60,
             what=f"pods of {child} Running")
    cluster.set_pod_outcome(jobs.ns, jobs.child_api.pod_selector(child), outcome, delay="1s")


@both_apis
@pytest.mark.no_restarts
def test_pipeline_runs_in_order_stops_on_failure_and_resumes_after_a_fix(cluster, operator, jobs, namespace):
    doc = example(EXAMPLES / "cpu-pipeline.yaml", namespace)
    doc["spec"]["runPolicy"] = {"backoffLimit": 0, "restartPolicy": "Never"}  # a failed pod fails its step at once
    ensure_pvcs(jobs.api, namespace, {v["claimName"] for v in doc["spec"]["volumes"]})
    jobs.create(doc)

    # Step 1: convert reads the shared source.
    convert = _step_job(jobs, f"{NAME}-convert")
    assert _job_yaml(jobs, f"{NAME}-convert")["checkpoint"]["source"] == {"path": "/data/tiny-moe-hf", "format": "hf"}
    wait_for(lambda: (jobs.get(NAME).get("status") or {}).get("currentStage") == "convert", 30, what="currentStage")
    _finish(cluster, jobs, f"{NAME}-convert", "succeed")

    # Step 2: pretrain reads what convert wrote; it fails.
    _step_job(jobs, f"{NAME}-pretrain")
    assert _job_yaml(jobs, f"{NAME}-pretrain")["checkpoint"]["source"] == {"path": "/data/pipeline/mcore", "format": "mcore"}
    _finish(cluster, jobs, f"{NAME}-pretrain", "fail")
    failed = jobs.wait_phase(NAME, "Failed", 60)
    message = next(c for c in failed["status"]["conditions"] if c["type"] == "Failed")["message"]
    assert message.startswith("stage pretrain (2/3) failed"), message
    assert [s["phase"] for s in failed["status"]["stages"]] == ["Succeeded", "Failed", "Pending"]
    assert not any(p["metadata"]["name"].endswith("-export") for p in jobs.children())

    # Fix the failed step and re-apply: it runs again (new attempt), convert does not.
    fixed = copy.deepcopy(jobs.get(NAME)["spec"]["pipeline"])
    fixed[1]["training"]["trainIters"] = 20
    jobs.patch(NAME, {"spec": {"pipeline": fixed}})
    _step_job(jobs, f"{NAME}-pretrain-r1")
    assert jobs.child(f"{NAME}-convert")["metadata"]["uid"] == convert["metadata"]["uid"]
    assert _job_yaml(jobs, f"{NAME}-pretrain-r1")["training"]["trainIters"] == 20
    _finish(cluster, jobs, f"{NAME}-pretrain-r1", "succeed")

    # Step 3: export reads what pretrain wrote; then the whole job has succeeded.
    _step_job(jobs, f"{NAME}-export")
    assert _job_yaml(jobs, f"{NAME}-export")["checkpoint"]["source"] == {"path": "/data/pipeline/pretrain", "format": "mcore"}
    _finish(cluster, jobs, f"{NAME}-export", "succeed")
    done = jobs.wait_phase(NAME, "Succeeded", 60)
    assert [s["phase"] for s in done["status"]["stages"]] == ["Succeeded"] * 3
    assert [s["attempt"] for s in done["status"]["stages"]] == [0, 1, 0]
    assert sorted(p["metadata"]["name"] for p in jobs.children()) == sorted(
        [f"{NAME}-convert", f"{NAME}-pretrain", f"{NAME}-pretrain-r1", f"{NAME}-export"])

