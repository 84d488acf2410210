# The pod sandbox ("pause") container, compiled from k8s.io/kubernetes' build/pause/linux/pause.c (same
# Kubernetes version as the node) by tools/qwen_kind/images.py. Build context: the folder holding it.
FROM scratch
COPY pause /pause
USER 65535:65535
ENTRYPOINT ["/pause"]
