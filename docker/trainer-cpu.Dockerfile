# syntax=docker/dockerfile:1
# CPU trainer image for kind and the demo: the `cpu` engine (transformers model + torch.distributed gloo).
# Build from the repository root:  docker build -f docker/trainer-cpu.Dockerfile -t IMAGE .
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
FROM ${PYTHON_IMAGE}

# Must equal the torch pin of pyproject.toml's trainer extra (tests/unit/test_images.py checks it).
ARG TORCH_VERSION=2.11.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=true

WORKDIR /opt/qwen-k8s-trainer

# The CPU-only torch wheel first (~200 MB instead of the CUDA one's gigabytes); the project's `torch==` pin
# is then already satisfied and pip keeps it.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

COPY pyproject.toml README.md ./
COPY qwen_trainer qwen_trainer
COPY operator operator
COPY tools/qwen_devcluster tools/qwen_devcluster
RUN pip install --no-cache-dir ".[trainer]" \
 && python -c "import torch, qwen_trainer.spec; assert not torch.cuda.is_available(); print('torch', torch.__version__)"

LABEL org.opencontainers.image.title="qwen-k8s trainer (CPU)" \
      org.opencontainers.image.source="https://github.com/qwen-k8s/qwen-k8s-trainer" \
      org.opencontainers.image.licenses="Apache-2.0" \
      dev.qwen.torch="${TORCH_VERSION}+cpu"

WORKDIR /workspace
CMD ["python", "-m", "qwen_trainer", "--help"]
