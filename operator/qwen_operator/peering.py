"""The kopf peering resources for running several operator replicas (only the highest priority one acts).

`kopf.dev/v1` KopfPeering (namespaced operators) and ClusterKopfPeering (all-namespaces operators); kopf
writes every replica's identity, priority and last keep-alive into the object's status. The Helm chart and
the tests install these; see docs/operator.md.
"""

from __future__ import annotations

from typing import Any

DEFAULT_NAME = "qwen-operator"


def _crd(kind: str, plural: str, scope: str) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.kopf.dev"},
        "spec": {
            "scope": scope,
            "group": "kopf.dev",
            "names": {"kind": kind, "plural": plural, "singular": plural[:-1]},
            "versions": [{
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "properties": {"status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
                }},
                "additionalPrinterColumns": [
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}],
            }],
        },
    }


def peering_crds() -> list[dict[str, Any]]:
    return [_crd("KopfPeering", "kopfpeerings", "Namespaced"),
            _crd("ClusterKopfPeering", "clusterkopfpeerings", "Cluster")]


def peering_object(name: str = DEFAULT_NAME, namespace: str | None = None) -> dict[str, Any]:
    """The peering object the replicas meet in: namespaced for namespaced operators, cluster-scoped otherwise."""
    if namespace:
        return {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": name, "namespace": namespace}}
    return {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": name}}
