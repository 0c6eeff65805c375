"""A device's long-term identity: an Ed25519 key and the X.509 certificate of it that the federation's CA
issued at enrollment (`flora-aggregator enroll`).

The certificate names the device (CN) and its federation (O), marked as an identity certificate (OU),
so it is useless as a TLS certificate and vice versa. Devices sign their secure-aggregation messages
with the key; the aggregator checks them against its enrollment registry, and other devices against
the certificate, which they check against the federation's CA certificate.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import NameOID

from .errors import FloraError
from .signing import public_key_from_b64

IDENTITY_OU = "flora-device-identity"
IDENTITY_KEY = "identity.key"
IDENTITY_CERT = "identity.crt"
CA_CERT = "ca.crt"
AGGREGATOR_PUB = "aggregator.pub"  # the aggregator's Ed25519 public key, base64
MAX_CERT_BYTES = 4096


class IdentityError(FloraError, ValueError):
    """An identity key or certificate that is missing, unreadable, or does not check out."""


@dataclass(frozen=True)
class DeviceIdentity:
    device_id: str
    federation: str
    key: Ed25519PrivateKey
    cert_der: bytes

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.key.public_key()


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise IdentityError(f"cannot read the Ed25519 key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(f"{path} is not an Ed25519 private key")
    return key


def load_ca(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise IdentityError(f"cannot read the CA certificate {path}: {exc}") from exc


def load_identity(directory: Path, device_id: str, federation: str, ca: x509.Certificate) -> DeviceIdentity:
    """The identity enrollment wrote into `directory`, checked against the CA (and the key against the cert)."""
    directory = Path(directory)
    key = load_private_key(directory / IDENTITY_KEY)
    try:
        der = x509.load_pem_x509_certificate((directory / IDENTITY_CERT).read_bytes()).public_bytes(
            serialization.Encoding.DER)
    except (OSError, ValueError) as exc:
        raise IdentityError(f"cannot read the identity certificate in {directory}: {exc}") from exc
    public = verify_identity_cert(der, ca, device_id, federation)
    if public.public_bytes_raw() != key.public_key().public_bytes_raw():
        raise IdentityError(f"the identity key in {directory} does not match its certificate")
    return DeviceIdentity(device_id, federation, key, der)


def _name(cert_name: x509.Name, oid) -> Optional[str]:
    attrs = cert_name.get_attributes_for_oid(oid)
    return str(attrs[0].value) if len(attrs) == 1 else None


def verify_identity_cert(der: bytes, ca: x509.Certificate, device_id: str, federation: str,
                         now: Optional[datetime.datetime] = None) -> Ed25519PublicKey:
    """The device's Ed25519 key from its identity certificate, once the certificate checks out: issued by
    `ca`, valid now, for this device of this federation, an identity (not a TLS) certificate."""
    if len(der) > MAX_CERT_BYTES:
        raise IdentityError(f"an identity certificate of {len(der)} bytes is too large")
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise IdentityError(f"not an X.509 certificate: {exc}") from exc
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as exc:
        raise IdentityError(f"the identity certificate of {device_id} is not issued by the federation's CA") from exc
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise IdentityError(f"the identity certificate of {device_id} is not valid now")
    subject = cert.subject
    if (_name(subject, NameOID.COMMON_NAME), _name(subject, NameOID.ORGANIZATION_NAME),
            _name(subject, NameOID.ORGANIZATIONAL_UNIT_NAME)) != (device_id, federation, IDENTITY_OU):
        raise IdentityError(f"the identity certificate names {subject.rfc4514_string()}, not device {device_id} "
                            f"of federation {federation}")
    public = cert.public_key()
    if not isinstance(public, Ed25519PublicKey):
        raise IdentityError(f"the identity certificate of {device_id} holds no Ed25519 key")
    return public



def aggregator_key(text: Optional[str] = None, file: Optional[Path] = None,
                   identity_dir: Optional[Path] = None) -> Optional[Ed25519PublicKey]:
    """The aggregator's Ed25519 public key a device trusts: `text` (base64, the enrollment snippet's
    `aggregator_key`, `--aggregator-key`), else the file `file` (`--aggregator-key-file`), else
    `aggregator.pub` in the identity folder enrollment wrote; None when none is given (an open federation)."""
    where = "--aggregator-key"
    if text is None and file is None and identity_dir is not None and (Path(identity_dir) / AGGREGATOR_PUB).exists():
        file = Path(identity_dir) / AGGREGATOR_PUB
    if text is None and file is not None:
        where = str(file)
        try:
            text = Path(file).read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise IdentityError(f"cannot read the aggregator key {file}: {exc}") from exc
    if text is None:
        return None
    try:
        return public_key_from_b64(text)
    except ValueError as exc:
        raise IdentityError(f"{where}: {exc}") from exc
