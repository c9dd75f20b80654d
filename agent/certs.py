"""``callrec certs``: a small certificate authority for a test or pilot install, and the
TLS credentials the agent and the store use (mutual TLS by default).

callrec certs ca    DIR                     ca.pem, ca.key (0600)
callrec certs store DIR [--host H …]        store.pem, store.key: the store's server
                                            certificate (127.0.0.1, ::1, localhost + H)
callrec certs agent DIR --site hel-1        agent-hel-1.pem, agent-hel-1.key: the
                                            agent's client certificate for one site
callrec certs show  FILE                    subject, site, names and validity

A site's identity is in its client certificate: the common name is the site and a
URI name ``callrec:site:<site>`` says so unambiguously; the store takes the site from
the certificate, never from what the agent claims. Production installs may use their
own PKI as long as agent certificates carry that URI name.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.config import ConfigError

SITE_URI_PREFIX = "callrec:site:"
_SITE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_SKEW = dt.timedelta(minutes=5)
CA_DAYS = 3650
LEAF_DAYS = 825


class CertError(ConfigError):
    """A certificate or key that cannot be made or used; the message names the file."""


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, both PEM."""

    cert_pem: bytes
    key_pem: bytes

    @property
    def cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)

    def private_key(self) -> ec.EllipticCurvePrivateKey:
        key = serialization.load_pem_private_key(self.key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CertError("expected an EC private key")
        return key


# ---------------------------------------------------------------- making certificates


def _name(common_name: str, unit: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "callrec"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _builder(subject: x509.Name, issuer: x509.Name, days: int) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
    )


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def new_ca(common_name: str = "callrec CA", days: int = CA_DAYS) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(common_name, "ca")
    cert = (
        _builder(name, name, days)
        .public_key(key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key))


def _leaf(
    ca: Issued,
    subject: x509.Name,
    names: Sequence[x509.GeneralName],
    usage: x509.ObjectIdentifier,
    days: int,
) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    ca_cert, ca_key = ca.cert, ca.private_key()
    cert = (
        _builder(subject, ca_cert.subject, days)
        .public_key(key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key))


def issue_store(ca: Issued, hosts: Iterable[str] = (), days: int = LEAF_DAYS) -> Issued:
    """The store's server certificate: loopback names always, plus ``hosts``."""
    names: list[x509.GeneralName] = []
    for host in ("127.0.0.1", "::1", "localhost", *hosts):
        try:
            entry: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            entry = x509.DNSName(host)
        if entry not in names:
            names.append(entry)
    return _leaf(ca, _name("callrec store", "store"), names, ExtendedKeyUsageOID.SERVER_AUTH, days)


def issue_agent(ca: Issued, site: str, days: int = LEAF_DAYS) -> Issued:
    """An agent's client certificate: CN = site, URI name ``callrec:site:<site>``."""
    if not _SITE.fullmatch(site):
        raise CertError(f"site {site!r}: expected lower-case letters, digits and '-'")
    names = [x509.UniformResourceIdentifier(SITE_URI_PREFIX + site)]
    return _leaf(ca, _name(site, "agent"), names, ExtendedKeyUsageOID.CLIENT_AUTH, days)


# ---------------------------------------------------------------- reading certificates


def site_of(cert: x509.Certificate) -> str | None:
    """The site a certificate was issued to (its ``callrec:site:`` URI name), or None."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    sites = [
        uri.removeprefix(SITE_URI_PREFIX)
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier)
        if uri.startswith(SITE_URI_PREFIX)
    ]
    if len(sites) != 1 or not _SITE.fullmatch(sites[0]):
        return None
    return sites[0]


def site_from_auth_context(auth: Mapping[str, Iterable[bytes]]) -> str | None:
    """The site of the peer of a gRPC call over mutual TLS (None: no site certificate)."""
    cert = peer_certificate(auth)
    return None if cert is None else site_of(cert)


def peer_certificate(auth: Mapping[str, Iterable[bytes]]) -> x509.Certificate | None:
    """The client certificate of a gRPC call over mutual TLS, if there is one."""
    pems = list(auth.get("x509_pem_cert", ()))
    if len(pems) != 1:
        return None
    try:
        return x509.load_pem_x509_certificate(pems[0])
    except ValueError:
        return None


def serial_of(cert: x509.Certificate) -> str:
    """The serial number in lower-case hex (what ``callrec certs revoke --serial`` takes)."""
    return format(cert.serial_number, "x")


def valid_site(site: str) -> bool:
    return bool(_SITE.fullmatch(site))


def load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise CertError(f"{path}: certificate not found (make one with `callrec certs`)") from None
    except ValueError as exc:
        raise CertError(f"{path}: not a PEM certificate ({exc})") from None


def describe(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(v) for v in san.get_values_for_type(x509.DNSName)]
        names += [str(v) for v in san.get_values_for_type(x509.IPAddress)]
        names += san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        names = []
    return [
        f"subject   {cert.subject.rfc4514_string()}",
        f"issuer    {cert.issuer.rfc4514_string()}",
        f"site      {site_of(cert) or '-'}",
        f"names     {', '.join(names) or '-'}",
        f"valid     {cert.not_valid_before_utc:%Y-%m-%d} .. {cert.not_valid_after_utc:%Y-%m-%d}",
        f"serial    {cert.serial_number:x}",
    ]


# ---------------------------------------------------------------- gRPC credentials


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CertError(f"{path}: {what} not found (make one with `callrec certs`)") from None


def server_credentials(ca_file: Path, cert_file: Path, key_file: Path) -> grpc.ServerCredentials:
    """The store's side: its own certificate, and client certificates required."""
    return grpc.ssl_server_credentials(
        [(_read(key_file, "key"), _read(cert_file, "certificate"))],
        root_certificates=_read(ca_file, "CA certificate"),
        require_client_auth=True,
    )


def channel_credentials(ca_file: Path, cert_file: Path, key_file: Path) -> grpc.ChannelCredentials:
    """The agent's side: trust only our CA, present the site's certificate."""
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file, "CA certificate"),
        private_key=_read(key_file, "key"),
        certificate_chain=_read(cert_file, "certificate"),
    )


