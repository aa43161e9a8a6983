"""Federation TLS material: a CA, merchant workers' server certificates, the coordinator's client certificate.

``fedstream federated certs`` writes a small federation for tests and demos (EC P-256, short-lived);
production points ``settings.federated.*_file`` at the federation's own CA and each site's certificate.
Worker certificates carry only the *serverAuth* usage and the coordinator's only *clientAuth*, so one
merchant's worker certificate cannot be used to drive another merchant's worker.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

FILES = {"ca": "ca.pem", "ca_key": "ca.key", "worker_cert": "worker.pem", "worker_key": "worker.key",
         "coordinator_cert": "coordinator.pem", "coordinator_key": "coordinator.key"}


@dataclass(frozen=True)
class TlsFiles:
    """Where one process finds the federation CA and its own certificate chain and key."""

    ca: Path
    cert: Path
    key: Path

    def missing(self) -> list[Path]:
        return [p for p in (self.ca, self.cert, self.key) if not p.is_file()]

    def read(self) -> tuple[bytes, bytes, bytes]:
        return self.ca.read_bytes(), self.cert.read_bytes(), self.key.read_bytes()


def default_dir(settings) -> Path:
    return settings.data_path / "federated" / "tls"


def tls_files(settings, role: str) -> TlsFiles:
    """The TLS files of ``role`` (``worker`` or ``coordinator``): settings, else ``<data_dir>/federated/tls``."""
    if role not in ("worker", "coordinator"):
        raise ValueError(f"role must be worker or coordinator, got {role!r}")
    fed, base = settings.federated, default_dir(settings)
    cert = getattr(fed, f"{role}_cert_file") or base / FILES[f"{role}_cert"]
    key = getattr(fed, f"{role}_key_file") or base / FILES[f"{role}_key"]
    return TlsFiles(ca=fed.tls_ca_file or base / FILES["ca"], cert=Path(cert), key=Path(key))


def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedstream federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _alt_names(hosts: list[str]):
    from cryptography import x509

    names = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _certificate(subject: str, issuer_name, signing_key, public_key, days: int, extensions):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    now = dt.datetime.now(dt.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer_name)
               .public_key(public_key).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days)))
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signing_key, hashes.SHA256())


def make_federation(out: Path, worker_hosts: list[str], days: int = 30, name: str = "fedstream") -> dict[str, Path]:
    """Write a CA, one worker (server) certificate for ``worker_hosts`` and one coordinator (client) certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    out.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate(f"{name} federation CA", _name(f"{name} federation CA"), ca_key, ca_key.public_key(), days,
                      [(x509.BasicConstraints(ca=True, path_length=0), True)])
    keys = {"ca_key": ca_key}
    certs = {"ca": ca}
    for role, usage, hosts in (("worker", ExtendedKeyUsageOID.SERVER_AUTH, worker_hosts),
                               ("coordinator", ExtendedKeyUsageOID.CLIENT_AUTH, [])):
        key = ec.generate_private_key(ec.SECP256R1())
        extensions = [(x509.BasicConstraints(ca=False, path_length=None), True),
                      (x509.ExtendedKeyUsage([usage]), False)]
        if hosts:
            extensions.append((_alt_names(hosts), False))
        certs[f"{role}_cert"] = _certificate(f"{name} {role}", ca.subject, ca_key, key.public_key(), days, extensions)
        keys[f"{role}_key"] = key
    written = {}
    for label, cert in certs.items():
        written[label] = out / FILES[label]
        written[label].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    for label, key in keys.items():
        written[label] = out / FILES[label]
        written[label].touch(mode=0o600)
        written[label].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))
    return written


def server_context(files: TlsFiles):
    """TLS server context of a worker's gateway: TLS >= 1.2, ALPN h2 (gRPC), client certificate required
    and verified against the federation CA (with the clientAuth usage)."""
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(files.cert, files.key)
    context.load_verify_locations(cafile=files.ca)
    context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(["h2"])
    return context
