#!/usr/bin/env bash
# End-to-end run on a kind cluster: create the cluster, install the Kubeflow training-operator
# v1.9 (kustomize), build and load our images, install charts/qwen-training-operator, and run
# pytest tests/e2e against the cluster's kubeconfig.
#
# THIS NEEDS DOCKER (kind runs its nodes as containers) and the ability to pull the kind node
# image and the training-operator image. It cannot run on the project's CI machines, which have
# no Docker; there, tests/integration runs against the Docker-free control plane from
# tools/build-controlplane.sh instead. Use this script on a workstation or a Docker-capable runner.
#
# Requires: docker, kind, kubectl (>= 1.27, for --server-side with -k), helm 3, python with the
# project's dev/operator extras. helm may be the one tools/build-controlplane.sh builds.
#
# Environment (all optional):
#   KIND_CLUSTER_NAME      cluster name (default: qwen-e2e)
#   KIND_NODE_IMAGE        node image, e.g. kindest/node:v1.34.0 (default: kind's own default)
#   KEEP_CLUSTER=1         do not delete the cluster at the end
#   TRAINING_OPERATOR_REF  training-operator version for its manifests (default: from
#                          tools/controlplane/training-operator/go.mod, e.g. v1.9.3)
#   OPERATOR_IMAGE         operator image to build/load (default: qwen-operator:e2e)
#   TRAINER_IMAGE          CPU trainer image to build/load (default: qwen-trainer-cpu:e2e)
#   SKIP_IMAGE_BUILD=1     load the images as they are, do not docker build them
#   CHART_NAMESPACE        namespace for the chart (default: qwen-system)
#   HELM_EXTRA_ARGS        extra arguments for `helm upgrade --install` (e.g. --set overrides)
#   PYTEST_ARGS            extra pytest arguments
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

CLUSTER="${KIND_CLUSTER_NAME:-qwen-e2e}"
CHART_NS="${CHART_NAMESPACE:-qwen-system}"
OPERATOR_IMAGE="${OPERATOR_IMAGE:-qwen-operator:e2e}"
TRAINER_IMAGE="${TRAINER_IMAGE:-qwen-trainer-cpu:e2e}"
TFO_REF="${TRAINING_OPERATOR_REF:-$(awk '$1=="github.com/kubeflow/training-operator"{print $2; exit}' tools/controlplane/training-operator/go.mod)}"
WORK="$(mktemp -d)"
KUBECONFIG_FILE="$WORK/kubeconfig"

need() { command -v "$1" >/dev/null 2>&1 || { echo "kind-e2e: '$1' is required but not on PATH" >&2; exit 1; }; }
need docker
need kind
need kubectl
if ! command -v helm >/dev/null 2>&1; then
  # Fall back to the helm built from Go modules by tools/build-controlplane.sh.
  if BIN="$(tools/build-controlplane.sh --print-bin-dir 2>/dev/null)" && [[ -x "$BIN/helm" ]]; then
    PATH="$BIN:$PATH"
  fi
fi
need helm
docker info >/dev/null 2>&1 || { echo "kind-e2e: docker is installed but the daemon is not reachable" >&2; exit 1; }

cleanup() {
  if [[ "${KEEP_CLUSTER:-}" == 1 ]]; then
    echo "kind-e2e: keeping cluster '$CLUSTER' (KUBECONFIG=$KUBECONFIG_FILE)"
  else
    kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT

echo "kind-e2e: creating kind cluster '$CLUSTER'"
kind_args=(--name "$CLUSTER" --kubeconfig "$KUBECONFIG_FILE" --wait 120s)
[[ -n "${KIND_NODE_IMAGE:-}" ]] && kind_args+=(--image "$KIND_NODE_IMAGE")
kind create cluster "${kind_args[@]}"
export KUBECONFIG="$KUBECONFIG_FILE"

# Training-operator manifests: prefer the copy in the Go module cache (same version as the
# binary the integration tests run), else kustomize's remote git reference.
echo "kind-e2e: installing the Kubeflow training-operator $TFO_REF"
tfo_src=""
if command -v go >/dev/null 2>&1; then
  tfo_dir="$(cd tools/controlplane/training-operator && go mod download -json "github.com/kubeflow/training-operator@$TFO_REF" 2>/dev/null \
    | awk -F'"' '$2=="Dir"{print $4}')" || true
  if [[ -n "$tfo_dir" && -d "$tfo_dir/manifests/overlays/standalone" ]]; then
    # The module cache is read-only and kustomize only reads, but copy it so relative paths stay simple.
    cp -r "$tfo_dir/manifests" "$WORK/tfo-manifests" && chmod -R u+w "$WORK/tfo-manifests"
    tfo_src="$WORK/tfo-manifests/overlays/standalone"
  fi
fi
[[ -n "$tfo_src" ]] || tfo_src="github.com/kubeflow/training-operator.git/manifests/overlays/standalone?ref=$TFO_REF"
# Server-side apply: the PyTorchJob CRD is too big for client-side apply's annotation.
kubectl apply --server-side --force-conflicts -k "$tfo_src"
kubectl -n kubeflow rollout status deployment/training-operator --timeout=300s

echo "kind-e2e: images"
if [[ "${SKIP_IMAGE_BUILD:-}" != 1 ]]; then
  [[ -f docker/operator.Dockerfile ]] && docker build -f docker/operator.Dockerfile -t "$OPERATOR_IMAGE" .
  [[ -f docker/trainer-cpu.Dockerfile ]] && docker build -f docker/trainer-cpu.Dockerfile -t "$TRAINER_IMAGE" .
fi
for img in "$OPERATOR_IMAGE" "$TRAINER_IMAGE"; do
  if docker image inspect "$img" >/dev/null 2>&1; then
    kind load docker-image --name "$CLUSTER" "$img"
  else
    echo "kind-e2e: warning: image $img not found locally, not loaded" >&2
  fi
done

echo "kind-e2e: installing charts/qwen-training-operator into $CHART_NS"
[[ -d charts/qwen-training-operator ]] || { echo "kind-e2e: charts/qwen-training-operator does not exist" >&2; exit 1; }
# Image values are passed as repository/tag; adjust with HELM_EXTRA_ARGS if the chart names them differently.
# shellcheck disable=SC2086
helm upgrade --install qwen-training-operator charts/qwen-training-operator \
  --namespace "$CHART_NS" --create-namespace --wait --timeout 5m \
  --set "image.repository=${OPERATOR_IMAGE%:*}" --set "image.tag=${OPERATOR_IMAGE##*:}" --set image.pullPolicy=IfNotPresent \
  ${HELM_EXTRA_ARGS:-}

echo "kind-e2e: running tests/e2e"
# shellcheck disable=SC2086
QWEN_E2E=1 QWEN_E2E_NAMESPACE="$CHART_NS" QWEN_E2E_TRAINER_IMAGE="$TRAINER_IMAGE" \
  python -m pytest tests/e2e -v ${PYTEST_ARGS:-}
