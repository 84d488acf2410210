"""Certificates and keys for the local control plane, made with the ``openssl`` command.

Everything is ECDSA P-256: generation takes milliseconds, and kube-apiserver accepts EC keys
both for serving and for signing service-account tokens.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


class PKIError(RuntimeError):
    pass


def _openssl(*args: str, cwd: Path) -> None:
    exe = shutil.which("openssl")
    if exe is None:
        raise PKIError("the 'openssl' command is needed to generate the control plane's certificates")
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


def signed_by(ca_cert: Path, ca_key: Path, cert: Path, key: Path, cn: str, sans: list[str], days: int = 3650) -> None:
    """A serving certificate signed by the given CA."""
    _ec_key(key)
    csr = cert.with_suffix(".csr")
    extfile = cert.with_suffix(".ext")
    extfile.write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
        f"subjectAltName={','.join(sans)}\n"
    )
    _openssl("req", "-new", "-key", str(key), "-out", str(csr), "-subj", f"/CN={cn}", cwd=cert.parent)
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key), "-set_serial",
             str(secrets.randbits(63)), "-days", str(days), "-extfile", str(extfile), "-out", str(cert), cwd=cert.parent)
    csr.unlink()
    extfile.unlink()


@dataclass(frozen=True)
class ControlPlanePKI:
    dir: Path
    ca_cert: Path
    ca_key: Path
    apiserver_cert: Path
    apiserver_key: Path
    sa_key: Path
    sa_pub: Path
    tokens_csv: Path
    tokens: dict[str, str]  # user -> bearer token


# user name -> groups. kube-controller-manager runs every controller with its own credentials
# (no per-controller service accounts), so it needs system:masters; the scheduler uses the
# RBAC bootstrap roles for system:kube-scheduler, as in a kubeadm cluster.
USERS: dict[str, list[str]] = {
    "admin": ["system:masters"],
    "system:kube-controller-manager": ["system:masters"],
    "system:kube-scheduler": [],
    "kwok-controller": ["system:masters"],
    "training-operator": ["system:masters"],
    # opt-in extras (qwen_devcluster.extras)
    "jobset-controller": ["system:masters"],
    "trainer-controller": ["system:masters"],
    "kueue-controller": ["system:masters"],
}


def make_pki(pki_dir: Path, host: str = "127.0.0.1") -> ControlPlanePKI:
    pki_dir.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = pki_dir / "ca.crt", pki_dir / "ca.key"
    self_signed(ca_cert, ca_key, "qwen-devcluster-ca", [], ca=True)
    api_cert, api_key = pki_dir / "apiserver.crt", pki_dir / "apiserver.key"
    sans = [f"IP:{host}", "DNS:localhost", "DNS:kubernetes", "DNS:kubernetes.default", "DNS:kubernetes.default.svc",
            "DNS:kubernetes.default.svc.cluster.local", "IP:10.96.0.1"]
    signed_by(ca_cert, ca_key, api_cert, api_key, "kube-apiserver", sans)
    sa_key, sa_pub = pki_dir / "sa.key", pki_dir / "sa.pub"
    _ec_key(sa_key)
    _openssl("pkey", "-in", str(sa_key), "-pubout", "-out", str(sa_pub), cwd=pki_dir)
    tokens = {user: secrets.token_hex(24) for user in USERS}
    lines = []
    for i, (user, groups) in enumerate(USERS.items()):
        row = f"{tokens[user]},{user},uid-{i}"
        if groups:
            row += ',"' + ",".join(groups) + '"'
        lines.append(row)
    tokens_csv = pki_dir / "tokens.csv"
    tokens_csv.write_text("\n".join(lines) + "\n")
    tokens_csv.chmod(0o600)
    return ControlPlanePKI(pki_dir, ca_cert, ca_key, api_cert, api_key, sa_key, sa_pub, tokens_csv, tokens)
