"""A full disk under a member's install and under the CA's roster commit.

Each data dir lives on a small tmpfs mounted for the test (the suite runs as root in CI;
where mounting is not permitted the tests skip and say so). The disk is filled with a
filler file, a renewal or a roster change runs into ENOSPC, and then the filler is removed:
the failure must be a clear `StorageError`, the files on disk must still be the old,
matching state, and the next attempt after freeing space must work.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from koitest import PASSPHRASE, join_in_process, member_csr
from reltools import DirectLink

from koi_tray.certmesh import keystore, pki
from koi_tray.certmesh.ca import PRESETS, CertificateAuthority, JoinRequest
from koi_tray.certmesh.clock import ManualClock
from koi_tray.certmesh.enrollment import enroll
from koi_tray.certmesh.errors import StorageError
from koi_tray.certmesh.layout import DataDir
from koi_tray.compose.renewal import member_pass


class Disk:
    """A tmpfs of a fixed size, and a filler file that takes all of its free space."""

    def __init__(self, mount: Path) -> None:
        self.mount = mount
        self.filler = mount / "filler"

    def fill(self) -> None:
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for size in (65536, 4096, 512, 1):
                while True:
                    try:
                        os.write(fd, b"\0" * size)
                    except OSError as exc:
                        assert exc.errno == errno.ENOSPC, exc
                        break
        finally:
            os.close(fd)
        with pytest.raises(OSError):
            (self.mount / "probe").write_bytes(b"x" * 4096)

    def free(self) -> None:
        self.filler.unlink()


def mount_tmpfs(path: Path, size: str) -> Iterator[Disk]:
    path.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill up here: {done.stderr.strip()}")
    try:
        yield Disk(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def member_disk(tmp_path: Path) -> Iterator[Disk]:
    yield from mount_tmpfs(tmp_path / "member-disk", "64k")


@pytest.fixture
def ca_disk(tmp_path: Path) -> Iterator[Disk]:
    yield from mount_tmpfs(tmp_path / "ca-disk", "256k")


def files(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.asyncio
async def test_member_install_on_a_full_disk_keeps_the_old_pair(
    make_ca, clock: ManualClock, member_disk: Disk
):
    ca = make_ca("just-me")
    membership = join_in_process(ca, member_disk.mount / "member", clock)
    link = DirectLink(ca, membership)
    assert (await member_pass(membership, link, clock)).outcome == "not_due"
    old = membership.leaf()
    member_disk.fill()
    before = files(member_disk.mount / "member")

    failures = [await member_pass(membership, link, clock, force=True) for _ in range(3)]

    for result in failures:
        assert result.outcome == "failed", result
        assert "No space left on device" in result.detail, result.detail
        assert "refused" not in result.detail, "a local disk error is not the CA refusing"
    assert "cannot install the renewed certificate" in failures[0].detail
    assert files(member_disk.mount / "member") == before, "a failed install changed files"
    leaf = membership.leaf()
    assert leaf.fingerprint == old.fingerprint and pki.keys_match(leaf.key, leaf.cert)
    assert not list((member_disk.mount / "member" / "certs").glob(".node-02.*"))

    member_disk.free()
    result = await member_pass(membership, link, clock, force=True)

    assert result.outcome == "renewed", result
    leaf = membership.leaf()
    assert leaf.fingerprint != old.fingerprint and pki.keys_match(leaf.key, leaf.cert)
    entry = ca.roster.find("node-02")
    assert (entry.cert_fingerprint, entry.previous_cert_fingerprint) == (
        leaf.fingerprint,
        old.fingerprint,
    )


def make_ca_on(root: Path, clock: ManualClock) -> CertificateAuthority:
    return CertificateAuthority.create(
        DataDir(root),
        "ca-host",
        PASSPHRASE,
        PRESETS["just-me"],
        "Alice",
        clock=clock,
        kdf=keystore.FAST_TEST_KDF,
    )


@pytest.mark.asyncio
async def test_ca_roster_commit_on_a_full_disk_rolls_back_and_recovers(
    ca_disk: Disk, clock: ManualClock, tmp_path: Path
):
    ca = make_ca_on(ca_disk.mount / "ca", clock)
    member = join_in_process(ca, tmp_path / "member", clock)
    invite = ca.mint_invite("node-03").code
    durable, roster_bytes = ca.roster, ca.data.roster.read_bytes()
    invites_bytes = ca.data.invites.read_bytes()
    ca_disk.fill()

    with pytest.raises(StorageError, match="No space left on device"):
        await DirectLink(ca, member).renew(member_csr("node-02")[1])
    with pytest.raises(StorageError, match="No space left"):
        ca.revoke("node-02", reason="disk test")
    key, csr = member_csr("node-03")
    with pytest.raises(StorageError):
        await enroll(ca, JoinRequest("node-03", csr, invite, "127.0.0.1"), None)

    assert ca.rosters.working is ca.rosters.durable is durable, "the working roster fell back"
    assert ca.data.roster.read_bytes() == roster_bytes
    assert ca.data.invites.read_bytes() == invites_bytes, "the invite was not spent"
    assert ca.roster.find("node-02").cert_fingerprint == member.leaf().fingerprint
    assert ca.pending_approvals() == []
    assert not list(ca.data.certmesh.glob(".*.tmp")), "a failed write left a temporary file"

    ca_disk.free()
    answer = await enroll(ca, JoinRequest("node-03", csr, invite, "127.0.0.1"), None)
    result = await member_pass(member, DirectLink(ca, member), clock, force=True)

    assert answer.hostname == "node-03" and result.outcome == "renewed", result
    assert ca.roster.seq == durable.seq + 2, "only the two later changes were recorded"
    assert ca.roster.find("node-02").status == "active"
    assert ca.roster.find("node-02").cert_fingerprint == member.leaf().fingerprint
    reopened = CertificateAuthority.open(ca.data, "ca-host", clock=clock)
    assert reopened.roster == ca.roster
