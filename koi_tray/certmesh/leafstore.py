"""A node's own key and certificate on disk, installed as one unit.

`certs/<host>/` holds `key.pem`, `cert.pem`, `ca.pem` and `fullchain.pem`. A renewal
writes the new four into `certs/.<host>.staging/`, fsyncs them, and renames that
directory to `certs/.<host>.commit/`: that rename is the commit point. The files are then
moved into place one by one. `recover` (run before every read and install) finishes a
committed install or discards an uncommitted one, so a process killed at any instant
comes back with a key and a certificate that match: the old pair or the new one.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from koi_tray.certmesh import pki
from koi_tray.certmesh.errors import CorruptState, InvalidPayload, StorageError
from koi_tray.certmesh.files import (
    PRIVATE_FILE,
    PUBLIC_FILE,
    ensure_private_dir,
    fsync_dir,
    write_new_file,
)

log = logging.getLogger(__name__)

KEY, CERT, CA, FULLCHAIN = "key.pem", "cert.pem", "ca.pem", "fullchain.pem"
FILES = (KEY, CERT, CA, FULLCHAIN)


_LOCKS: dict[Path, threading.RLock] = {}
_LOCKS_GUARD = threading.Lock()


def _lock_for(directory: Path) -> threading.RLock:
    """One lock per leaf directory in this process, shared by every LeafStore on it.

    Reads run `recover`, which must never mistake another thread's install in progress
    for one a crash interrupted.
    """
    key = directory.resolve()
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(key, threading.RLock())


@dataclass(frozen=True)
class Leaf:
    """A node's installed identity."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    ca_cert: x509.Certificate

    @property
    def fingerprint(self) -> str:
        return pki.fingerprint(self.cert)


class LeafStore:
    """Reads and installs the identity under `certs/<hostname>/`."""

    def __init__(self, certs_dir: Path, hostname: str) -> None:
        self.certs_dir = certs_dir
        self.hostname = hostname
        self.dir = certs_dir / hostname
        self._staging = certs_dir / f".{hostname}.staging"
        self._commit = certs_dir / f".{hostname}.commit"
        self._lock = _lock_for(self.dir)

    def path(self, name: str) -> Path:
        return self.dir / name

    def exists(self) -> bool:
        with self._lock:
            self.recover()
            return all(self.path(name).exists() for name in (KEY, CERT, CA))

    def recover(self) -> str | None:
        """Finish or discard an interrupted install; return what was done, or None.

        An install in progress in this process holds the same lock, so only an install
        that a crash interrupted is ever finished or discarded here.
        """
        with self._lock:
            return self._recover()

    def _recover(self) -> str | None:
        if self._commit.is_dir():
            self._move_committed()
            log.warning("finished an interrupted certificate install for %s", self.hostname)
            return "rolled forward"

        if self._staging.exists():
            shutil.rmtree(self._staging)
            fsync_dir(self.certs_dir)
            log.warning("discarded an unfinished certificate install for %s", self.hostname)
            return "rolled back"
        return None

    def _move_committed(self) -> None:
        ensure_private_dir(self.dir)
        for name in FILES:
            staged = self._commit / name
            if staged.exists():
                os.replace(staged, self.path(name))
        fsync_dir(self.dir)
        self._commit.rmdir()
        fsync_dir(self.certs_dir)

    def read(self) -> Leaf | None:
        """Return the installed identity, or None when there is none.

        Raises:
            CorruptState: The files exist but cannot be parsed or do not match.
        """
        with self._lock:
            return self._read()

    def _read(self) -> Leaf | None:
        if not self.exists():
            return None
        try:
            key = pki.load_key_pem(self.path(KEY).read_bytes())
            cert = pki.load_cert_pem(self.path(CERT).read_bytes())
            ca_cert = pki.load_cert_pem(self.path(CA).read_bytes())
        except (OSError, ValueError, InvalidPayload) as exc:
            raise CorruptState(f"cannot read the certificate files in {self.dir}: {exc}") from exc
        if not pki.keys_match(key, cert):
            raise CorruptState(f"{self.path(KEY)} does not match {self.path(CERT)}")
        return Leaf(key, cert, ca_cert)

    def install(
        self,
        key: ec.EllipticCurvePrivateKey,
        cert: x509.Certificate,
        ca_cert: x509.Certificate,
    ) -> None:
        """Install a key, its certificate and the CA as one unit.

        Raises:
            InvalidPayload: `cert` does not certify `key`; nothing is written.
            StorageError: The disk refused; the previous identity is still installed.
        """
        if not pki.keys_match(key, cert):
            raise InvalidPayload("refusing to install a certificate for another key")

        cert_pem = pki.cert_to_pem(cert)
        ca_pem = pki.cert_to_pem(ca_cert)
        contents = {
            KEY: (pki.key_to_pem(key), PRIVATE_FILE),
            CERT: (cert_pem, PUBLIC_FILE),
            CA: (ca_pem, PUBLIC_FILE),
            FULLCHAIN: (cert_pem + ca_pem, PUBLIC_FILE),
        }
        with self._lock:
            self._recover()
            ensure_private_dir(self.certs_dir)
            try:
                self._stage(contents)
            except OSError as exc:
                shutil.rmtree(self._staging, ignore_errors=True)
                raise StorageError(
                    f"cannot stage new certificate files for {self.hostname}: {exc}"
                ) from exc

            try:
                os.rename(self._staging, self._commit)
            except OSError as exc:
                shutil.rmtree(self._staging, ignore_errors=True)
                raise StorageError(f"cannot commit new certificate files: {exc}") from exc
            try:
                fsync_dir(self.certs_dir)
                self._move_committed()
            except OSError as exc:
                raise StorageError(
                    f"the new certificate for {self.hostname} is committed but not yet in "
                    f"place ({exc}); it is finished at the next start"
                ) from exc

    def _stage(self, contents: dict[str, tuple[bytes, int]]) -> None:
        if self._staging.exists():
            shutil.rmtree(self._staging)
        self._staging.mkdir(mode=0o700)
        for name, (data, mode) in contents.items():
            write_new_file(self._staging / name, data, mode)
        fsync_dir(self._staging)

    def write_ca(self, ca_cert: x509.Certificate) -> bool:
        """Refresh `ca.pem` and `fullchain.pem` from a verified bundle; True if changed."""
        leaf = self.read()
        if leaf is None or pki.cert_to_pem(leaf.ca_cert) == pki.cert_to_pem(ca_cert):
            return False
        self.install(leaf.key, leaf.cert, ca_cert)
        return True
