"""The CA key at rest, unlocking it, and auto-unlock through the OS keyring."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import keyring
import pytest
from cryptography.hazmat.primitives import serialization
from keyring.backend import KeyringBackend
from keyring.backends import fail
from koitest import PASSPHRASE
from meshtools import audit_added, snapshot

from koi_tray.certmesh import keystore, pki
from koi_tray.certmesh.ca import PRESETS, CertificateAuthority
from koi_tray.certmesh.clock import ManualClock
from koi_tray.certmesh.errors import (
    CaLocked,
    Conflict,
    CorruptState,
    InvalidAuth,
    InvalidPayload,
)
from koi_tray.certmesh.layout import DataDir


def _reopen(ca: CertificateAuthority, clock: ManualClock) -> CertificateAuthority:
    return CertificateAuthority.open(ca.data, "ca-host", clock=clock)


@pytest.fixture
def no_keyring() -> Iterator[None]:
    previous = keyring.get_keyring()
    keyring.set_keyring(fail.Keyring())
    yield
    keyring.set_keyring(previous)


@pytest.fixture
def memory_keyring() -> Iterator[dict[tuple[str, str], str]]:
    """Stand in for an OS keyring (Secret Service, Keychain), which this headless box lacks.

    The class is defined here, after the real backend was chosen, and unregistered again so
    that keyring never picks it for any other test.
    """
    previous = keyring.get_keyring()
    store: dict[tuple[str, str], str] = {}

    class MemoryKeyring(KeyringBackend):
        priority = 1

        def get_password(self, service: str, username: str) -> str | None:
            return store.get((service, username))

        def set_password(self, service: str, username: str, password: str) -> None:
            store[(service, username)] = password

        def delete_password(self, service: str, username: str) -> None:
            del store[(service, username)]

    keyring.set_keyring(MemoryKeyring())
    yield store
    keyring.set_keyring(previous)
    KeyringBackend._classes.discard(MemoryKeyring)


def test_wrong_passphrase_is_invalid_auth_and_audited(ca: CertificateAuthority, clock):
    locked = _reopen(ca, clock)
    before = snapshot(ca.data)

    with pytest.raises(InvalidAuth) as refused:
        locked.unlock("not the passphrase")

    assert refused.value.code == "invalid_auth"
    assert refused.value.http_status == 401
    assert locked.locked
    added = audit_added(ca.data, before)
    assert [(event, fields) for _, event, fields in added] == [
        ("unlock_failed", {"via": "passphrase"})
    ]
    with pytest.raises(CaLocked):
        locked.trust_bundle()


def test_right_passphrase_unlocks(ca: CertificateAuthority, clock: ManualClock):
    locked = _reopen(ca, clock)
    assert locked.locked and locked.status()["ca_locked"] is True
    with pytest.raises(CaLocked, match="locked"):
        locked.trust_bundle()

    locked.unlock(PASSPHRASE)

    assert not locked.locked
    assert locked.trust_bundle()["bundle"]["ca_fingerprint"] == ca.ca_fingerprint


def test_key_file_holds_no_plaintext_key(ca: CertificateAuthority):
    sealed = ca.data.ca_key.read_bytes()
    key = keystore.decrypt_ca_key(sealed, PASSPHRASE)
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    scalar = key.private_numbers().private_value.to_bytes(32, "big")

    assert pki.keys_match(key, ca.ca_cert)
    secrets = [der, pki.key_to_pem(key), scalar, scalar.hex().encode(), PASSPHRASE.encode()]
    for secret in secrets + [base64.b64encode(der), base64.b64encode(scalar)]:
        assert secret not in sealed
    assert json.loads(sealed)["format"] == keystore.FORMAT
    assert ca.data.ca_key.stat().st_mode & 0o777 == 0o600


def _tamper(field: str):
    def mangle(document: dict) -> None:
        raw = bytearray(base64.b64decode(document[field]))
        raw[len(raw) // 2] ^= 0x01
        document[field] = base64.b64encode(bytes(raw)).decode()

    return mangle


@pytest.mark.parametrize(
    "mangle, error",
    [
        (_tamper("ciphertext"), InvalidAuth),
        (_tamper("nonce"), InvalidAuth),
        (lambda d: d["kdf"].update(salt=base64.b64encode(b"x" * 16).decode()), InvalidAuth),
        (lambda d: d["kdf"].update(memory_kib=1024), CorruptState),
        (lambda d: d.update(format="koi-slots-v1"), CorruptState),
        (lambda d: d.update(ciphertext="%%%"), CorruptState),
        (lambda d: d.pop("nonce"), CorruptState),
        (lambda d: d.update(nonce=""), CorruptState),
        (lambda d: d.update(nonce=base64.b64encode(b"x" * 7).decode()), CorruptState),
        (lambda d: d["kdf"].update(memory_kib=64 << 20), CorruptState),
        (lambda d: d["kdf"].update(iterations=10**6), CorruptState),
    ],
    ids=[
        "ciphertext",
        "nonce",
        "salt",
        "weak-kdf",
        "format",
        "bad-base64",
        "no-nonce",
        "empty-nonce",
        "short-nonce",
        "huge-memory",
        "huge-iterations",
    ],
)
def test_tampered_key_file_is_refused(ca: CertificateAuthority, clock, mangle, error):
    document = json.loads(ca.data.ca_key.read_bytes())
    mangle(document)
    ca.data.ca_key.write_text(json.dumps(document))
    locked = _reopen(ca, clock)

    with pytest.raises(error):
        locked.unlock(PASSPHRASE)
    assert locked.locked


def test_key_file_of_another_ca_is_corrupt_state(ca: CertificateAuthority, clock, tmp_path):
    stranger = keystore.encrypt_ca_key(pki.generate_key(), PASSPHRASE, keystore.FAST_TEST_KDF)
    ca.data.ca_key.write_bytes(stranger)
    locked = _reopen(ca, clock)

    with pytest.raises(CorruptState, match="does not belong"):
        locked.unlock(PASSPHRASE)
    assert locked.locked


def test_without_a_keyring_auto_unlock_stays_locked_and_says_why(
    no_keyring, make_ca, clock: ManualClock
):
    ca = make_ca("just-me")
    assert ca.auto_unlock is True
    locked = _reopen(ca, clock)

    assert locked.try_auto_unlock() is False

    assert locked.locked
    assert "keyring" in locked.locked_reason
    with pytest.raises(CaLocked, match="keyring"):
        locked.trust_bundle()


def test_auto_unlock_off_stays_locked(memory_keyring, make_ca, clock: ManualClock):
    ca = make_ca("organization", "Alice")
    assert memory_keyring == {}
    locked = _reopen(ca, clock)

    assert locked.try_auto_unlock() is False
    assert "auto-unlock is off" in locked.locked_reason


def test_auto_unlock_through_a_keyring(memory_keyring, make_ca, clock: ManualClock):
    ca = make_ca("just-me")
    assert list(memory_keyring.values()) == [PASSPHRASE]
    ((service, _),) = memory_keyring
    assert service == keystore.KEYRING_SERVICE
    locked = _reopen(ca, clock)

    assert locked.try_auto_unlock() is True

    assert not locked.locked and locked.locked_reason is None
    assert locked.trust_bundle()["bundle"]["ca_fingerprint"] == ca.ca_fingerprint


def test_wrong_passphrase_in_the_keyring_stays_locked(memory_keyring, make_ca, clock: ManualClock):
    ca = make_ca("just-me")
    ((entry, _),) = memory_keyring.items()
    memory_keyring[entry] = "stale passphrase"
    locked = _reopen(ca, clock)
    before = snapshot(ca.data)

    assert locked.try_auto_unlock() is False

    assert locked.locked
    assert "keyring passphrase is wrong" in locked.locked_reason
    assert [(e, f) for _, e, f in audit_added(ca.data, before)] == [
        ("unlock_failed", {"via": "keyring"})
    ]


def test_keyring_without_an_entry_for_this_ca(memory_keyring, make_ca, clock: ManualClock):
    ca = make_ca("just-me")
    keystore.forget_auto_unlock(ca.ca_fingerprint)
    assert memory_keyring == {}
    locked = _reopen(ca, clock)

    assert locked.try_auto_unlock() is False
    assert "holds no passphrase" in locked.locked_reason


@pytest.mark.parametrize(
    "passphrase, preset, operator, error",
    [
        ("short", "just-me", "Alice", InvalidPayload),
        (PASSPHRASE, "team", None, InvalidPayload),
        (PASSPHRASE, "team", "   ", InvalidPayload),
    ],
    ids=["short-passphrase", "approval-without-operator", "blank-operator"],
)
def test_create_refuses_unsafe_settings(
    ca_data: DataDir, clock, passphrase, preset, operator, error
):
    with pytest.raises(error):
        CertificateAuthority.create(
            ca_data,
            "ca-host",
            passphrase,
            PRESETS[preset],
            operator,
            clock=clock,
            kdf=keystore.FAST_TEST_KDF,
        )
    assert not ca_data.ca_key.exists()


def test_create_refuses_a_second_ca_and_a_bad_hostname(ca: CertificateAuthority, clock, tmp_path):
    before = ca.data.ca_key.read_bytes()
    with pytest.raises(Conflict):
        CertificateAuthority.create(
            ca.data,
            "ca-host",
            PASSPHRASE,
            PRESETS["just-me"],
            "Alice",
            clock=clock,
            kdf=keystore.FAST_TEST_KDF,
        )
    assert ca.data.ca_key.read_bytes() == before

    with pytest.raises(InvalidPayload):
        CertificateAuthority.create(
            DataDir(tmp_path / "x"),
            "bad|host",
            PASSPHRASE,
            PRESETS["just-me"],
            "Alice",
            clock=clock,
            kdf=keystore.FAST_TEST_KDF,
        )
