"""Device identity and signed aggregator messages: enrollment issues an identity and a TLS certificate from
the federation's own CA and an ACL confined to the federation; revoke takes them back; signatures bind
purpose and federation; a round jump past the allowed window is refused."""

from __future__ import annotations

import datetime
import json
import re

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from flora.broker.enroll import AGGREGATOR_PUB, EnrollError, FederationPKI, tls_username
from flora.edge import signing
from flora.edge.identity import IdentityError, load_ca, load_identity, verify_identity_cert


@pytest.fixture
def pki(tmp_path):
    p = FederationPKI(tmp_path / "state", "lab")
    p.ensure()
    return p


def test_enroll_issues_identity_tls_acl_and_a_config_snippet(pki, tmp_path):
    out = pki.enroll("pi-kitchen", tmp_path / "pi")
    ca = load_ca(out / "ca.crt")
    ident = load_identity(out, "pi-kitchen", "lab", ca)
    assert ident.device_id == "pi-kitchen" and ident.federation == "lab"
    assert oct((out / "identity.key").stat().st_mode & 0o777) == "0o600"
    assert oct((out / "tls.key").stat().st_mode & 0o777) == "0o600"
    tls = x509.load_pem_x509_certificate((out / "tls.crt").read_bytes())
    tls.verify_directly_issued_by(ca)
    assert tls.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "lab:pi-kitchen"
    assert pki.identity_keys()["pi-kitchen"].public_bytes_raw() == ident.public_key.public_bytes_raw()
    snippet = (out / "agent.toml").read_text()
    assert 'client_id = "pi-kitchen"' in snippet and 'federation = "lab"' in snippet
    assert (out / AGGREGATOR_PUB).read_text().strip() in snippet
    assert not list(pki.state_dir.rglob("identity.key"))  # the state dir keeps no device private key


def test_the_acl_confines_every_device_to_its_own_topics_of_its_own_federation(pki, tmp_path):
    pki.enroll("pi-kitchen", tmp_path / "a")
    pki.enroll("jetson-lab", tmp_path / "b")
    acl = pki.acl_text()
    blocks = {b.split("\n")[0][5:]: b for b in re.split(r"\n(?=user )", acl.split("\n\n", 1)[1])}
    assert set(blocks) == {tls_username("lab", d) for d in ("flora-aggregator", "pi-kitchen", "jetson-lab")}
    for line in acl.splitlines():
        if line.startswith("topic"):
            assert line.split()[2].startswith("flora/lab/"), line  # no flora/+/: never another federation
        assert not line.startswith("pattern")
    kitchen = blocks["lab:pi-kitchen"]
    assert "topic write flora/lab/update/pi-kitchen" in kitchen
    assert "jetson-lab" not in kitchen and "update/+" not in kitchen


def test_revoke_drops_the_device_from_acl_registry_and_lists_it_in_the_crl(pki, tmp_path):
    pki.enroll("pi-kitchen", tmp_path / "a")
    pki.enroll("jetson-lab", tmp_path / "b")
    pki.revoke("pi-kitchen")
    assert "pi-kitchen" not in pki.acl_text()
    assert set(pki.identity_keys()) == {"jetson-lab"}
    crl = x509.load_pem_x509_crl((pki.pki / "crl.pem").read_bytes())
    entry = pki.registry()["devices"]["pi-kitchen"]
    revoked = {r.serial_number for r in crl}
    assert revoked == {int(entry["identity_serial"]), int(entry["tls_serial"])}
    with pytest.raises(EnrollError, match="not enrolled"):
        pki.revoke("nobody")
    pki.enroll("pi-kitchen", tmp_path / "a2")  # re-enrolled with new credentials
    with pytest.raises(EnrollError, match="enrolled already"):
        pki.enroll("pi-kitchen", tmp_path / "a3")


def test_a_state_dir_enrolls_one_federation(pki):
    with pytest.raises(EnrollError, match="federation 'lab'"):
        FederationPKI(pki.state_dir, "other").ensure()


