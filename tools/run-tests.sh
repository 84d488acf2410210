#!/usr/bin/env bash
# The whole test suite (`make test`, and so CI): tests/unit and tests/integration on the local control plane while
# the kind cluster of tests/kind comes up beside them, then tests/kind on that cluster. The cluster's setup is
# mostly Docker building and streaming images (disk and network), the tests mostly CPU, so running them side by
# side saves most of the setup's ten-odd minutes. The cluster (and a dockerd its setup started) is deleted at the
# end whatever happened; a failed setup fails the run with the end of its log.
#
#   tools/run-tests.sh [pytest arguments]     with QWEN_CONTROLPLANE_EXTRAS set as `make test` sets it
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PY:-.venv/bin/python}
export QWEN_REQUIRE_CLUSTER=1

work=$(mktemp -d "${TMPDIR:-/tmp}/qwen-kind-tests.XXXXXX")
up_log="$work/up.log"
echo "kind cluster for tests/kind: setting up in the background (log: $up_log)"
"$PY" tools/qwen_kind up --work "$work" --namespace qwen-kind --trainjob qwen-kind-trainjob >"$up_log" 2>&1 &
up_pid=$!

cleanup() {
    if kill -0 "$up_pid" 2>/dev/null; then
        kill -TERM "$up_pid" 2>/dev/null  # `up` unwinds and deletes what it started so far
        wait "$up_pid" 2>/dev/null
    fi
    "$PY" tools/qwen_kind down >>"$up_log" 2>&1 || echo "deleting the kind cluster failed (log: $up_log)"
}
trap cleanup EXIT

"$PY" -m pytest -ra --durations=25 "$@" tests/unit tests/integration
tests_rc=$?

echo "waiting for the kind cluster's setup"
if wait "$up_pid"; then
    grep -E '^\[kind\].*: [0-9.]+ s$' "$up_log" | sed 's/^/  setup: /' || true
    QWEN_KIND_ATTACH="$work" QWEN_KIND_TRAINJOB=1 "$PY" -m pytest -ra --durations=10 "$@" tests/kind
    kind_rc=$?
else
    echo "the kind cluster could not be set up; the end of its log ($up_log):"
    tail -n 40 "$up_log"
    kind_rc=1
fi
exit $(( tests_rc != 0 ? tests_rc : kind_rc ))
