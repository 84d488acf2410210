# The two commands a newcomer needs:
#   make demo   set everything up and run the tiny Qwen-MoE job end to end on this machine
#   make test   set everything up and run the whole test suite (what CI runs)
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: test demo setup python controlplane unit integration crd manifests images push-images kind-e2e clean

setup: python controlplane

python:
	tools/setup-python.sh

controlplane:
	tools/build-controlplane.sh

test: setup
	QWEN_REQUIRE_CLUSTER=1 $(PY) -m pytest -ra $(PYTEST_ARGS) tests/unit tests/integration

unit: python
	$(PY) -m pytest -ra $(PYTEST_ARGS) tests/unit

integration: setup
	QWEN_REQUIRE_CLUSTER=1 $(PY) -m pytest -ra $(PYTEST_ARGS) tests/integration

demo: setup
	$(PY) tools/demo.py

crd: python
	$(VENV)/bin/qwenctl crd > manifests/crd/qwentrainingjobs.training.qwen.dev.yaml
	tools/render-manifests.sh

manifests: python
	tools/render-manifests.sh

images:
	$(MAKE) -C docker images

push-images:
	$(MAKE) -C docker push

kind-e2e:
	tools/kind-e2e.sh

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
