"""A damaged `roster.json` or `member.json` when a node starts.

`tests/certmesh/test_roster_files.py` checks the loaders; here a whole `Node.start()` meets
the damage, as a host would after a crash or a bad disk. The start must fail with a
`CorruptState` naming the file, keep a `.corrupt-<stamp>` copy of exactly the damaged
bytes, leave every other file as it was, and release the data dir. A second start fails
the same way and keeps the first copy.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from apitools import join, no_keyring, start_ca

from koi_tray.certmesh.errors import CorruptState
from koi_tray.certmesh.layout import DataDir
from koi_tray.compose.config import NodeConfig
from koi_tray.compose.deciders import deny_and_log_decider
from koi_tray.compose.lock import is_locked
from koi_tray.compose.node import Node

Damage = Callable[[bytes], bytes]
DAMAGE: dict[str, Damage] = {
    "truncated": lambda raw: raw[: len(raw) // 2],
    "cut to its first byte": lambda raw: raw[:1],
    "empty": lambda raw: b"",
    "zeroed": lambda raw: b"\0" * len(raw),
    "garbage": lambda raw: bytes(range(256)) * 4,
    "not UTF-8": lambda raw: raw.replace(b'"', b"\xff", 1),
    "a JSON list": lambda raw: b"[]",
    "JSON null": lambda raw: b"null",
    "a sequence number that is an object": lambda raw: re.sub(
        rb'"((?:last_bundle_)?seq)": \d+', rb'"\1": {}', raw, count=1
    ),
    "a 5,000-digit number": lambda raw: b'{"metadata": ' + b"9" * 5000 + b"}",
    "nested 100,000 deep": lambda raw: b"[" * 100_000 + b"]" * 100_000,
}


def files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "node.lock"
    }


def config(root: Path, hostname: str) -> NodeConfig:
    return NodeConfig(
        data_dir=root, hostname=hostname, http_port=0, mtls_port=0, mtls_bind="127.0.0.1"
    )


async def refused_start(root: Path, hostname: str, damaged: Path) -> CorruptState:
    node = Node(config(root, hostname), deny_and_log_decider())
    with pytest.raises(CorruptState) as caught:
        await node.start()
    assert damaged.name in str(caught.value), caught.value
    assert node.describe() == {"servers": [], "tasks": []}
    assert not is_locked(DataDir(root).lock_file), "a failed start kept the data dir locked"
    return caught.value


async def check_refused(root: Path, hostname: str, damaged: Path, damage: Damage) -> None:
    original = damaged.read_bytes()
    bad = damage(original)
    assert bad != original
    damaged.write_bytes(bad)
    before = files(root)

    await refused_start(root, hostname, damaged)
    await asyncio.sleep(0)
    await refused_start(root, hostname, damaged)

    after = files(root)
    copies = [name for name in after if ".corrupt-" in name]
    assert len(copies) == 1, copies
    assert copies[0].startswith(str(damaged.relative_to(root)) + ".corrupt-")
    assert after.pop(copies[0]) == bad, "the copy is not the damaged file"
    assert after == before, "a refused start changed files"


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA data dir and a member data dir, made once and copied by each test."""
    root = tmp_path_factory.mktemp("made")

    async def make() -> None:
        with pytest.MonkeyPatch.context() as patch:
            no_keyring(patch)
            ca = await start_ca(root / "ca")
            try:
                await join(ca, root / "member", "node-02")
            finally:
                await ca.shutdown()

    asyncio.run(make())
    return {"ca": root / "ca", "member": root / "member"}


def copy_of(source: Path, target: Path) -> Path:
    target.mkdir(mode=0o700)
    for path in sorted(source.rglob("*")):
        relative = target / path.relative_to(source)
        if path.is_dir():
            relative.mkdir(mode=0o700)
        elif path.name not in ("node.lock", "node.json", "node.token"):
            relative.write_bytes(path.read_bytes())
            relative.chmod(path.stat().st_mode & 0o777)
    return target


@pytest.mark.asyncio
@pytest.mark.parametrize("damage", list(DAMAGE))
async def test_ca_node_refuses_a_damaged_roster(made, tmp_path: Path, damage: str):
    root = copy_of(made["ca"], tmp_path / "ca")
    await check_refused(root, "ca-host", DataDir(root).roster, DAMAGE[damage])


@pytest.mark.asyncio
@pytest.mark.parametrize("damage", list(DAMAGE))
async def test_member_node_refuses_a_damaged_member_json(made, tmp_path: Path, damage: str):
    root = copy_of(made["member"], tmp_path / "member")
    await check_refused(root, "node-02", DataDir(root).member_state, DAMAGE[damage])


@pytest.mark.asyncio
async def test_the_copies_start_cleanly_when_undamaged(made, tmp_path: Path):
    for name, hostname in (("ca", "ca-host"), ("member", "node-02")):
        node = Node(config(copy_of(made[name], tmp_path / name), hostname), deny_and_log_decider())
        await node.start()
        assert node.role == name
        await node.shutdown()
