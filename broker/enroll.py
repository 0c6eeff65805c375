"""Device enrollment: the federation's own CA, each device's identity key and TLS certificate, the broker ACL
confined to the federation, and revocation (`flora-aggregator enroll|revoke DEVICE_ID --state-dir DIR`).

Everything lives in the aggregator's state dir:

    pki/ca.key, pki/ca.crt        the federation's CA (ECDSA P-256); keep ca.key offline where you can
    pki/crl.pem                   revoked certificates (mosquitto `crlfile`)
    pki/broker.key, broker.crt    the broker's TLS server certificate (names from --broker-name)
    pki/aggregator-tls.*          the aggregator's TLS client certificate
    aggregator.key                the aggregator's Ed25519 key: it signs `global`, `round` and secagg messages
    pki/enrolled.json             the registry: each device's identity key and certificate serials, revoked or not
    mosquitto/acl                 the ACL: every enrolled device confined to its own topics of this federation

A device's files go to `--out` (default `flora-enrolled/<id>/`, outside the state dir): identity.key/.crt (Ed25519:
signs its secure-aggregation messages), tls.key/.crt (ECDSA: its MQTT login, CN `<federation>:<id>`,
which mosquitto's `use_identity_as_username` turns into the username the ACL names), ca.crt,
aggregator.pub and agent.toml (a config snippet). The state dir keeps no device private key.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from flora.edge.errors import FloraError
from flora.edge.fileio import atomic_write_bytes, atomic_write_json
from flora.edge.identity import AGGREGATOR_PUB, CA_CERT, IDENTITY_CERT, IDENTITY_KEY, IDENTITY_OU, load_private_key
from flora.edge.protocol import check_id
from flora.edge.signing import public_key_b64, public_key_from_b64

PKI = "pki"
AGGREGATOR_KEY = "aggregator.key"
REGISTRY = "pki/enrolled.json"
ACL = Path("mosquitto") / "acl"
AGGREGATOR_ID = "flora-aggregator"
#: `flora-aggregator --sign`: sign `global` and `round` when the state dir holds the key (auto), always (yes:
#: the federation's keys are made if missing) or never (no)
SIGN_AUTO, SIGN_YES, SIGN_NO = "auto", "yes", "no"
SIGN_MODES = (SIGN_AUTO, SIGN_YES, SIGN_NO)
CA_DAYS = 3650
CERT_DAYS = 825


class EnrollError(FloraError, RuntimeError):
    """Enrollment cannot proceed (an unknown device, a state dir of another federation, unreadable files)."""


def tls_username(federation: str, device_id: str) -> str:
    """The TLS certificate's CN, which mosquitto makes the MQTT username: unique across federations."""
    return f"{federation}:{device_id}"


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_private(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data, mode=0o600)  # never readable by others, not even for a moment


def _name(cn: str, federation: str, ou: Optional[str] = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn), x509.NameAttribute(NameOID.ORGANIZATION_NAME, federation)]
    if ou:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou))
    return x509.Name(attrs)


