"""A certificate install killed at any instant leaves the old identity or the new one.

A forked child installs a renewal under a line tracer that sends itself SIGKILL at the N-th
traced line; the parent then reads the store back (which finishes or discards the
interrupted install) and checks that key, certificate, CA and chain all belong to one
identity. The two identities chain to different CAs, so a mixed `ca.pem` is caught too.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from koi_tray.certmesh import pki
from koi_tray.certmesh.errors import InvalidPayload
from koi_tray.certmesh.layout import DataDir
from koi_tray.certmesh.leafstore import LeafStore

HOST = "node-a"
KILL_POINTS = 240
PEM_KEY_HEADER = b"-----BEGIN PRIVATE KEY-----"

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


@dataclass(frozen=True)
class Identity:
    """A key, its leaf and the CA that signed it, as the store should hold them."""

    key: object
    cert: object
    ca_cert: object

    @property
    def fingerprint(self) -> str:
        return pki.fingerprint(self.cert)

    @property
    def files(self) -> dict[str, bytes]:
        cert_pem, ca_pem = pki.cert_to_pem(self.cert), pki.cert_to_pem(self.ca_cert)
        return {"cert.pem": cert_pem, "ca.pem": ca_pem, "fullchain.pem": cert_pem + ca_pem}


def _identity(now: dt.datetime) -> Identity:
    ca_key = pki.generate_key()
    ca_cert = pki.create_ca_certificate(ca_key, now)
    key = pki.generate_key()
    cert = pki.issue_leaf(
        ca_key, ca_cert, key.public_key(), HOST, [HOST], now, dt.timedelta(days=90)
    )
    return Identity(key, cert, ca_cert)


def _install_in_child(store: LeafStore, identity: Identity, kill_at: int, report: Path) -> int:
    """Fork; the child installs `identity` and is SIGKILLed at traced line `kill_at`.

    With `kill_at` 0 the child runs to the end and writes how many lines it traced to
    `report`. Returns the child's wait status.
    """
    pid = os.fork()
    if pid == 0:
        lines = 0

        def tracer(frame, event, arg):
            nonlocal lines
            if event == "line":
                lines += 1
                if lines == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
            return tracer

        try:
            sys.settrace(tracer)
            store.install(identity.key, identity.cert, identity.ca_cert)
            sys.settrace(None)
            report.write_text(str(lines))
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return status


def _no_private_key_is_exposed(root: Path) -> None:
    for path in root.rglob("*"):
        mode = stat.S_IMODE(path.lstat().st_mode)
        if path.is_dir():
            assert mode & 0o077 == 0, f"{path} is {mode:o}"
        elif PEM_KEY_HEADER in path.read_bytes() or path.name == "key.pem":
            assert mode & 0o077 == 0, f"{path} is {mode:o}"


def _installed_identity(store: LeafStore, candidates: dict[str, Identity]) -> Identity:
    leaf = store.read()
    assert leaf is not None
    identity = candidates.get(leaf.fingerprint)
    assert identity is not None, "cert.pem is neither the old nor the new certificate"
    assert pki.keys_match(leaf.key, identity.cert)
    assert pki.public_key_fingerprint(leaf.key.public_key()) == pki.public_key_fingerprint(
        identity.key.public_key()
    )
    for name, content in identity.files.items():
        assert store.path(name).read_bytes() == content, f"{name} does not match cert.pem"
    leaf.cert.verify_directly_issued_by(leaf.ca_cert)

    assert stat.S_IMODE(store.path("key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE(store.dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(store.certs_dir.stat().st_mode) == 0o700
    assert sorted(p.name for p in store.certs_dir.iterdir()) == [HOST]
    return identity


def test_install_killed_anywhere_leaves_a_whole_identity(tmp_path: Path):
    now = dt.datetime.now(dt.UTC)
    data = DataDir(tmp_path / "member-node").prepare()
    store = LeafStore(data.certs, HOST)
    first, second = _identity(now), _identity(now)
    candidates = {first.fingerprint: first, second.fingerprint: second}
    store.install(first.key, first.cert, first.ca_cert)
    report = tmp_path / "lines"

    counts = []
    for identity in (second, first):
        assert _install_in_child(store, identity, 0, report) == 0
        counts.append(int(report.read_text()))
        assert _installed_identity(store, candidates) is identity
    total = min(counts)
    assert total > KILL_POINTS

    points = sorted({1 + round(i * (total - 2) / (KILL_POINTS - 1)) for i in range(KILL_POINTS)})
    assert len(points) >= 200
    current = first
    outcomes = {"old": 0, "new": 0}
    for point in points:
        target = second if current is first else first
        status = _install_in_child(store, target, point, report)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, point

        _no_private_key_is_exposed(data.certs)
        found = _installed_identity(store, candidates)
        outcomes["new" if found is target else "old"] += 1
        current = found

    assert outcomes["old"] > 0 and outcomes["new"] > 0, outcomes


def test_leftover_staging_is_discarded(tmp_path: Path):
    now = dt.datetime.now(dt.UTC)
    store = LeafStore(DataDir(tmp_path).prepare().certs, HOST)
    old = _identity(now)
    store.install(old.key, old.cert, old.ca_cert)
    staging = store.certs_dir / f".{HOST}.staging"
    staging.mkdir(mode=0o700)
    (staging / "key.pem").write_bytes(b"half a key")

    assert store.recover() == "rolled back"
    assert _installed_identity(store, {old.fingerprint: old}) is old


def test_committed_install_is_rolled_forward(tmp_path: Path):
    now = dt.datetime.now(dt.UTC)
    store = LeafStore(DataDir(tmp_path).prepare().certs, HOST)
    old, new = _identity(now), _identity(now)
    store.install(old.key, old.cert, old.ca_cert)
    commit = store.certs_dir / f".{HOST}.commit"
    commit.mkdir(mode=0o700)
    (commit / "key.pem").write_bytes(pki.key_to_pem(new.key))
    os.chmod(commit / "key.pem", 0o600)
    for name, content in new.files.items():
        (commit / name).write_bytes(content)
    os.replace(commit / "key.pem", store.path("key.pem"))

    assert store.recover() == "rolled forward"
    assert _installed_identity(store, {old.fingerprint: old, new.fingerprint: new}) is new


def test_mismatched_key_is_refused_before_anything_is_written(tmp_path: Path):
    now = dt.datetime.now(dt.UTC)
    store = LeafStore(DataDir(tmp_path).prepare().certs, HOST)
    old, new = _identity(now), _identity(now)
    store.install(old.key, old.cert, old.ca_cert)
    before = {p: p.read_bytes() for p in store.certs_dir.rglob("*") if p.is_file()}

    with pytest.raises(InvalidPayload):
        store.install(pki.generate_key(), new.cert, new.ca_cert)

    assert {p: p.read_bytes() for p in store.certs_dir.rglob("*") if p.is_file()} == before


def test_first_install_creates_private_directories(tmp_path: Path):
    now = dt.datetime.now(dt.UTC)
    store = LeafStore(tmp_path / "certs", HOST)
    assert store.read() is None
    identity = _identity(now)

    store.install(identity.key, identity.cert, identity.ca_cert)

    assert _installed_identity(store, {identity.fingerprint: identity}) is identity
