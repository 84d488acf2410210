# syntax=docker/dockerfile:1
# GPU trainer image: NGC PyTorch + megatron-core + MegaBlocks + this project's `qwen_trainer` package.
#
# Base: nvcr.io/nvidia/pytorch:25.12-py3 (PyTorch 2.10.0a0, CUDA 13.1, Python 3.12). The NGC image brings the
# CUDA build of torch, Transformer Engine, NCCL, cuDNN, Apex and triton, all built and tested together;
# we keep them and never let pip replace them (see the constraint handling below). megatron-core 0.16
# accepts torch >= 2.6 and Transformer Engine 2.9-2.11 for CUDA 13, which is what this base carries.
# Build from the repository root:  docker build -f docker/trainer-gpu.Dockerfile -t IMAGE .
ARG NGC_PYTORCH_TAG=25.12-py3
FROM nvcr.io/nvidia/pytorch:${NGC_PYTORCH_TAG}

# Pins that must equal pyproject.toml (tests/unit/test_images.py checks them).
ARG MEGATRON_CORE_VERSION=0.16.1
ARG MEGABLOCKS_VERSION=0.10.0
ARG FLASH_ATTN_VERSION=2.8.3.post2
# MegaBlocks' own dependencies, pinned to what megablocks==0.10.0 declares.
ARG STANFORD_STK_VERSION=0.7.1
ARG GROUPED_GEMM_VERSION=0.3.0
# Kernels are compiled without a GPU in the build, so the target architectures are given here
# (A100, H100/H200).
ARG TORCH_CUDA_ARCH_LIST="8.0 9.0"
ARG MAX_JOBS=8

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    MAX_JOBS=${MAX_JOBS} \
    CUDA_DEVICE_MAX_CONNECTIONS=1 \
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=true

WORKDIR /opt/qwen-k8s-trainer

# 1. What we take from the base image: a CUDA torch and Transformer Engine. Fail early if a tag lacks them.
RUN python -c "import torch, transformer_engine; assert torch.version.cuda, 'torch without CUDA'; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformer-engine', transformer_engine.__version__)"

# 2. Our pinned Python dependencies, except torch (kept from the base image). NGC's /etc/pip/constraint.txt
#    pins every package of the image; we keep it, minus the packages this project pins itself.
COPY pyproject.toml README.md ./
COPY docker/pins.py docker/pins.py
RUN python docker/pins.py requirements base,trainer --exclude torch megatron-core > /tmp/requirements.txt \
 && echo "megatron-core==${MEGATRON_CORE_VERSION}" >> /tmp/requirements.txt \
 && python docker/pins.py constraints /etc/pip/constraint.txt /tmp/requirements.txt > /tmp/constraint.txt \
 && PIP_CONSTRAINT=/tmp/constraint.txt pip install --no-cache-dir -r /tmp/requirements.txt

# 3. flash-attn: use the base image's if it has one, otherwise build the pinned version against its torch.
RUN python -c "import flash_attn; print('flash-attn', flash_attn.__version__, '(from the base image)')" \
 || PIP_CONSTRAINT=/tmp/constraint.txt pip install --no-cache-dir --no-build-isolation "flash-attn==${FLASH_ATTN_VERSION}"

# 4. MegaBlocks. Its metadata asks for torch<2.7.1 and packaging<24.2 (megatron-core wants >=24.2), so it is
#    installed without dependency resolution, against the base image's torch, with its dependencies pinned
#    here: stanford-stk (block-sparse kernels on triton, which the base image has) and grouped_gemm. PyPI has
#    only their sources, and megablocks' CUDA code needs a one-line fix for CUDA 13's CUB: the wheels are
#    built by the same script that builds them on a GPU machine (tools/build-megablocks-wheels.sh).
COPY tools/build-megablocks-wheels.sh /tmp/build-megablocks-wheels.sh
RUN pip download --no-cache-dir --no-deps --no-binary=:all: -d /tmp/mb-src \
        "stanford-stk==${STANFORD_STK_VERSION}" \
        "grouped_gemm==${GROUPED_GEMM_VERSION}" \
        "megablocks==${MEGABLOCKS_VERSION}" \
 && TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}" MAX_JOBS="${MAX_JOBS}" \
    bash /tmp/build-megablocks-wheels.sh /tmp/mb-src /tmp/mb-wheels \
 && pip install --no-cache-dir --no-deps /tmp/mb-wheels/*.whl \
 && python -c "import megablocks, grouped_gemm, stk; print('megablocks', megablocks.__version__)" \
 && rm -rf /tmp/mb-src /tmp/mb-wheels /tmp/build-megablocks-wheels.sh

# 5. This project, without dependencies: they are all in place, and torch must stay the base image's.
COPY qwen_trainer qwen_trainer
COPY operator operator
RUN pip install --no-cache-dir --no-deps . \
 && python -c "import megatron.core, transformers, qwen_trainer.spec; print('megatron-core', megatron.core.__version__)" \
 && rm -rf /tmp/requirements.txt /tmp/constraint.txt

LABEL org.opencontainers.image.title="qwen-k8s trainer (GPU)" \
      org.opencontainers.image.source="https://github.com/qwen-k8s/qwen-k8s-trainer" \
      org.opencontainers.image.licenses="Apache-2.0" \
      dev.qwen.base-image="nvcr.io/nvidia/pytorch:${NGC_PYTORCH_TAG}" \
      dev.qwen.megatron-core="${MEGATRON_CORE_VERSION}" \
      dev.qwen.megablocks="${MEGABLOCKS_VERSION}"

# The operator renders the command: torchrun ... -m qwen_trainer run --spec /etc/qwen/job.yaml
WORKDIR /workspace
ENTRYPOINT []
CMD ["python", "-m", "qwen_trainer", "--help"]
