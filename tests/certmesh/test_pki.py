"""The certificate profile: the CA and every leaf it issues, checked by independent verifiers.

Each issued certificate (a member's join leaf, its renewal, the CA node's own leaf) must pass
`openssl verify -x509_strict` and cryptography's RFC 5280 verifier as a server and as a
client certificate, and carry exactly koi-tray's profile.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from koitest import PASSPHRASE, member_csr
from meshtools import PEER, join_member, openssl_verify, rfc5280_verify

from koi_tray.certmesh import keystore, pki
from koi_tray.certmesh.ca import CertificateAuthority, JoinRequest
from koi_tray.certmesh.clock import ManualClock
from koi_tray.certmesh.errors import InvalidPayload

NINETY_DAYS = dt.timedelta(days=90)
FIVE_MINUTES = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class Issued:
    """One certificate the CA issued, with what it should say."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey | None
    hostname: str
    sans: tuple[str, ...]
    issued_at: dt.datetime


@pytest.fixture
def issued(ca: CertificateAuthority, clock: ManualClock) -> dict[str, Issued]:
    """A join leaf, a renewal leaf 61 days later, and the CA node's own leaf."""
    self_leaf = ca.leaf_store.read()
    out = {
        "self": Issued(
            self_leaf.cert,
            self_leaf.key,
            "ca-host",
            ("ca-host", "ca-host.local", "localhost", "127.0.0.1"),
            clock.now(),
        ),
    }
    key, result = join_member(ca, "node-a", sans=["alias.lan", "10.0.0.9"])
    join_sans = ("node-a", "node-a.local", "alias.lan", "10.0.0.9")
    leaf = pki.load_cert_pem(result.service_cert_pem)
    out["join"] = Issued(leaf, key, "node-a", join_sans, clock.now())

    clock.advance(dt.timedelta(days=61))
    new_key, csr = member_csr("node-a")
    renewed = ca.renew_member("node-a", pki.fingerprint(leaf), "node-a", csr)
    out["renewal"] = Issued(
        pki.load_cert_pem(renewed.service_cert_pem), new_key, "node-a", join_sans, clock.now()
    )
    return out


KINDS = ["join", "renewal", "self"]


def _san_strings(cert: x509.Certificate) -> tuple[str, ...]:
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return tuple(
        str(name.value) if isinstance(name.value, ipaddress.IPv4Address) else name.value
        for name in names
    )


def test_ca_certificate_profile(ca: CertificateAuthority, clock: ManualClock, tmp_path: Path):
    cert = ca.ca_cert
    now = clock.now()

    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical
    assert ku.value.key_cert_sign and ku.value.crl_sign
    assert not (ku.value.digital_signature or ku.value.key_encipherment)
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    assert cert.not_valid_after_utc == now + dt.timedelta(days=3650)
    assert cert.not_valid_before_utc == now - FIVE_MINUTES
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Koi Certmesh CA"
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    cert.verify_directly_issued_by(cert)

    openssl_verify(tmp_path, cert, cert, now)
    assert (
        ca.ca_fingerprint
        == hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    )


@pytest.mark.parametrize("kind", KINDS)
def test_leaf_passes_openssl_strict_verify(
    kind: str, issued: dict[str, Issued], ca: CertificateAuthority, tmp_path: Path
):
    leaf = issued[kind]
    output = openssl_verify(tmp_path, ca.ca_cert, leaf.cert, leaf.issued_at)
    assert "leaf.pem: OK" in output


@pytest.mark.parametrize("kind", KINDS)
def test_leaf_passes_rfc5280_verifier_as_server_and_client(
    kind: str, issued: dict[str, Issued], ca: CertificateAuthority
):
    leaf = issued[kind]
    rfc5280_verify(ca.ca_cert, leaf.cert, leaf.hostname, leaf.issued_at + dt.timedelta(hours=1))
    for name in leaf.sans:
        if not re.fullmatch(r"[\d.]+", name):
            rfc5280_verify(ca.ca_cert, leaf.cert, name, leaf.issued_at)


