"""Self-signed serving certificates for the webhook servers of the harness's controllers, made with ``openssl``.

(kwokctl makes the control plane's own PKI.) ECDSA P-256: generation takes milliseconds.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


class PKIError(RuntimeError):
    pass


def _openssl(*args: str, cwd: Path) -> None:
    exe = shutil.which("openssl")
    if exe is None:
        raise PKIError("the 'openssl' command is needed to generate the webhook servers' certificates")
    proc = subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise PKIError(f"openssl {' '.join(args[:2])} failed: {proc.stderr.strip()}")


def _ec_key(path: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path), cwd=path.parent)
    path.chmod(0o600)


def self_signed(cert: Path, key: Path, cn: str, sans: list[str], days: int = 3650, ca: bool = False) -> None:
    """A self-signed certificate (a CA when ``ca`` is true, otherwise a serving certificate)."""
    _ec_key(key)
    ext = ["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature"] if ca else [
        "-addext", "basicConstraints=critical,CA:FALSE",
        "-addext", "keyUsage=critical,digitalSignature,keyEncipherment",
        "-addext", "extendedKeyUsage=serverAuth",
    ]
    if sans:
        ext += ["-addext", "subjectAltName=" + ",".join(sans)]
    _openssl("req", "-x509", "-new", "-key", str(key), "-out", str(cert), "-days", str(days), "-subj", f"/CN={cn}", *ext,
             cwd=cert.parent)
