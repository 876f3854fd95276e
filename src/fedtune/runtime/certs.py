"""TLS certificates and SuperNode keys for a Flower deployment, made with `cryptography` (no openssl needed).

`make_certificates(folder, hosts)` writes what the SuperLink and the clients need for TLS:
``ca.crt`` (give to every SuperNode and to ``flwr``; it verifies the server), ``ca.key`` (keep
offline), ``server.pem`` and ``server.key`` (the SuperLink's certificate for `hosts`, signed by the
CA). `make_node_key(folder, name)` writes a SuperNode's authentication key pair: ``<name>`` (private,
stays on the node, ``flower-supernode --auth-supernode-private-key``) and ``<name>.pub`` (registered
with the SuperLink by ``flwr supernode register``). Flower wants an EC key on a NIST curve in OpenSSH
format; we use P-384.

The openssl / ssh-keygen equivalent (README "Deploy across machines"):
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes -days 365 \\
        -keyout ca.key -out ca.crt -subj "/CN=fedtune CA"
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes -keyout server.key -out server.csr \\
        -subj "/CN=superlink"
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 -out server.pem \\
        -extfile <(printf "subjectAltName=IP:127.0.0.1,DNS:localhost")
    ssh-keygen -t ecdsa -b 384 -N "" -f node0
"""

from __future__ import annotations

import os

import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

DAYS = 365


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey, fmt=serialization.PrivateFormat.PKCS8) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
    # Created owner-only (not written world-readable and then narrowed); an existing file is narrowed first.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_certificates(folder: Path, hosts: list[str]) -> dict[str, Path]:
    """A CA and a SuperLink certificate valid for `hosts` (names or IPs clients dial); returns the file paths."""
    if not hosts:
        raise ValueError("give at least one host name or IP address the SuperNodes will use to reach the SuperLink")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (x509.CertificateBuilder().subject_name(_name("fedtune CA")).issuer_name(_name("fedtune CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=DAYS))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=DAYS))
            .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {"ca_cert": folder / "ca.crt", "ca_key": folder / "ca.key", "server_cert": folder / "server.pem",
             "server_key": folder / "server.key"}
    paths["ca_cert"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    _write_key(paths["ca_key"], ca_key)
    paths["server_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(paths["server_key"], key)
    return paths


def make_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's authentication key pair (OpenSSH format, EC P-384): ``(private, public)`` paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    _write_key(private, key, serialization.PrivateFormat.OpenSSH)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH) + f" {name}\n".encode())
    return private, public


def main(argv: list[str] | None = None) -> None:
    """``python -m fedtune.runtime.certs FOLDER --host H [--host H2] [--node NAME ...]``"""
    import argparse

    p = argparse.ArgumentParser(prog="python -m fedtune.runtime.certs",
                                description="Make a CA, a SuperLink TLS certificate and SuperNode key pairs.")
    p.add_argument("folder", type=Path, help="where to write them (created if missing)")
    p.add_argument("--host", action="append", default=[],
                   help="name or IP the SuperNodes dial to reach the SuperLink (repeatable), e.g. 127.0.0.1")
    p.add_argument("--node", action="append", default=[], help="make an authentication key pair for this SuperNode")
    a = p.parse_args(argv)
    if not a.host and not a.node:
        p.error("give --host (for TLS certificates) and/or --node (for SuperNode keys)")
    if a.host:
        for what, path in make_certificates(a.folder, a.host).items():
            print(f"{what:12s} {path}")
    for name in a.node:
        private, public = make_node_key(a.folder, name)
        print(f"{name:12s} {private} (stays on the node), {public} (flwr supernode register)")


if __name__ == "__main__":
    main()