@pytest.mark.parametrize("kind", KINDS)
def test_leaf_profile(kind: str, issued: dict[str, Issued], ca: CertificateAuthority):
    leaf = issued[kind]
    cert = leaf.cert
    ext = cert.extensions

    assert cert.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, leaf.hostname)])
    assert cert.issuer == ca.ca_cert.subject
    assert _san_strings(cert) == leaf.sans

    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical
    assert ku.value.digital_signature and ku.value.key_encipherment
    assert not (ku.value.key_cert_sign or ku.value.crl_sign or ku.value.content_commitment)
    eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    bc = ext.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    ski = ext.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca.ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest

    assert cert.not_valid_before_utc == leaf.issued_at - FIVE_MINUTES
    assert cert.not_valid_after_utc == leaf.issued_at + NINETY_DAYS
    assert 0 < cert.serial_number < 2**159
    assert pki.keys_match(leaf.key, cert)
    cert.verify_directly_issued_by(ca.ca_cert)


def test_serials_are_random_even_for_the_same_key(ca: CertificateAuthority, clock: ManualClock):
    ca_key = keystore.decrypt_ca_key(ca.data.ca_key.read_bytes(), PASSPHRASE)
    key = pki.generate_key()
    serials = [
        pki.issue_leaf(
            ca_key,
            ca.ca_cert,
            key.public_key(),
            "node-a",
            ["node-a"],
            clock.now(),
            NINETY_DAYS,
        ).serial_number
        for _ in range(16)
    ]

    assert len(set(serials)) == 16
    assert all(serial > 0 for serial in serials)
    assert max(serials).bit_length() > 150
    assert max(serials) - min(serials) > 2**100


def test_renewal_and_join_leaves_differ_in_serial_key_and_fingerprint(issued: dict[str, Issued]):
    join, renewal = issued["join"], issued["renewal"]
    assert join.cert.serial_number != renewal.cert.serial_number
    assert pki.fingerprint(join.cert) != pki.fingerprint(renewal.cert)
    assert not pki.keys_match(join.key, renewal.cert)


def test_leaf_subject_and_sans_come_from_the_ca_not_the_csr(ca: CertificateAuthority):
    key = pki.generate_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Evil Corp"),
                    x509.NameAttribute(NameOID.COMMON_NAME, "node-a"),
                ]
            )
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("ca-host"), x509.DNSName("bank.example")]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
        .decode()
    )
    code = ca.mint_invite("node-a").code
    pending = ca.check_join(JoinRequest("node-a", csr, code, PEER))
    cert = pki.load_cert_pem(ca.finish_join(pending, None).service_cert_pem)

    assert cert.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node-a")])
    assert _san_strings(cert) == ("node-a", "node-a.local")


def test_openssl_verify_helper_can_fail(ca: CertificateAuthority, clock, tmp_path: Path):
    """A leaf from another CA, or checked after it expired, is refused by the same helper."""
    other_key = pki.generate_key()
    other_ca = pki.create_ca_certificate(other_key, clock.now())
    leaf_key = pki.generate_key()
    stranger = pki.issue_leaf(
        other_key, other_ca, leaf_key.public_key(), "node-a", ["node-a"], clock.now(), NINETY_DAYS
    )
    with pytest.raises(AssertionError):
        openssl_verify(tmp_path, ca.ca_cert, stranger, clock.now())
    with pytest.raises(AssertionError):
        openssl_verify(tmp_path, other_ca, stranger, clock.now() + dt.timedelta(days=91))
    with pytest.raises(x509.verification.VerificationError):
        rfc5280_verify(ca.ca_cert, stranger, "node-a", clock.now())


def test_confirmation_code_format_and_stability():
    key = pki.generate_key()
    fp = pki.public_key_fingerprint(key.public_key())
    code = pki.confirmation_code(fp)

    assert re.fullmatch(r"\d{3} \d{3}", code)
    assert pki.confirmation_code(fp) == code
    other = pki.confirmation_code(pki.public_key_fingerprint(pki.generate_key().public_key()))
    assert len({code, other, pki.confirmation_code("0" * 64)}) >= 2


def test_check_csr_reports_the_spki_fingerprint_and_dns_names():
    key, csr = member_csr("node-a", ["node-a", "node-a.local", "10.1.2.3"])
    checked = pki.check_csr(csr, "NODE-A")
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )

    assert checked.key_fingerprint == hashlib.sha256(spki).hexdigest()
    assert checked.common_name == "node-a"
    assert checked.dns_names == ("node-a", "node-a.local")


def test_check_csr_accepts_crlf_line_endings():
    _, csr = member_csr("node-a")
    assert pki.check_csr(csr.replace("\n", "\r\n"), "node-a").common_name == "node-a"


def test_load_cert_pem_refuses_garbage_with_invalid_payload():
    with pytest.raises(InvalidPayload, match="not a PEM certificate"):
        pki.load_cert_pem(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
