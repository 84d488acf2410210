#!/usr/bin/env bash
# Build wheels for MegaBlocks and its CUDA dependencies on a machine with a GPU, nvcc and torch.
#
# PyPI carries only source distributions of megablocks (CUDA ops extension), grouped_gemm (CUTLASS kernels) and
# stanford-stk; megablocks 0.10.0 also pins torch<2.7.1, so it is built and installed without its dependency
# pins (--no-deps) against the torch already in the image. The wheels are built once per (torch, CUDA, GPU arch)
# and carried to machines without internet.
#
# docker/trainer-gpu.Dockerfile runs it too (with TORCH_CUDA_ARCH_LIST set, as a build has no GPU).
#
# Usage: tools/build-megablocks-wheels.sh SDIST_DIR OUT_DIR
#   SDIST_DIR holds megablocks-0.10.0.tar.gz, grouped_gemm-0.3.0.tar.gz, stanford_stk-0.7.1.tar.gz
#   (fetch them with: pip download --no-deps --no-binary=:all: --no-build-isolation ..., or from files.pythonhosted.org)
set -euo pipefail

SDIST_DIR="${1:?usage: build-megablocks-wheels.sh SDIST_DIR OUT_DIR}"
OUT_DIR="${2:?usage: build-megablocks-wheels.sh SDIST_DIR OUT_DIR}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT_DIR"

command -v nvcc >/dev/null || [[ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]] \
  || { echo "build-megablocks-wheels: nvcc not found (set CUDA_HOME)" >&2; exit 1; }
export PATH="${CUDA_HOME:-/usr/local/cuda}/bin:$PATH"

# The GPU's own architecture, unless TORCH_CUDA_ARCH_LIST names them (an image build has no GPU).
if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
  TORCH_CUDA_ARCH_LIST="$("$PY" -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}.{n}")')"
fi
export TORCH_CUDA_ARCH_LIST
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
echo "build-megablocks-wheels: torch $("$PY" -c 'import torch; print(torch.__version__)'), arch $TORCH_CUDA_ARCH_LIST, $MAX_JOBS jobs"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
for name in stanford_stk-0.7.1 grouped_gemm-0.3.0 megablocks-0.10.0; do
  if compgen -G "$OUT_DIR/$name-*.whl" >/dev/null; then echo "build-megablocks-wheels: $name already built"; continue; fi
  tar -xzf "$SDIST_DIR/$name.tar.gz" -C "$work"
  if [[ $name == megablocks-* ]]; then
    # CUB (CUDA >= 12.x) dropped the DeviceScan overloads that take a trailing debug_synchronous flag, which
    # megablocks' csrc/cumsum.h still passes; the flag only turned on CUB's debug logging, so it is dropped.
    "$PY" - "$work/$name/csrc/cumsum.h" <<'PATCH'
import re, sys
path = sys.argv[1]
text, count = re.subn(r"stream,\s*debug_synchronous\)", "stream)", open(path).read())
if count != 2:
    sys.exit(f"build-megablocks-wheels: expected 2 DeviceScan calls to patch in {path}, found {count}")
open(path, "w").write(text)
PATCH
  fi
  start=$(date +%s)
  "$PY" -m pip wheel --no-deps --no-build-isolation --no-index -w "$OUT_DIR" "$work/$name"
  echo "build-megablocks-wheels: $name built in $(( $(date +%s) - start )) s"
done
ls -la "$OUT_DIR"
