# Operator image: kopf + kubernetes client + the spec models. No torch. Runs as 65532 (non-root) with a
# read-only root filesystem (the chart mounts an emptyDir at /tmp).
# Build from the repository root with BuildKit:  DOCKER_BUILDKIT=1 docker build -f docker/operator.Dockerfile -t IMAGE .
# (a TLS-intercepting proxy's CA bundle goes in as a build secret, as for docker/trainer-cpu.Dockerfile).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml README.md ./
COPY qwen_trainer qwen_trainer
COPY operator operator
RUN --mount=type=cache,target=/root/.cache/pip --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
 && /opt/venv/bin/pip install ".[operator]" \
 && /opt/venv/bin/python -c "import importlib.util as u; assert u.find_spec('torch') is None, 'torch must not be in the operator image'" \
 && /opt/venv/bin/qwen-operator --help >/dev/null

FROM ${PYTHON_IMAGE}
# A passwd entry for the UID the operator runs as: kopf names its peering identity after the user
# (getpass.getuser), which fails for a UID unknown to /etc/passwd.
RUN groupadd --gid 65532 qwen-operator \
 && useradd --uid 65532 --gid 65532 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin qwen-operator
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
LABEL org.opencontainers.image.title="qwen-k8s operator" \
      org.opencontainers.image.source="https://github.com/qwen-k8s/qwen-k8s-trainer" \
      org.opencontainers.image.licenses="Apache-2.0"
# 8080: kopf liveness (/healthz); 9090: /metrics and /readyz.
EXPOSE 8080 9090
USER 65532:65532
ENTRYPOINT ["qwen-operator"]