def test_identity_certificates_check_issuer_name_federation_and_kind(pki, tmp_path):
    key, cert = pki.issue_identity("dev1")
    der = cert.public_bytes(serialization.Encoding.DER)
    ca, _ = pki.ca()
    assert verify_identity_cert(der, ca, "dev1", "lab").public_bytes_raw() == key.public_key().public_bytes_raw()
    with pytest.raises(IdentityError, match="names"):
        verify_identity_cert(der, ca, "dev2", "lab")
    with pytest.raises(IdentityError, match="names"):
        verify_identity_cert(der, ca, "dev1", "other")
    other = FederationPKI(tmp_path / "other", "lab")
    other.ensure()
    with pytest.raises(IdentityError, match="not issued"):
        verify_identity_cert(der, other.ca()[0], "dev1", "lab")
    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=5000)
    with pytest.raises(IdentityError, match="not valid"):
        verify_identity_cert(der, ca, "dev1", "lab", now=later)
    tls = x509.load_pem_x509_certificate((pki.pki / "aggregator-tls.crt").read_bytes())
    with pytest.raises(IdentityError):  # a TLS certificate is no identity certificate
        verify_identity_cert(tls.public_bytes(serialization.Encoding.DER), ca,
                             "lab:flora-aggregator", "lab")


def test_signatures_bind_purpose_federation_and_bytes():
    key = Ed25519PrivateKey.generate()
    body = json.dumps({"round": 3}).encode()
    signed = signing.sign(key, "round", "lab", body)
    assert signing.verify(key.public_key(), "round", "lab", signed) == body
    for purpose, fed, payload in (("global", "lab", signed), ("round", "other", signed),
                                  ("round", "lab", signed[:-1] + b"4")):
        with pytest.raises(signing.SignatureError) as e:
            signing.verify(key.public_key(), purpose, fed, payload)
        assert e.value.reason == signing.BAD_SIGNATURE
    with pytest.raises(signing.SignatureError) as e:
        signing.verify(key.public_key(), "round", "lab", body)
    assert e.value.reason == signing.UNSIGNED
    with pytest.raises(signing.SignatureError) as e:
        signing.verify(Ed25519PrivateKey.generate().public_key(), "round", "lab", signed)
    assert e.value.reason == signing.BAD_SIGNATURE
    assert signing.public_key_from_b64(signing.public_key_b64(key.public_key())).public_bytes_raw() == \
        key.public_key().public_bytes_raw()
    with pytest.raises(ValueError):
        signing.public_key_from_b64("AAAA")


def test_the_new_errors_are_flora_errors_with_the_bad_input_status():
    from flora.broker.enroll import EnrollError
    from flora.edge.errors import EXIT_BAD_INPUT, FloraError
    from flora.edge.identity import IdentityError
    from flora.edge.secagg.encoding import EncodingError
    from flora.edge.secagg.messages import MessageError
    from flora.edge.secagg.params import ParamsError
    from flora.edge.secagg.primitives import CryptoError

    for cls in (EnrollError, IdentityError, EncodingError, MessageError, ParamsError, CryptoError,
                signing.SignatureError):
        assert issubclass(cls, FloraError) and cls.exit_code == EXIT_BAD_INPUT, cls


def test_the_enroll_and_revoke_commands(tmp_path, capsys):
    from flora.broker.cli import main

    state = tmp_path / "state"
    args = ["--state-dir", str(state), "--federation", "lab"]
    assert main(["enroll", "pi-1", "--out", str(tmp_path / "pi-1"), "--broker-name", "broker.lan", *args]) == 0
    assert "enrolled pi-1" in capsys.readouterr().out
    broker = x509.load_pem_x509_certificate((state / "pki" / "broker.crt").read_bytes())
    assert broker.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName) == ["broker.lan"]
    assert main(["enroll", "pi-1", "--out", str(tmp_path / "again"), *args]) == 2
    assert "enrolled already" in capsys.readouterr().err
    assert main(["enroll", "pi-1", "--state-dir", str(state), "--federation", "other"]) == 2
    assert main(["revoke", "pi-1", *args]) == 0
    assert "user lab:pi-1" not in (state / "mosquitto" / "acl").read_text()
    assert main(["revoke", "nobody", *args]) == 2
