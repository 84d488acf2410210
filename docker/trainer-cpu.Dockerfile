# CPU trainer image for kind and the demo: the `cpu` engine (transformers model + torch.distributed gloo).
# Build from the repository root with BuildKit (Docker >= 20.10; no `# syntax` line, so no frontend image is
# pulled):  DOCKER_BUILDKIT=1 docker build -f docker/trainer-cpu.Dockerfile -t IMAGE .
# Where download.pytorch.org is unreachable, pass --build-arg TORCH_INDEX_URL= to take torch from PyPI: its
# Linux wheel needs the CUDA libraries (about 2.7 GB; libtorch links them, so `import torch` fails without
# them even on a CPU), and pulls in triton (0.6 GB, a GPU compiler), which this image removes again in the
# layer that installs it. Behind a TLS-intercepting proxy, pass its CA bundle as a build secret: --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt
# (never stored in a layer).
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

# 1. torch and every other pinned dependency in one layer, so that triton (which pip would put back for any
#    later requirement that names torch) never reaches the image. No pip cache: it would keep gigabytes of
#    CUDA wheels in Docker's build cache, and this layer is rebuilt only when pyproject.toml changes.
COPY pyproject.toml ./
COPY docker/pins.py docker/pins.py
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && (if [ -n "${TORCH_INDEX_URL}" ]; then export PIP_INDEX_URL="${TORCH_INDEX_URL}"; fi; \
     pip install --no-cache-dir "torch==${TORCH_VERSION}") \
 && python docker/pins.py requirements base,trainer --exclude torch > /tmp/requirements.txt \
 && pip install --no-cache-dir -r /tmp/requirements.txt \
 && if pip show --quiet triton 2>/dev/null; then pip uninstall -y triton; fi \
 && rm /tmp/requirements.txt \
 && python -c "import torch, torch.distributed as dist; assert not torch.cuda.is_available() and dist.is_gloo_available(); x = torch.ones(4, requires_grad=True); (x * x).sum().backward(); print('torch', torch.__version__)"

# 2. This project, without dependencies: they are all in place, and pip must not bring triton back.
COPY README.md ./
COPY qwen_trainer qwen_trainer
COPY operator operator
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && pip install --no-cache-dir --no-deps . \
 && python -c "import transformers, qwen_trainer.spec, qwen_trainer.engines.cpu; print('transformers', transformers.__version__)"

LABEL org.opencontainers.image.title="qwen-k8s trainer (CPU)" \
      org.opencontainers.image.source="https://github.com/qwen-k8s/qwen-k8s-trainer" \
      org.opencontainers.image.licenses="Apache-2.0" \
      dev.qwen.torch="${TORCH_VERSION}+cpu"

WORKDIR /workspace
CMD ["python", "-m", "qwen_trainer", "--help"]