@dataclass
class FederationPKI:
    """The CA, the aggregator's keys and the device registry of one federation in one state dir."""

    state_dir: Path
    federation: str

    def __post_init__(self) -> None:
        check_id(self.federation, "federation name")
        self.state_dir = Path(self.state_dir)

    @property
    def pki(self) -> Path:
        return self.state_dir / PKI

    # -- the CA and the aggregator ----------------------------------------------------------------
    def ensure(self, broker_names: Sequence[str] = ("localhost", "127.0.0.1")) -> None:
        """Create the CA, the aggregator's keys and the broker's certificate unless they exist."""
        if (self.pki / "ca.crt").exists():
            registry = self.registry()
            if registry.get("federation") != self.federation:
                raise EnrollError(f"{self.state_dir} enrolls federation {registry.get('federation')!r}, "
                                  f"not {self.federation!r}")
            return
        ca_key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        name = _name(f"{self.federation} CA", self.federation)
        ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(ca_key.public_key())
              .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
              .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
              .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
              .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
              .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
              .sign(ca_key, hashes.SHA256()))
        _write_private(self.pki / "ca.key", _pem_key(ca_key))
        atomic_write_bytes(self.pki / "ca.crt", ca.public_bytes(serialization.Encoding.PEM))
        signer = Ed25519PrivateKey.generate()
        _write_private(self.state_dir / AGGREGATOR_KEY, _pem_key(signer))
        atomic_write_bytes(self.state_dir / AGGREGATOR_PUB, (public_key_b64(signer.public_key()) + "\n").encode())
        self._save_registry({"federation": self.federation, "devices": {}, "revoked_serials": []})
        self._issue_tls("broker", self.pki / "broker", server_names=broker_names)
        self._issue_tls(tls_username(self.federation, AGGREGATOR_ID), self.pki / "aggregator-tls")
        self.write_acl()
        self.write_crl()

    def ca(self):
        return x509.load_pem_x509_certificate((self.pki / "ca.crt").read_bytes()), serialization.load_pem_private_key(
            (self.pki / "ca.key").read_bytes(), password=None)

    def signer(self) -> Ed25519PrivateKey:
        return load_private_key(self.state_dir / AGGREGATOR_KEY)

    def _issue(self, subject: x509.Name, public_key, usage: x509.KeyUsage, eku: Optional[List] = None,
               sans: Sequence[str] = ()) -> x509.Certificate:
        ca, ca_key = self.ca()
        now = datetime.datetime.now(datetime.timezone.utc)
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca.subject).public_key(public_key)
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(usage, critical=True)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
        if eku:
            b = b.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
        if sans:
            names = []
            for s in sans:
                try:
                    names.append(x509.IPAddress(ipaddress.ip_address(s)))
                except ValueError:
                    names.append(x509.DNSName(s))
            b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return b.sign(ca_key, hashes.SHA256())

    def _issue_tls(self, cn: str, stem: Path, server_names: Sequence[str] = ()) -> x509.Certificate:
        key = ec.generate_private_key(ec.SECP256R1())
        usage = x509.KeyUsage(True, False, True, False, False, False, False, False, False)
        eku = [ExtendedKeyUsageOID.SERVER_AUTH] if server_names else [ExtendedKeyUsageOID.CLIENT_AUTH]
        cert = self._issue(_name(cn, self.federation), key.public_key(), usage, eku, server_names)
        _write_private(stem.with_suffix(".key"), _pem_key(key))
        atomic_write_bytes(stem.with_suffix(".crt"), cert.public_bytes(serialization.Encoding.PEM))
        return cert

    # -- devices ----------------------------------------------------------------------------------
    def registry(self) -> Dict:
        try:
            return json.loads((self.state_dir / REGISTRY).read_text())
        except (OSError, ValueError) as exc:
            raise EnrollError(f"cannot read {self.state_dir / REGISTRY}: {exc}") from exc

    def _save_registry(self, reg: Dict) -> None:
        atomic_write_json(self.state_dir / REGISTRY, reg)

    def enroll(self, device_id: str, out: Optional[Path] = None, broker: str = "mqtts://localhost:8883") -> Path:
        """Issue a device's identity and TLS certificate into `out`; register it; rewrite the ACL."""
        check_id(device_id)
        if device_id == AGGREGATOR_ID:
            raise EnrollError(f"{AGGREGATOR_ID} is the aggregator's own name")
        self.ensure()
        reg = self.registry()
        if device_id in reg["devices"] and not reg["devices"][device_id].get("revoked"):
            raise EnrollError(f"{device_id} is enrolled already: revoke it first to issue new credentials")
        out = Path(out) if out else Path("flora-enrolled") / device_id
        identity, id_cert = self.issue_identity(device_id)
        _write_private(out / IDENTITY_KEY, _pem_key(identity))
        atomic_write_bytes(out / IDENTITY_CERT, id_cert.public_bytes(serialization.Encoding.PEM))
        tls = self._issue_tls(tls_username(self.federation, device_id), out / "tls")
        atomic_write_bytes(out / CA_CERT, (self.pki / "ca.crt").read_bytes())
        aggregator_pub = (self.state_dir / AGGREGATOR_PUB).read_text().strip()
        atomic_write_bytes(out / AGGREGATOR_PUB, (aggregator_pub + "\n").encode())
        atomic_write_bytes(out / "agent.toml", self._snippet(device_id, out, broker, aggregator_pub).encode())
        reg["devices"][device_id] = {
            "identity_key": public_key_b64(identity.public_key()),
            "identity_serial": str(id_cert.serial_number), "tls_serial": str(tls.serial_number),
            "enrolled_at": datetime.datetime.now(datetime.timezone.utc).isoformat(), "revoked": False,
        }
        self._save_registry(reg)
        self.write_acl()
        return out

    def issue_identity(self, device_id: str):
        """A fresh Ed25519 identity key and its certificate (nothing written: `enroll` writes and registers)."""
        identity = Ed25519PrivateKey.generate()
        usage = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
        return identity, self._issue(_name(device_id, self.federation, IDENTITY_OU), identity.public_key(), usage)

    def _snippet(self, device_id: str, out: Path, broker: str, aggregator_pub: str) -> str:
        d = out.resolve()
        return "\n".join([
            f"# flora-agent config for {device_id} in federation {self.federation} (written by flora-aggregator",
            "# enroll). Copy this folder to the device and fix the paths if it lands elsewhere.",
            f'client_id = "{device_id}"',
            f'federation = "{self.federation}"',
            f'broker = "{broker}"',
            f'tls_ca = "{d / CA_CERT}"',
            f'tls_cert = "{d / "tls.crt"}"',
            f'tls_key = "{d / "tls.key"}"',
            f'identity_dir = "{d}"',
            f'aggregator_key = "{aggregator_pub}"',
            "",
        ])

    def revoke(self, device_id: str) -> None:
        """Mark the device revoked, list its certificates in the CRL, and drop it from the ACL."""
        reg = self.registry()
        entry = reg["devices"].get(device_id)
        if entry is None:
            raise EnrollError(f"{device_id} is not enrolled in federation {self.federation}")
        if entry.get("revoked"):
            return
        entry["revoked"] = True
        entry["revoked_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
        reg["revoked_serials"] = sorted(set(reg.get("revoked_serials", [])) | {entry["identity_serial"],
                                                                              entry["tls_serial"]})
        self._save_registry(reg)
        self.write_acl()
        self.write_crl()

    def identity_keys(self) -> Dict[str, Ed25519PublicKey]:
        """The enrolled, unrevoked devices' identity keys (what the aggregator checks signatures against)."""
        if not (self.state_dir / REGISTRY).exists():
            return {}
        return {d: public_key_from_b64(e["identity_key"]) for d, e in self.registry()["devices"].items()
                if not e.get("revoked")}

    # -- broker files -----------------------------------------------------------------------------
    def acl_text(self) -> str:
        fed = self.federation
        base = f"flora/{fed}"
        lines = [f"# FLORA federation {fed}: written by flora-aggregator enroll/revoke; do not edit by hand.",
                 "# Usernames are the TLS certificates' CNs (mosquitto use_identity_as_username).", "",
                 f"user {tls_username(fed, AGGREGATOR_ID)}"]
        # readwrite: the aggregator watches its own retained topics for what others publish there (No Local)
        lines += [f"topic readwrite {base}/{t}" for t in ("global", "round", "secagg/stage")]
        lines += [f"topic write {base}/secagg/inbox/+"]
        lines += [f"topic read {base}/{t}" for t in ("update/+", "status/+", "metrics/+", "secagg/up/+")]
        for device in sorted(self.identity_keys()):
            lines += ["", f"user {tls_username(fed, device)}"]
            lines += [f"topic read {base}/{t}" for t in ("global", "round", "secagg/stage", f"secagg/inbox/{device}")]
            lines += [f"topic write {base}/{t}/{device}" for t in ("update", "status", "metrics", "secagg/up")]
        return "\n".join(lines) + "\n"

    def write_acl(self) -> Path:
        path = self.state_dir / ACL
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, self.acl_text().encode())
        return path

    def write_crl(self) -> Path:
        ca, ca_key = self.ca()
        now = datetime.datetime.now(datetime.timezone.utc)
        b = (x509.CertificateRevocationListBuilder().issuer_name(ca.subject).last_update(now)
             .next_update(now + datetime.timedelta(days=CERT_DAYS)))
        for serial in self.registry().get("revoked_serials", []):
            b = b.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(int(serial))
                                          .revocation_date(now).build())
        path = self.pki / "crl.pem"
        atomic_write_bytes(path, b.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
        return path


def aggregator_signer(state_dir: Path, federation: str, mode: str = SIGN_AUTO) -> Optional[Ed25519PrivateKey]:
    """The key the aggregator signs `global` and `round` with (`aggregator.key` in its state dir), per `mode`:
    auto signs when the federation's keys exist (`enroll` made them), yes makes them if missing, no never
    signs. EnrollError for a state dir whose keys are another federation's."""
    if mode not in SIGN_MODES:
        raise EnrollError(f"--sign must be one of {', '.join(SIGN_MODES)}, got {mode!r}")
    if mode == SIGN_NO:
        return None
    pki = FederationPKI(state_dir, federation)
    if mode == SIGN_YES or (pki.pki / "ca.crt").exists():
        pki.ensure()  # checks the federation of existing keys
    if not (pki.state_dir / AGGREGATOR_KEY).exists():
        return None
    return pki.signer()
