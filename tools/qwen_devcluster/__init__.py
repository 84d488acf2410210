"""A real, local Kubernetes control plane for integration tests and the demo, without Docker.

Binaries come from ``tools/build-controlplane.sh`` (built from Go modules into a version-keyed
cache; ``QWEN_K8S_BIN_DIR`` overrides where they are looked for). ``start_cluster()``:

1. has kwok's ``kwokctl`` create the cluster ``qwen-dev`` with its binary runtime on those binaries
   (``KWOK_WORKDIR`` is the state dir; nothing is downloaded): its PKI and admin kubeconfig, etcd
   (``--unsafe-no-fsync``), kube-apiserver (``Node,RBAC``, default admission plugins but
   ``TaintNodesByCondition``), kube-controller-manager (every in-tree controller except node
   lifecycle and the cloud ones), kube-scheduler and kwok managing every node with the stages below;
   plain processes on 127.0.0.1 with free ports;
2. registers ``gpu_nodes`` fake nodes ``gpu-node-<i>`` with ``nvidia.com/gpu: 8`` (plus cpu,
   memory, pods) and waits until kwok has made them Ready, the API server answers ``/readyz``,
   the ``default/default`` ServiceAccount exists and the scheduler answers ``/healthz``;
3. runs what kwokctl cannot: the Kubeflow training-operator (``--enable-scheme=pytorchjob``) out of
   cluster once its PyTorchJob CRD is Established (ready on ``/readyz``), and the opt-in extras
   (``extras.py``).

The admin kubeconfig is ``<state dir>/clusters/qwen-dev/kubeconfig.yaml`` (``Cluster.kubeconfig``);
every component logs to ``<state dir>/clusters/qwen-dev/logs/<component>.log``. A component that
fails to come up raises ``ClusterStartError`` naming it, with the tail of its log. Under pytest
the cluster goes when the test process does, however it ends.

Pod lifecycle convention (kwok stages)
--------------------------------------
Scheduled pods become Running (init containers Completed, containers running). What happens next
is chosen by the test through pod annotations, set in the pod template (a PyTorchJob's
``replicaSpecs.*.template.metadata.annotations``) or patched onto running pods later (see
``Cluster.set_pod_outcome``):

``qwen.test/outcome: succeed``
    the pod goes to ``Succeeded`` (every container terminated, exit code 0).
``qwen.test/outcome: fail``
    the pod goes to ``Failed`` (containers terminated, reason ``Error``, exit code from
    ``qwen.test/exit-code``, default 1; e.g. 137 to exercise the training-operator's ExitCode policy).
``qwen.test/delay: <Go duration>``
    how long the pod stays Running before that, e.g. ``"3s"``; default 1s.
no outcome annotation
    the pod stays Running forever (like a long training run), except pods owned by a batch Job,
    which complete as with kwok's stock stage.
any other value (e.g. ``qwen.test/outcome: run`` in a pod template)
    the pod stays Running until a test sets ``succeed`` or ``fail``, also when a batch Job owns it
    (the pods of a JobSet, hence of a Trainer v2 TrainJob).

Deleted pods are removed at once (kwok clears finalizers), so owner deletion and garbage
collection finish without a kubelet.

Limits: the training-operator's cert-controller only accepts the fixed directory
``/tmp/k8s-webhook-server/serving-certs``; the harness writes a self-signed pair there when it is
missing and removes it when the last cluster using it stops, so several clusters can run side by
side. No validating webhook is registered for PyTorchJobs (the apiserver could not reach it); no
kube-proxy, no real containers, and the node lifecycle controller is off (fake nodes never go
NotReady).

Use from the command line: ``qwen-devcluster up|down|status --state-dir DIR`` (the console script
the project installs; ``python -m qwen_devcluster`` is the same); ``KWOK_WORKDIR=DIR kwokctl ...
--name qwen-dev`` works on the same cluster.
"""

from .binaries import BinariesMissing, bin_dir, ensure_built, missing
from .cluster import (
    DELAY_ANNOTATION,
    EXIT_CODE_ANNOTATION,
    OUTCOME_ANNOTATION,
    Cluster,
    ClusterStartError,
    start_cluster,
)

__all__ = [
    "BinariesMissing",
    "Cluster",
    "ClusterStartError",
    "DELAY_ANNOTATION",
    "EXIT_CODE_ANNOTATION",
    "OUTCOME_ANNOTATION",
    "bin_dir",
    "ensure_built",
    "missing",
    "start_cluster",
    "up",
    "down",
    "status",
]


def up(state_dir, *, build: bool = False, **kwargs) -> Cluster:
    """Start a cluster that outlives this process (``qwen-devcluster up`` calls this)."""
    bins = ensure_built() if build else None
    return start_cluster(state_dir, bins, die_with_parent=False, **kwargs)


def down(state_dir, keep_logs: bool = False) -> bool:
    """Stop the cluster recorded in ``state_dir``; False if there was none."""
    from pathlib import Path

    from .cluster import STATE_FILE

    if not (Path(state_dir) / STATE_FILE).exists():
        return False
    Cluster.load(Path(state_dir)).stop(keep_logs=keep_logs)
    return True


def status(state_dir) -> dict | None:
    """Start-up time, per-component liveness and RSS of the cluster recorded in ``state_dir``."""
    from pathlib import Path

    from .cluster import STATE_FILE

    if not (Path(state_dir) / STATE_FILE).exists():
        return None
    return Cluster.load(Path(state_dir)).measure()
