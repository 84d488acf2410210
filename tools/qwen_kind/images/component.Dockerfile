# One Kubernetes component (built from Go modules by tools/build-controlplane.sh) on the local Debian
# base, for the kind node image: kube-apiserver, kube-controller-manager, kube-scheduler, kube-proxy,
# etcd, coredns, the training-operator. Build context: the control plane's bin dir.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
ARG PACKAGES=""
RUN if [ -n "${PACKAGES}" ]; then apt-get update \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${PACKAGES} \
      && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb; fi
ARG BINARY
# Where the component's manifests expect it (kubeadm's static pods run it from PATH; the
# training-operator's Deployment runs /manager; CoreDNS's gets only args, so it is the entrypoint).
ARG TARGET=/usr/local/bin/${BINARY}
COPY ${BINARY} ${TARGET}
RUN ln -s "${TARGET}" /usr/local/bin/component-entrypoint
# Numeric, so that the kubelet can check a Deployment's runAsNonRoot against it.
ARG USER=0
USER ${USER}
ENTRYPOINT ["/usr/local/bin/component-entrypoint"]
