"""conversion-manifest.json: what was converted, and a sha256 per output file so a copy can be checked later."""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MANIFEST = "conversion-manifest.json"
_CHUNK = 16 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while n := f.readinto(view):
            h.update(view[:n])  # hashlib releases the GIL on large buffers, so files hash in parallel
    return h.hexdigest()


def hash_files(root: Path, files: dict[Path, str], workers: int = 2) -> dict[str, dict]:
    """files maps path -> sha256 already computed while writing, or "" to hash it now."""
    todo = sorted(p for p, d in files.items() if not d)
    with ThreadPoolExecutor(workers) as pool:
        done = dict(zip(todo, pool.map(sha256_file, todo)))
    return {str(p.relative_to(root)): {"sha256": files[p] or done[p], "bytes": p.stat().st_size}
            for p in sorted(files)}


def write_manifest(root: Path, info: dict, files: dict[Path, str]) -> dict:
    manifest = dict(info, files=hash_files(root, files))
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def check_manifest(root: Path) -> list[str]:
    """One line per file that is missing or whose checksum differs."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        return [f"{root}: no {MANIFEST}"]
    manifest = json.loads(path.read_text())
    problems = []
    for rel, want in manifest["files"].items():
        p = Path(root) / rel
        if not p.is_file():
            problems.append(f"{p}: missing")
        elif p.stat().st_size != want["bytes"] or sha256_file(p) != want["sha256"]:
            problems.append(f"{p}: checksum mismatch")
    return problems
