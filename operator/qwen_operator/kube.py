"""The few API calls the handlers make, on the official `kubernetes` client (kopf is not a client).

Every write is idempotent: children are created by deterministic name and read back on 409; status writes
are merge patches with a resourceVersion precondition, recomputed from a fresh read on conflict, so two
handlers writing status concurrently never overwrite each other's view.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Optional

import kubernetes
from kubernetes.client.exceptions import ApiException

from .api import GROUP, KIND, PLURAL, VERSION
from .render import PYTORCHJOB_GROUP, PYTORCHJOB_KIND, PYTORCHJOB_PLURAL, PYTORCHJOB_VERSION, TRAINJOB_GROUP, \
    TRAINJOB_KIND, TRAINJOB_PLURAL, TRAINJOB_VERSION, child_suspend_patch

# (group, version, plural) of the custom-resource children, by kind.
CHILD_RESOURCES = {
    PYTORCHJOB_KIND: (PYTORCHJOB_GROUP, PYTORCHJOB_VERSION, PYTORCHJOB_PLURAL),
    TRAINJOB_KIND: (TRAINJOB_GROUP, TRAINJOB_VERSION, TRAINJOB_PLURAL),
}
JOBSET_RESOURCE = ("jobset.x-k8s.io", "v1alpha2", "jobsets")

MERGE_PATCH = "application/merge-patch+json"
log = logging.getLogger("qwen_operator.kube")


class Conflict(Exception):
    """The status write lost a race more often than allowed."""


class Kube:
    def __init__(self, api_client: kubernetes.client.ApiClient):
        self.client = api_client
        self.custom = kubernetes.client.CustomObjectsApi(api_client)
        self.core = kubernetes.client.CoreV1Api(api_client)
        # Latest QwenTrainingJob bodies seen (watch events and our own patch responses): the first guess of a
        # status write, so that the common case costs one PATCH instead of GET + PATCH. A stale guess only
        # costs a 409 and a re-read.
        self.cache: dict[tuple[str, str], dict[str, Any]] = {}
        # (namespace, name) -> (exists, checked at): the trainer ServiceAccount, read once per namespace.
        self.accounts: dict[tuple[str, str], tuple[bool, float]] = {}
        # (group, version, plural) -> (served, checked at): API discovery, for the APIs the operator depends on.
        self.apis: dict[tuple[str, str, str], tuple[bool, float]] = {}
        # child uid -> (name, uid) of the QwenTrainingJob that owns it (Kueue Workloads name only the child).
        self.owners: dict[str, tuple[str, str]] = {}

    def remember(self, body: dict[str, Any]) -> None:
        meta = body.get("metadata") or {}
        key = (meta.get("namespace", ""), meta.get("name", ""))
        old = self.cache.get(key)
        try:
            if old is not None and int(old["metadata"]["resourceVersion"]) >= int(meta["resourceVersion"]):
                return
        except (KeyError, TypeError, ValueError):
            pass
        self.cache[key] = slim(body)

    def forget(self, namespace: str, name: str) -> None:
        self.cache.pop((namespace, name), None)

    @classmethod
    def connect(cls, pool_size: int = 16) -> "Kube":
        configuration = kubernetes.client.Configuration()
        if os.environ.get("KUBERNETES_SERVICE_HOST") and not os.environ.get("KUBECONFIG"):
            kubernetes.config.load_incluster_config(client_configuration=configuration)
        else:
            kubernetes.config.load_kube_config(client_configuration=configuration)
        configuration.connection_pool_maxsize = pool_size
        return cls(kubernetes.client.ApiClient(configuration))

    # ------------------------------------------------------------------------------------------- reads

    def get_job(self, namespace: str, name: str) -> Optional[dict[str, Any]]:
        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def get_child(self, obj: dict[str, Any]) -> Optional[dict[str, Any]]:
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        try:
            if obj["kind"] in CHILD_RESOURCES:
                group, version, plural = CHILD_RESOURCES[obj["kind"]]
                return self.custom.get_namespaced_custom_object(group, version, ns, plural, name)
            return _json(self.core.read_namespaced_config_map(name, ns, _preload_content=False))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def get_jobset(self, namespace: str, name: str) -> Optional[dict[str, Any]]:
        """The JobSet Trainer v2 runs a TrainJob as (same name), or None when absent or not readable."""
        group, version, plural = JOBSET_RESOURCE
        try:
            return self.custom.get_namespaced_custom_object(group, version, namespace, plural, name)
        except ApiException as e:
            if e.status in (403, 404):
                return None
            raise

    def service_account(self, namespace: str, name: Optional[str], ttl: float = 60.0) -> Optional[str]:
        """`name` when that ServiceAccount exists in `namespace`, else None. A hit is remembered for good, a miss
        for `ttl` seconds, so a burst of jobs costs one read per namespace."""
        if not name:
            return None
        import time

        key = (namespace, name)
        known = self.accounts.get(key)
        if known is not None and (known[0] or time.monotonic() - known[1] < ttl):
            return name if known[0] else None
        try:
            self.core.read_namespaced_service_account(name, namespace, _preload_content=False).release_conn()
            exists = True
        except ApiException as e:
            if e.status not in (403, 404):
                raise
            exists = False
        self.accounts[key] = (exists, time.monotonic())
        return name if exists else None

    def api_served(self, group: str, version: str, plural: str, ttl: float = 60.0) -> bool:
        """Whether discovery lists `plural` in `group/version` (remembered for `ttl` seconds)."""
        import time

        key = (group, version, plural)
        known = self.apis.get(key)
        if known is not None and time.monotonic() - known[1] < ttl:
            return known[0]
        try:
            listed = self.custom.get_api_resources(group, version)
            served = any(r.name == plural for r in listed.resources or [])
        except ApiException as e:
            if e.status not in (403, 404):
                raise
            served = False
        self.apis[key] = (served, time.monotonic())
        return served

    def owner_of_child(self, kind: str, namespace: str, name: str, uid: str) -> Optional[tuple[str, str]]:
        """(name, uid) of the QwenTrainingJob controlling the child job `kind` `name` (read once per child)."""
        if uid in self.owners:
            return self.owners[uid]
        group, version, plural = CHILD_RESOURCES[kind]
        try:
            child = self.custom.get_namespaced_custom_object(group, version, namespace, plural, name)
        except ApiException as e:
            if e.status in (403, 404):
                return None
            raise
        if (child.get("metadata") or {}).get("uid") != uid:
            return None
        for ref in (child.get("metadata") or {}).get("ownerReferences") or []:
            if ref.get("controller") and ref.get("kind") == KIND and \
                    str(ref.get("apiVersion", "")).startswith(GROUP + "/"):
                self.owners[uid] = (ref["name"], ref.get("uid", ""))
                return self.owners[uid]
        return None

    def owner_of_child_uid(self, kind: str, namespace: str, uid: str) -> Optional[tuple[str, str]]:
        """(name, uid) of the QwenTrainingJob controlling the child job `kind` whose UID is `uid` in `namespace`
        (a list of that namespace's children where the UID is not cached), or None."""
        if uid in self.owners:
            return self.owners[uid]
        group, version, plural = CHILD_RESOURCES[kind]
        try:
            listed = self.custom.list_namespaced_custom_object(group, version, namespace, plural)
        except ApiException as e:
            if e.status in (403, 404):
                return None
            raise
        for child in listed.get("items") or []:
            meta = child.get("metadata") or {}
            if meta.get("uid") == uid:
                return self.owner_of_child(kind, namespace, meta.get("name", ""), uid)
        return None

    # ------------------------------------------------------------------------------------------ writes

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        ns = obj["metadata"]["namespace"]
        if obj["kind"] in CHILD_RESOURCES:
            group, version, plural = CHILD_RESOURCES[obj["kind"]]
            return self.custom.create_namespaced_custom_object(group, version, ns, plural, obj)
        # The raw JSON, not the client's model objects: building and re-serialising those costs more CPU than the
        # request itself.
        return _json(self.core.create_namespaced_config_map(ns, obj, _preload_content=False))

    def create_or_get(self, obj: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """(live object, created?). Create first (the common case costs one call); a name that already exists
        is read back, never created twice."""
        try:
            return self.create(obj), True
        except ApiException as e:
            if e.status != 409:
                raise
        existing = self.get_child(obj)
        if existing is None:  # deleted between our create and get; let the handler retry
            raise ApiException(status=409, reason=f"{obj['kind']} {obj['metadata']['name']} vanished; retrying")
        return existing, False

    def set_suspend(self, namespace: str, name: str, suspend: bool, kind: str = PYTORCHJOB_KIND) -> None:
        group, version, plural = CHILD_RESOURCES[kind]
        self.custom.patch_namespaced_custom_object(
            group, version, namespace, plural, name, child_suspend_patch(kind, suspend), _content_type=MERGE_PATCH)

    def update_status(self, namespace: str, name: str,
                      compute: Callable[[dict[str, Any]], Optional[dict[str, Any]]],
                      attempts: int = 8, body: Optional[dict[str, Any]] = None) -> Optional[dict[str, Any]]:
        """Read-compute-write of the resource's status with optimistic locking.

        `compute(resource)` returns the complete new status, or None to write nothing. Returns the status written
        (or None when the resource is gone or nothing changed)."""
        guess = body if body is not None else self.cache.get((namespace, name))
        for _ in range(attempts):
            guessed = guess is not None
            resource = guess if guessed else self.get_job(namespace, name)
            guess = None  # only a first guess; conflicts re-read
            if resource is None:
                return None
            new = compute(resource)
            if new is None and guessed:
                continue  # e.g. a cached body of an earlier object of this name: decide on a fresh read
            if new is None or new == (resource.get("status") or {}):
                return None
            patch = {"metadata": {"resourceVersion": resource["metadata"]["resourceVersion"]},
                     "status": _merge_patch(resource.get("status") or {}, new)}
            try:
                written = self.custom.patch_namespaced_custom_object_status(
                    GROUP, VERSION, namespace, PLURAL, name, patch, _content_type=MERGE_PATCH)
                if isinstance(written, dict):
                    self.remember(written)
                return new
            except ApiException as e:
                if e.status == 404:
                    return None
                if e.status != 409:
                    raise
                log.debug("status write for %s/%s conflicted; retrying", namespace, name)
        raise Conflict(f"status of {namespace}/{name} kept changing; gave up after {attempts} attempts")


def _json(response: Any) -> dict[str, Any]:
    """The decoded body of a `_preload_content=False` response (the connection goes back to the pool)."""
    try:
        return json.loads(response.data)
    finally:
        response.release_conn()


def slim(body: dict[str, Any]) -> dict[str, Any]:
    """What a status computation reads of a resource, sharing (not copying) its parts: metadata without
    managedFields (the largest part of a body, never read) and without kopf's bookkeeping annotations. The
    cache holds one of these per resource, so its size is what the operator's memory grows with."""
    meta = {k: v for k, v in (body.get("metadata") or {}).items() if k != "managedFields"}
    annotations = meta.get("annotations")
    if annotations and any(k.endswith("/last-handled-configuration") for k in annotations):
        meta["annotations"] = {k: v for k, v in annotations.items() if not k.endswith("/last-handled-configuration")}
    return {**body, "metadata": meta}


def _merge_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """A JSON merge patch turning `old` into `new` (keys that disappeared become null)."""
    patch: dict[str, Any] = {}
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(old.get(key), dict):
            sub = _merge_patch(old[key], value)
            if sub:
                patch[key] = sub
        elif old.get(key) != value:
            patch[key] = value
    for key in old:
        if key not in new:
            patch[key] = None
    return patch
