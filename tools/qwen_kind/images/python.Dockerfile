# Python 3.11 on the locally made Debian base (debootstrap; no registry), standing in for the public
# python:3.11-slim-bookworm: `python` and `pip` on PATH, from a venv so pip may install freely.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb \
 && python3 -m venv /opt/python \
 && /opt/python/bin/python -m pip --version
ENV PATH=/opt/python/bin:$PATH LANG=C.UTF-8
CMD ["python3"]