# ---------------------------------------------------------------- files and the command


def write_pair(directory: Path, stem: str, issued: Issued) -> tuple[Path, Path]:
    """Write ``<stem>.pem`` (0644) and ``<stem>.key`` (0600); never overwrite."""
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    for path in (cert_path, key_path):
        if path.exists():
            raise CertError(f"{path}: exists; not overwritten (remove it first to replace it)")
    for path, data, mode in (
        (key_path, issued.key_pem, 0o600),
        (cert_path, issued.cert_pem, 0o644),
    ):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    return cert_path, key_path


def load_ca(directory: Path) -> Issued:
    cert, key = directory / "ca.pem", directory / "ca.key"
    if not (cert.exists() and key.exists()):
        raise CertError(f"{directory}: no ca.pem/ca.key (make them with `callrec certs ca`)")
    return Issued(cert.read_bytes(), key.read_bytes())


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    certs = sub.add_parser("certs", help="a small CA and TLS certificates (test or pilot)")
    certs_sub = certs.add_subparsers(dest="certs_command", required=True)
    ca = certs_sub.add_parser("ca", help="create ca.pem and ca.key in DIR")
    ca.add_argument("directory", type=Path, help="where the CA's key and certificate go")
    ca.add_argument("--days", type=int, default=CA_DAYS, help="validity (default %(default)s)")
    store = certs_sub.add_parser("store", help="issue the store's server certificate")
    store.add_argument("directory", type=Path, help="the CA directory; output goes there")
    store.add_argument("--host", action="append", default=[], help="DNS name or IP (repeat)")
    store.add_argument("--days", type=int, default=LEAF_DAYS, help="validity (%(default)s)")
    agent = certs_sub.add_parser("agent", help="issue an agent's client certificate")
    agent.add_argument("directory", type=Path, help="the CA directory; output goes there")
    agent.add_argument("--site", required=True, help="the agent's [agent] site")
    agent.add_argument("--days", type=int, default=LEAF_DAYS, help="validity (%(default)s)")
    show = certs_sub.add_parser("show", help="describe a certificate")
    show.add_argument("file", type=Path, help="a PEM certificate")
    from agent.store.ingest import denylist  # the store's deny list (revoke, unrevoke, revoked)

    denylist.add_parsers(certs_sub)


def dispatch(args: argparse.Namespace) -> int | None:
    """Run ``callrec certs …``; None when the command is another one."""
    if args.command != "certs":
        return None
    try:
        for line in _run(args):
            sys.stdout.write(line + "\n")
    except (CertError, OSError) as exc:
        sys.stderr.write(f"callrec certs {args.certs_command}: {exc}\n")
        return 2
    return 0


def _run(args: argparse.Namespace) -> list[str]:
    command = args.certs_command
    if command in ("revoke", "unrevoke", "revoked"):
        from agent.store.ingest import denylist

        return denylist.run(args)
    if command == "show":
        return describe(load_cert(args.file))
    if command == "ca":
        issued = new_ca(days=args.days)
        stem = "ca"
    elif command == "store":
        issued = issue_store(load_ca(args.directory), args.host, days=args.days)
        stem = "store"
    else:
        issued = issue_agent(load_ca(args.directory), args.site, days=args.days)
        stem = f"agent-{args.site}"
    cert_path, key_path = write_pair(args.directory, stem, issued)
    return [f"created  {cert_path} (mode 644)", f"created  {key_path} (mode 600)"]
