"""Test certificates for a Flower federation: a local CA, a SuperLink TLS certificate
signed by it, and one SuperNode authentication key pair per node.

* ``ca.crt`` / ``ca.key``: the CA (self-signed, 10 years). SuperNodes and the ``flwr``
  CLI trust it (``--root-certificates ca.crt``).
* ``server.crt`` / ``server.key``: the SuperLink's certificate, valid for the given
  host names and IP addresses (default ``localhost`` and ``127.0.0.1``; add the
  server's public name or IP for a real deployment).
* ``supernode_<i>`` / ``supernode_<i>.pub``: ECDSA P-384 keys in OpenSSH format, what
  Flower's (1.41, 1.42) node authentication expects (``flower-supernode
  --auth-supernode-private-key supernode_0``; ``flwr supernode register supernode_0.pub``).

Private keys are created 0600 (``os.open``, never world-readable for a moment) in a
folder of their own: one inside a mira run directory is refused, so no key is ever
copied or published with results.

For testing and small deployments. A production federation should use certificates
from its own PKI and keep private keys on the machine that uses them.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from mira.errors import MiraError

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")


def _write(path: Path, data: bytes, private: bool = False) -> None:
    """Write ``data``; a private key is created 0600 (owner only) from the start, never
    readable by others for a moment, whatever the umask."""
    if not private:
        path.write_bytes(data)
        return
    if path.exists() or path.is_symlink():
        path.unlink()  # O_EXCL below: a new file, so the mode applies and no link is followed
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask can only remove bits; this states the mode outright
        with os.fdopen(fd, "wb") as f:
            fd = -1
            f.write(data)
    finally:
        if fd >= 0:
            os.close(fd)


RUN_MARKERS = ("config.yaml", "summary.json", "checkpoint.pt", "rounds.json", "metrics.jsonl")


def check_key_folder(out: Path) -> None:
    """Private keys get their own folder: never a mira run directory (or inside one), whose
    results are copied, shared and published."""
    out = Path(out).expanduser().resolve()
    for d in (out, *out.parents):
        if d.is_dir() and any((d / m).exists() for m in RUN_MARKERS):
            raise MiraError(f"{out} is inside the run directory {d}; keep private keys in their own folder, never "
                            "with results", where="--out")


def make_key_folder(out: Path) -> None:
    """Create ``out`` (owner-only, 0700, when it is new) after ``check_key_folder``."""
    check_key_folder(out)
    if not out.exists():
        out.mkdir(parents=True, mode=0o700)
        os.chmod(out, 0o700)


def _san(hosts: list[str]):
    from cryptography import x509

    names = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def generate_ca_and_server(out: Path, hosts: list[str] | tuple[str, ...] = DEFAULT_HOSTS, days: int = 3650) -> dict:
    """Write ``ca.crt``, ``ca.key``, ``server.crt``, ``server.key`` into ``out``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    make_key_folder(out)
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    until = now + dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mira federation test CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0] if hosts else "localhost")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(until)
        .add_extension(_san(list(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    pkcs8 = serialization.PrivateFormat.PKCS8
    none = serialization.NoEncryption()
    _write(out / "ca.crt", ca_cert.public_bytes(pem))
    _write(out / "ca.key", ca_key.private_bytes(pem, pkcs8, none), private=True)
    _write(out / "server.crt", cert.public_bytes(pem))
    _write(out / "server.key", key.private_bytes(pem, pkcs8, none), private=True)
    return {"ca": out / "ca.crt", "server_cert": out / "server.crt", "server_key": out / "server.key"}


def generate_node_key(out: Path, name: str) -> tuple[Path, Path]:
    """Write an ECDSA P-384 key pair in OpenSSH format: ``<name>`` (private) and ``<name>.pub``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    make_key_folder(out)
    key = ec.generate_private_key(ec.SECP384R1())
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(out / name, priv, private=True)
    _write(out / f"{name}.pub", pub + f" mira-{name}\n".encode())
    return out / name, out / f"{name}.pub"


def generate_all(out: str | os.PathLike, nodes: int = 3, hosts: list[str] | tuple[str, ...] = DEFAULT_HOSTS,
                 overwrite: bool = False) -> dict:
    """The CA, the SuperLink certificate and ``nodes`` SuperNode key pairs in ``out``."""
    from mira.userfiles import check_out_folder

    out = Path(out)
    check_out_folder(out)
    if (out / "ca.crt").exists() and not overwrite:
        raise MiraError(f"{out} already holds certificates; pass --overwrite to replace them", where="--out")
    if nodes < 0:
        raise MiraError("the number of node keys must be >= 0", where="--nodes")
    files = generate_ca_and_server(out, hosts)
    files["nodes"] = [generate_node_key(out, f"supernode_{i}") for i in range(nodes)]
    return files
