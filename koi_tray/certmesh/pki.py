"""Certificates and keys: the CA certificate, CSRs, leaves, fingerprints.

Pure functions over `cryptography` objects; nothing here touches the disk. The profile is
Koi certmesh 0.9's, with koi-tray's safer choices: leaves start five minutes in the past,
carry an AKI and a random serial, and a CSR's CN must equal the hostname it joins as.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import secrets
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from koi_tray.certmesh.errors import InvalidPayload
from koi_tray.certmesh.hostnames import is_ip_literal, same_host

CA_COMMON_NAME = "Koi Certmesh CA"
CA_ORGANIZATION = "Koi"
CA_LIFETIME = dt.timedelta(days=3650)
LEAF_BACKDATE = dt.timedelta(minutes=5)
MAX_CSR_PEM_BYTES = 16 * 1024

_ALLOWED_CSR_EXTENSIONS = {
    ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
    ExtensionOID.KEY_USAGE,
    ExtensionOID.EXTENDED_KEY_USAGE,
}


def fingerprint(cert: x509.Certificate) -> str:
    """Return the SHA-256 of the certificate's DER as 64 lowercase hex characters."""
    return cert.fingerprint(hashes.SHA256()).hex()


def public_key_fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """Return the SHA-256 of a public key's SubjectPublicKeyInfo DER, lowercase hex."""
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def confirmation_code(key_fingerprint: str) -> str:
    """Derive the six-digit code both the joiner and the approver see for a CSR key.

    The operator compares it with the code the joining host prints, which proves the
    dialog is about the request that host sent.
    """
    digest = hashlib.sha256(b"koi-tray-confirm-v1:" + key_fingerprint.encode()).digest()
    number = int.from_bytes(digest[:8], "big") % 1_000_000
    return f"{number // 1000:03d} {number % 1000:03d}"


def generate_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_to_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_key_pem(data: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InvalidPayload("private key is not an EC key")
    return key


def cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_cert_pem(data: bytes | str) -> x509.Certificate:
    """Parse one PEM certificate, accepting CRLF line endings.

    Raises:
        InvalidPayload: Not a PEM certificate.
    """
    raw = data.encode() if isinstance(data, str) else data
    try:
        return x509.load_pem_x509_certificate(raw.replace(b"\r\n", b"\n"))
    except ValueError as exc:
        raise InvalidPayload(f"not a PEM certificate: {exc}") from exc


def keys_match(key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> bool:
    """Tell whether `cert` certifies the public half of `key`."""
    return public_key_fingerprint(key.public_key()) == public_key_fingerprint(cert.public_key())


def _general_names(sans: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for san in sans:
        if is_ip_literal(san):
            names.append(x509.IPAddress(ipaddress.ip_address(san)))
        else:
            names.append(x509.DNSName(san))
    return names


def build_csr(key: ec.EllipticCurvePrivateKey, hostname: str, sans: list[str]) -> bytes:
    """Build a PEM CSR the way Koi does: CN = hostname, a SAN extension and nothing else."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
        .add_extension(x509.SubjectAlternativeName(_general_names(sans)), critical=False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def _subject_cn(name: x509.Name) -> str | None:
    values = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(values) != 1:
        return None
    value = values[0].value
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class CheckedCsr:
    """A CSR that passed every check, with what the approver and the issuer need."""

    csr: x509.CertificateSigningRequest
    common_name: str
    key_fingerprint: str
    dns_names: tuple[str, ...]


def check_csr(pem: object, hostname: str) -> CheckedCsr:
    """Check a join or renewal CSR against koi-tray's profile.

    The CSR must be PEM, self-signed correctly with ECDSA P-256 and SHA-256, name exactly
    `hostname` as its only CN, and request no extensions beyond SAN, KU and EKU.

    Raises:
        InvalidPayload: With a message naming the first rule the CSR breaks.
    """
    if not isinstance(pem, str) or not pem.strip():
        raise InvalidPayload("csr is required: a PEM CERTIFICATE REQUEST")
    if len(pem) > MAX_CSR_PEM_BYTES:
        raise InvalidPayload("csr is too large")

    try:
        csr = x509.load_pem_x509_csr(pem.replace("\r\n", "\n").encode("ascii"))
        signature_ok = csr.is_signature_valid
    except (ValueError, UnicodeEncodeError, InvalidSignature) as exc:
        raise InvalidPayload(f"invalid CSR: {exc}") from exc
    if not signature_ok:
        raise InvalidPayload("invalid CSR: its signature does not verify")

    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise InvalidPayload("invalid CSR: the key must be ECDSA P-256")
    if not isinstance(csr.signature_hash_algorithm, hashes.SHA256):
        raise InvalidPayload("invalid CSR: the signature must use SHA-256")

    common_name = _subject_cn(csr.subject)
    if common_name is None or not same_host(common_name, hostname):
        raise InvalidPayload(f"invalid CSR: its CN must be {hostname!r}, got {common_name!r}")

    try:
        extensions = list(csr.extensions)
    except (ValueError, x509.DuplicateExtension) as exc:
        raise InvalidPayload(f"invalid CSR: unreadable extensions ({exc})") from exc
    for extension in extensions:
        if extension.oid not in _ALLOWED_CSR_EXTENSIONS:
            raise InvalidPayload(
                f"invalid CSR: extension {extension.oid.dotted_string} is not allowed"
            )

    dns_names: tuple[str, ...] = ()
    for extension in extensions:
        if isinstance(extension.value, x509.SubjectAlternativeName):
            dns_names = tuple(extension.value.get_values_for_type(x509.DNSName))
    return CheckedCsr(csr, common_name, public_key_fingerprint(key), dns_names)


def key_usage(**allowed: bool) -> x509.KeyUsage:
    """A KeyUsage extension with only the named bits set."""
    bits = (
        "digital_signature",
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "key_cert_sign",
        "crl_sign",
        "encipher_only",
        "decipher_only",
    )
    return x509.KeyUsage(**{bit: allowed.get(bit, False) for bit in bits})


def random_serial() -> int:
    """Return a random positive 159-bit serial (RFC 5280 allows at most 20 octets)."""
    return secrets.randbits(159) | 1


def create_ca_certificate(key: ec.EllipticCurvePrivateKey, now: dt.datetime) -> x509.Certificate:
    """Self-sign the mesh CA: ten years, CA:TRUE pathlen 0, KU keyCertSign + cRLSign."""
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, CA_ORGANIZATION),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(random_serial())
        .not_valid_before(now - LEAF_BACKDATE)
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            key_usage(key_cert_sign=True, crl_sign=True),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )


def issue_leaf(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    subject_key: ec.EllipticCurvePublicKey,
    hostname: str,
    sans: list[str],
    now: dt.datetime,
    lifetime: dt.timedelta,
) -> x509.Certificate:
    """Sign a leaf for `hostname`: serverAuth + clientAuth, CA:FALSE, backdated five minutes.

    The subject is `CN=<hostname>` built here, never copied from a CSR.
    """
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
        .issuer_name(ca_cert.subject)
        .public_key(subject_key)
        .serial_number(random_serial())
        .not_valid_before(now - LEAF_BACKDATE)
        .not_valid_after(now + lifetime)
        .add_extension(x509.SubjectAlternativeName(_general_names(sans)), critical=False)
        .add_extension(
            key_usage(digital_signature=True, key_encipherment=True),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(subject_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


def leaf_common_name(cert: x509.Certificate) -> str | None:
    return _subject_cn(cert.subject)
