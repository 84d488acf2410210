"""Optional progress reporting into the QwenTrainingJob's `status.progress` (rank 0 only).

Enabled when QWEN_STATUS_RESOURCE=namespace/name is set. Uses the `kubernetes` client (imported lazily; in-cluster
config first, then kubeconfig) from a background thread, at most every QWEN_STATUS_INTERVAL seconds (default 15)
plus once at the end. Any failure is logged once and otherwise ignored: reporting never stops training.
"""

from __future__ import annotations

import datetime
import os
import threading
import time
from typing import Any, Callable, Optional

from qwen_trainer.spec.resource_name import GROUP, PLURAL, VERSION

RESOURCE_ENV = "QWEN_STATUS_RESOURCE"
INTERVAL_ENV = "QWEN_STATUS_INTERVAL"


class StatusReporter:
    def __init__(self, log: Callable[[str], None], resource: Optional[str] = None):
        self.log = log
        raw = resource if resource is not None else os.environ.get(RESOURCE_ENV, "")
        self.namespace = self.name = None
        if raw:
            ns, _, name = raw.partition("/")
            if ns and name:
                self.namespace, self.name = ns, name
            else:
                log(f"{RESOURCE_ENV}={raw!r} is not namespace/name; status reporting is off")
        try:
            self.interval = float(os.environ.get(INTERVAL_ENV, "15"))
        except ValueError:
            self.interval = 15.0
        self._pending: Optional[dict] = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._warned = False
        self._api = None
        self._thread: Optional[threading.Thread] = None
        self._last = 0.0
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name="status-reporter", daemon=True)
            self._thread.start()

    @property
    def enabled(self) -> bool:
        return self.name is not None

    def report(self, force: bool = False, **progress: Any) -> None:
        if not self.enabled:
            return
        progress = {k: v for k, v in progress.items() if v is not None}
        progress["updated"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        with self._lock:
            self._pending = {**(self._pending or {}), **progress}
        if force or time.monotonic() - self._last >= self.interval:
            self._wake.set()

    def report_section(self, section: str, body: dict) -> None:
        """Patch one status section (e.g. `evaluation`) right away; best effort like progress reports."""
        if not self.enabled:
            return
        try:
            self._client().patch_namespaced_custom_object_status(
                GROUP, VERSION, self.namespace, PLURAL, self.name, {"status": {section: body}})
        except Exception as err:
            self.log(f"status reporting of {section} to {self.namespace}/{self.name} failed ({type(err).__name__})")

    def _client(self):
        if self._api is None:
            from kubernetes import client, config  # lazy: only pods that report need it

            try:
                config.load_incluster_config()
            except Exception:
                config.load_kube_config()
            self._api = client.CustomObjectsApi()
        return self._api

    def _send(self) -> None:
        with self._lock:
            body, self._pending = self._pending, None
        if not body:
            return
        self._last = time.monotonic()
        try:
            self._client().patch_namespaced_custom_object_status(
                GROUP, VERSION, self.namespace, PLURAL, self.name, {"status": {"progress": body}})
        except Exception as err:
            if not self._warned:
                self._warned = True
                self.log(f"status reporting to {self.namespace}/{self.name} failed ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}); training continues")

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait(timeout=self.interval)
            self._wake.clear()
            self._send()

    def close(self, timeout: float = 10.0) -> None:
        if not self.enabled or self._thread is None:
            return
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)
        self._send()
