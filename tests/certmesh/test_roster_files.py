"""State files on disk: damaged ones are kept and named, good ones are private and whole."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from koitest import PASSPHRASE
from meshtools import join_member, member_node

from koi_tray.certmesh import files
from koi_tray.certmesh.ca import CertificateAuthority
from koi_tray.certmesh.clock import ManualClock
from koi_tray.certmesh.errors import CorruptState, StorageError
from koi_tray.certmesh.member import Membership

DAMAGE: dict[str, Callable[[bytes], bytes]] = {
    "truncated": lambda raw: raw[: len(raw) // 2],
    "empty": lambda raw: b"",
    "binary": lambda raw: b"\x00\xff\xfe garbage",
    "latin-1": lambda raw: raw.replace(b"{", "{\u00e9".encode("latin-1"), 1),
    "json-list": lambda raw: b"[1, 2, 3]\n",
    "json-string": lambda raw: b'"roster"\n',
    "missing-required-key": lambda raw: json.dumps({"metadata": {}}).encode(),
    "bad-timestamp": lambda raw: raw.replace(b"2026-12-01T09:00:00Z", b"yesterday"),
}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE)
def test_damaged_roster_is_named_kept_and_untouched(
    ca: CertificateAuthority, clock: ManualClock, damage
):
    roster = ca.data.roster
    damaged = damage(roster.read_bytes())
    roster.write_bytes(damaged)

    with pytest.raises(CorruptState) as refused:
        CertificateAuthority.open(ca.data, "ca-host", clock=clock)

    assert "roster.json" in str(refused.value)
    assert refused.value.code == "corrupt_state"
    assert roster.read_bytes() == damaged
    copies = list(roster.parent.glob("roster.json.corrupt-*"))
    assert len(copies) == 1
    assert copies[0].read_bytes() == damaged
    assert copies[0].stat().st_mode & 0o777 == 0o600


def test_a_second_open_keeps_the_first_copy(ca: CertificateAuthority, clock: ManualClock):
    ca.data.roster.write_bytes(b"{")
    for _ in range(2):
        with pytest.raises(CorruptState):
            CertificateAuthority.open(ca.data, "ca-host", clock=clock)
    assert len(list(ca.data.certmesh.glob("roster.json.corrupt-*"))) == 1


def test_missing_roster_beside_a_ca_key_is_corrupt(ca: CertificateAuthority, clock: ManualClock):
    ca.data.roster.unlink()
    with pytest.raises(CorruptState, match="roster.json is missing"):
        CertificateAuthority.open(ca.data, "ca-host", clock=clock)


def test_damaged_ca_certificate_is_corrupt_state(ca: CertificateAuthority, clock: ManualClock):
    ca.data.ca_cert.write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(CorruptState, match="ca-cert.pem"):
        CertificateAuthority.open(ca.data, "ca-host", clock=clock)


def test_no_ca_in_an_empty_data_dir(ca_data, clock: ManualClock):
    assert CertificateAuthority.open(ca_data, "ca-host", clock=clock) is None


MEMBER_DAMAGE: dict[str, Callable[[bytes], bytes]] = {
    **{name: DAMAGE[name] for name in ("truncated", "empty", "binary", "json-list")},
    "missing-ca-host": lambda raw: json.dumps({"hostname": "node-a"}).encode(),
    "bad-port": lambda raw: raw.replace(b'"ca_http_port": 5641', b'"ca_http_port": "http"'),
    "bad-bundle-time": lambda raw: raw.replace(b'"sans"', b'"last_bundle_at": "soon", "sans"'),
}


@pytest.mark.parametrize("damage", MEMBER_DAMAGE.values(), ids=MEMBER_DAMAGE)
def test_damaged_member_json_is_named_kept_and_untouched(
    ca: CertificateAuthority, clock: ManualClock, tmp_path: Path, damage
):
    member = member_node(ca, clock, tmp_path / "member-node")
    path = member.data.member_state
    damaged = damage(path.read_bytes())
    path.write_bytes(damaged)

    with pytest.raises(CorruptState) as refused:
        Membership.load(member.data, clock)

    assert "member.json" in str(refused.value)
    assert path.read_bytes() == damaged
    copies = list(path.parent.glob("member.json.corrupt-*"))
    assert [c.read_bytes() for c in copies] == [damaged]


def test_roster_round_trips_koi_timestamps_and_unknown_fields(
    ca: CertificateAuthority, clock: ManualClock
):
    join_member(ca, "node-a")
    document = json.loads(ca.data.roster.read_text())
    document["metadata"]["created_at"] = "2026-06-18T10:00:00.123456789Z"
    node = next(m for m in document["members"] if m["hostname"] == "node-a")
    node["proxy_entries"] = [{"name": "web", "listen_port": 8443}]
    node["last_seen"] = "2026-06-18T10:00:00.2+00:00"
    ca.data.roster.write_text(json.dumps(document, indent=2))

    reopened = CertificateAuthority.open(ca.data, "ca-host", clock=clock)
    reopened.unlock(PASSPHRASE)
    join_member(reopened, "node-b")

    saved = json.loads(ca.data.roster.read_text())
    node = next(m for m in saved["members"] if m["hostname"] == "node-a")
    assert node["proxy_entries"] == [{"name": "web", "listen_port": 8443}]
    assert saved["metadata"]["created_at"] == "2026-06-18T10:00:00.123456Z"
    assert [m["hostname"] for m in saved["members"]] == ["ca-host", "node-a", "node-b"]


def _names_under(root: Path) -> list[Path]:
    return [Path(dirpath) / name for dirpath, dirs, names in os.walk(root) for name in dirs + names]


def test_busy_node_leaves_no_temporary_files_and_keeps_secrets_private(
    ca: CertificateAuthority, clock: ManualClock, tmp_path: Path
):
    member = member_node(ca, clock, tmp_path / "member-node")
    join_member(ca, "node-b")
    ca.revoke("node-b")
    ca.set_enrollment(False)
    member.accept_bundle(ca.trust_bundle())
    member.set_reload_hook("/bin/true")
    ca.leaf_store.install(*_installed_identity(ca))

    for root in (ca.data.root, member.data.root):
        leftovers = [p for p in _names_under(root) if p.name.startswith(".")]
        assert leftovers == []

    private = [
        ca.data.ca_key,
        ca.data.roster,
        ca.data.invites,
        ca.data.audit_log,
        ca.data.leaf_dir("ca-host") / "key.pem",
        member.data.member_state,
        member.data.leaf_dir("node-a") / "key.pem",
    ]
    for path in private:
        assert path.stat().st_mode & 0o777 == 0o600, path
    for path in (
        ca.data.root,
        ca.data.certmesh,
        ca.data.ca_dir,
        ca.data.certs,
        ca.data.leaf_dir("ca-host"),
        ca.data.audit_log.parent,
    ):
        assert path.stat().st_mode & 0o777 == 0o700, path


def _installed_identity(ca: CertificateAuthority):
    leaf = ca.leaf_store.read()
    return leaf.key, leaf.cert, leaf.ca_cert


def test_atomic_write_replaces_whole_files_only(tmp_path: Path):
    target = tmp_path / "state.json"
    files.atomic_write_json(target, {"v": 1})
    files.atomic_write_json(target, {"v": 2}, mode=0o644)

    assert json.loads(target.read_text()) == {"v": 2}
    assert target.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_atomic_write_into_a_missing_directory_is_a_storage_error(tmp_path: Path):
    with pytest.raises(StorageError, match="cannot write"):
        files.atomic_write(tmp_path / "absent" / "state.json", b"{}")
    assert not (tmp_path / "absent").exists()


def test_a_damaged_file_is_copied_aside_once_per_damage(tmp_path: Path):
    state = tmp_path / "member.json"
    state.write_bytes(b'{"hostname": "node-02", trunc')

    first = files.preserve_corrupt_copy(state, "20261204T010000Z")
    again = files.preserve_corrupt_copy(state, "20261204T010001Z")
    state.write_bytes(b"\x00\x00")
    other = files.preserve_corrupt_copy(state, "20261204T010002Z")

    assert first == again, "a second start on the same damage made another copy"
    assert first.read_bytes() == b'{"hostname": "node-02", trunc'
    assert other != first and other.read_bytes() == b"\x00\x00"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "member.json",
        "member.json.corrupt-20261204T010000Z",
        "member.json.corrupt-20261204T010002Z",
    ]
