"""The CA key at rest: Argon2id-derived key, AES-256-GCM, and keyring auto-unlock.

`ca-key.enc` is koi-tray's own JSON envelope (not Koi's slot table): the Argon2id
parameters and salt, a 12-byte nonce, and the ciphertext of the PKCS#8 DER key, with the
format name as associated data. Deriving the key takes ~0.2 s with the default
parameters, so callers on an event loop run `decrypt_ca_key` in an executor.

Auto-unlock keeps the passphrase in the OS keyring through `keyring`. Where no real
keyring backend is available the CA stays locked and `load_auto_unlock` says why; the
passphrase is never derived from machine data, unlike Koi's fallback.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from koi_tray.certmesh.errors import CorruptState, InvalidAuth, InvalidPayload

log = logging.getLogger(__name__)

FORMAT = "koi-tray-ca-key-v1"
KEYRING_SERVICE = "koi-tray"
MIN_PASSPHRASE_LENGTH = 8


@dataclass(frozen=True)
class KdfParams:
    """Argon2id cost: memory in KiB, iterations, lanes."""

    memory_kib: int = 65536
    iterations: int = 3
    lanes: int = 4

    def check(self) -> None:
        """Refuse costs below the safe floor, or so high that a tampered file hangs unlock.

        Raises:
            CorruptState: Below 8 MiB / 1 iteration / 1 lane, or above 1 GiB / 16 / 16.
        """
        if self.memory_kib < 8192 or self.iterations < 1 or self.lanes < 1:
            raise CorruptState("ca-key.enc asks for Argon2id parameters below the safe floor")
        if self.memory_kib > 1 << 20 or self.iterations > 16 or self.lanes > 16:
            raise CorruptState("ca-key.enc asks for Argon2id parameters above any sane cost")


FAST_TEST_KDF = KdfParams(memory_kib=8192, iterations=1, lanes=1)


def _derive(passphrase: str, salt: bytes, params: KdfParams) -> bytes:
    params.check()
    kdf = Argon2id(
        salt=salt,
        length=32,
        iterations=params.iterations,
        lanes=params.lanes,
        memory_cost=params.memory_kib,
    )
    return kdf.derive(passphrase.encode("utf-8"))


def check_passphrase_strength(passphrase: str) -> None:
    """Refuse passphrases too short to protect a CA key.

    Raises:
        InvalidPayload: Shorter than eight characters.
    """
    if len(passphrase) < MIN_PASSPHRASE_LENGTH:
        raise InvalidPayload(
            f"the CA passphrase must be at least {MIN_PASSPHRASE_LENGTH} characters"
        )


def encrypt_ca_key(
    key: ec.EllipticCurvePrivateKey, passphrase: str, params: KdfParams | None = None
) -> bytes:
    """Seal the CA key under `passphrase`; return the `ca-key.enc` bytes."""
    params = params or KdfParams()
    salt = os.urandom(16)
    nonce = os.urandom(12)
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    sealed = AESGCM(_derive(passphrase, salt, params)).encrypt(nonce, der, FORMAT.encode())
    document = {
        "format": FORMAT,
        "kdf": {
            "algorithm": "argon2id",
            "memory_kib": params.memory_kib,
            "iterations": params.iterations,
            "lanes": params.lanes,
            "salt": base64.b64encode(salt).decode(),
        },
        "nonce": base64.b64encode(nonce).decode(),
        "ciphertext": base64.b64encode(sealed).decode(),
    }
    return (json.dumps(document, indent=2) + "\n").encode()


def decrypt_ca_key(sealed: bytes, passphrase: str) -> ec.EllipticCurvePrivateKey:
    """Open `ca-key.enc` with `passphrase`. Slow on purpose: run it off the event loop.

    Raises:
        InvalidAuth: The passphrase is wrong.
        CorruptState: The file is not a koi-tray CA key envelope.
    """
    try:
        document = json.loads(sealed)
        kdf = document["kdf"]
        params = KdfParams(int(kdf["memory_kib"]), int(kdf["iterations"]), int(kdf["lanes"]))
        salt = base64.b64decode(kdf["salt"], validate=True)
        nonce = base64.b64decode(document["nonce"], validate=True)
        ciphertext = base64.b64decode(document["ciphertext"], validate=True)
        if document.get("format") != FORMAT or kdf.get("algorithm") != "argon2id":
            raise ValueError("unknown format")
        if len(nonce) != 12 or len(salt) < 16:
            raise ValueError("nonce or salt of the wrong length")
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptState(f"ca-key.enc is not a koi-tray CA key ({exc})") from exc

    try:
        der = AESGCM(_derive(passphrase, salt, params)).decrypt(nonce, ciphertext, FORMAT.encode())
    except InvalidTag as exc:
        raise InvalidAuth("wrong CA passphrase") from exc

    key = serialization.load_der_private_key(der, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CorruptState("ca-key.enc holds a key that is not ECDSA")
    return key


def _keyring_username(ca_fingerprint: str) -> str:
    return f"ca-passphrase:{ca_fingerprint}"


def usable_keyring() -> object | None:
    """Return the active keyring backend if it can really keep a secret, else None."""
    try:
        import keyring
        from keyring.backends import fail
    except ImportError:
        return None

    backend = keyring.get_keyring()
    if isinstance(backend, fail.Keyring) or getattr(backend, "priority", 0) <= 0:
        return None
    return backend


def store_auto_unlock(ca_fingerprint: str, passphrase: str) -> str | None:
    """Keep the passphrase in the OS keyring; return None, or why it could not."""
    backend = usable_keyring()
    if backend is None:
        return "no usable OS keyring (a Secret Service, Keychain or Credential Manager)"
    try:
        backend.set_password(KEYRING_SERVICE, _keyring_username(ca_fingerprint), passphrase)
    except Exception as exc:  # noqa: BLE001 - keyring backends raise anything
        log.debug("keyring refused to store the CA passphrase", exc_info=True)
        return f"the OS keyring refused to store the passphrase: {exc}"
    return None


def load_auto_unlock(ca_fingerprint: str) -> tuple[str | None, str | None]:
    """Return (passphrase, None) from the keyring, or (None, why it is not available)."""
    backend = usable_keyring()
    if backend is None:
        return None, "auto-unlock is on but no usable OS keyring is available"
    try:
        secret = backend.get_password(KEYRING_SERVICE, _keyring_username(ca_fingerprint))
    except Exception as exc:  # noqa: BLE001 - keyring backends raise anything
        log.debug("keyring lookup failed", exc_info=True)
        return None, f"the OS keyring could not be read: {exc}"
    if secret is None:
        return None, "auto-unlock is on but the keyring holds no passphrase for this CA"
    return secret, None


def forget_auto_unlock(ca_fingerprint: str) -> None:
    backend = usable_keyring()
    if backend is None:
        return
    try:
        backend.delete_password(KEYRING_SERVICE, _keyring_username(ca_fingerprint))
    except Exception:  # noqa: BLE001 - absent entries raise backend-specific errors
        log.debug("no keyring entry to forget for CA %s", ca_fingerprint[:16])
