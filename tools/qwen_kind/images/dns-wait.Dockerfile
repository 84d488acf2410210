# The init container the training-operator puts in front of PyTorchJob workers (`sh`, `seq`, `sleep` and
# `nslookup` until the master's Service resolves); upstream defaults to alpine. Debian's nslookup comes from
# bind9-dnsutils (busybox's nslookup fails when any search domain answers NXDOMAIN, so it would never
# succeed). Passed with the training-operator's --pytorch-init-container-image.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends bind9-dnsutils \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb \
 && nslookup -version
