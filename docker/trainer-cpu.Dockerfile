# CPU trainer image for kind and the demo: the `cpu` engine (transformers model + torch.distributed gloo).
# Build from the repository root with BuildKit (Docker >= 20.10; no `# syntax` line, so no frontend image is
# pulled):  DOCKER_BUILDKIT=1 docker build -f docker/trainer-cpu.Dockerfile -t IMAGE .
# Where download.pytorch.org is unreachable, pass --build-arg TORCH_INDEX_URL= to take torch from PyPI (its
# Linux wheel carries the CUDA libraries: about 4 GB more). Behind a TLS-intercepting proxy, pass its CA
# bundle as a build secret: --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt (never stored in a layer).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
FROM ${PYTHON_IMAGE}

# Must equal the torch pin of pyproject.toml's trainer extra (tests/unit/test_images.py checks it).
ARG TORCH_VERSION=2.11.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=true

WORKDIR /opt/qwen-k8s-trainer

# The CPU-only torch wheel first (~200 MB instead of the CUDA one's gigabytes); the project's `torch==` pin
# is then already satisfied and pip keeps it. pip's cache lives in a BuildKit cache mount: rebuilds reuse
# the downloads and no layer keeps them.
RUN --mount=type=cache,target=/root/.cache/pip --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && if [ -n "${TORCH_INDEX_URL}" ]; then export PIP_INDEX_URL="${TORCH_INDEX_URL}"; fi \
 && pip install "torch==${TORCH_VERSION}"

COPY pyproject.toml README.md ./
COPY qwen_trainer qwen_trainer
COPY operator operator
RUN --mount=type=cache,target=/root/.cache/pip --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && pip install ".[trainer]" \
 && python -c "import torch, qwen_trainer.spec; assert not torch.cuda.is_available(); print('torch', torch.__version__)"

LABEL org.opencontainers.image.title="qwen-k8s trainer (CPU)" \
      org.opencontainers.image.source="https://github.com/qwen-k8s/qwen-k8s-trainer" \
      org.opencontainers.image.licenses="Apache-2.0" \
      dev.qwen.torch="${TORCH_VERSION}+cpu"

WORKDIR /workspace
CMD ["python", "-m", "qwen_trainer", "--help"]
