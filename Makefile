# The two commands a newcomer needs:
#   make demo   set everything up and run the tiny Qwen-MoE job end to end on this machine
#   make test   set everything up and run the whole test suite (what CI runs): unit and integration
#               tests on the local control plane while the kind cluster comes up beside them, then real pods
#               in kind (tests/kind; tools/run-tests.sh)
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# The opt-in controllers the integration tests run both job APIs and Kueue on (Kubeflow Trainer v2, JobSet, Kueue).
EXTRAS ?= jobset,trainer-v2,kueue

.PHONY: test demo setup python controlplane extras unit integration crd manifests images push-images kind-e2e kind-up kind-down clean

setup: python controlplane

python:
	tools/setup-python.sh

controlplane:
	tools/build-controlplane.sh

extras:
	QWEN_CONTROLPLANE_EXTRAS=$(EXTRAS) tools/build-controlplane.sh

# Every Go-built binary in one build run (they share its temporary Go build cache): the control plane, the
# extras and kind's node parts.
test: python
	QWEN_CONTROLPLANE_EXTRAS=$(EXTRAS) tools/build-controlplane.sh --with-kind
	QWEN_CONTROLPLANE_EXTRAS=$(EXTRAS) PY=$(PY) tools/run-tests.sh $(PYTEST_ARGS)

unit: python
	$(PY) -m pytest -ra $(PYTEST_ARGS) tests/unit

integration: setup extras
	QWEN_REQUIRE_CLUSTER=1 QWEN_CONTROLPLANE_EXTRAS=$(EXTRAS) $(PY) -m pytest -ra $(PYTEST_ARGS) tests/integration

demo: setup
	$(PY) tools/demo.py

crd: python
	$(VENV)/bin/qwenctl crd > manifests/crd/qwentrainingjobs.training.qwen.dev.yaml
	tools/render-manifests.sh

manifests: python
	tools/render-manifests.sh

# The operator and CPU trainer images plus everything kind needs, built here on a locally made Debian base
# (docker/Makefile alone builds on the public bases where a registry is reachable).
images: setup
	$(PY) tools/qwen_kind images

push-images:
	$(MAKE) -C docker push

# Real pods: Docker (started if none runs), the images, a kind cluster, the tests in tests/kind; all stopped after.
kind-e2e: setup
	QWEN_REQUIRE_CLUSTER=1 QWEN_KIND_TRAINJOB=1 $(PY) -m pytest -ra $(PYTEST_ARGS) tests/kind

kind-up: setup
	$(PY) tools/qwen_kind up

kind-down: python
	$(PY) tools/qwen_kind down

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
