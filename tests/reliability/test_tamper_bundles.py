"""Tampered, foreign and replayed trust bundles, as a network attacker would serve them.

`tests/certmesh/test_bundle.py` already refuses every single-field change of a bundle, a
bundle of another CA or signed by another key, a lower seq, and an old bundle handed to a
reloaded `Membership`. This module adds what those leave out:

- generated mutations of any shape (hypothesis): a bundle is accepted only if what was
  signed is unchanged, and nothing but `BundleRejected` ever comes out;
- the replay over the wire: the bundle travels over plain HTTP, so an attacker who takes
  over the CA's address after the member restarts serves an older bundle the CA really
  signed, then tampered and foreign ones, and answers no CA would give. The member's
  renewal pass and loop must refuse each, keep running, and change no file.
"""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from apitools import http_base, join, no_keyring, start_ca
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from koi_tray.api.client import HttpCaLink, fetch_json
from koi_tray.certmesh import keystore, pki
from koi_tray.certmesh.bundle import canonical_bytes, verify_bundle
from koi_tray.certmesh.ca import PRESETS, CertificateAuthority, JoinRequest
from koi_tray.certmesh.clock import ManualClock, SystemClock
from koi_tray.certmesh.errors import BundleRejected
from koi_tray.certmesh.layout import DataDir
from koi_tray.certmesh.member import Membership
from koi_tray.compose.renewal import RenewalLoop, RenewalRecord, member_pass

# -- generated mutations, in-process --------------------------------------------------------


@pytest.fixture(scope="module")
def signed_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    """A CA's wire bundle with two members and a revocation, and the CA's fingerprint."""
    ca = CertificateAuthority.create(
        DataDir(tmp_path_factory.mktemp("bundle-ca")),
        "ca-host",
        "correct horse battery",
        PRESETS["just-me"],
        "Alice",
        clock=ManualClock(),
        kdf=keystore.FAST_TEST_KDF,
    )
    for host in ("node-a", "node-r"):
        key = pki.generate_key()
        csr = pki.build_csr(key, host, [host]).decode()
        pending = ca.check_join(JoinRequest(host, csr, ca.mint_invite(host).code))
        ca.finish_join(pending, None)
    ca.revoke("node-r")
    return json.loads(json.dumps(ca.trust_bundle())), ca.ca_fingerprint


def _nodes(value: Any, path: tuple = ()) -> list[tuple]:
    """Every path into a JSON value, containers included."""
    paths = [path]
    if isinstance(value, dict):
        for key, item in value.items():
            paths += _nodes(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            paths += _nodes(item, (*path, index))
    return paths


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=4,
)
OPS = ["replace", "delete", "add key", "edit text", "nudge number", "as float", "reorder"]


def _mutate(target: Any, op: str, value: Any, index: int) -> Any:
    """Return `target` changed by `op` (or unchanged when `op` does not apply to it)."""
    if op == "replace":
        return value
    if op == "delete" and isinstance(target, (dict, list)) and target:
        keys = list(target) if isinstance(target, dict) else list(range(len(target)))
        del target[keys[index % len(keys)]]
    elif op == "add key" and isinstance(target, dict):
        target[str(value)[:12]] = value
    elif op == "edit text" and isinstance(target, str):
        at = index % (len(target) + 1)
        return target[:at] + (str(value)[:1] or "x") + target[at + 1 :]
    elif op == "nudge number" and isinstance(target, int) and not isinstance(target, bool):
        return target + (index % 5) - 2
    elif op == "as float" and isinstance(target, int) and not isinstance(target, bool):
        return float(target)
    elif op == "reorder" and isinstance(target, list):
        target.reverse()
    return target


@settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(
    changes=st.lists(
        st.tuples(st.integers(0, 10_000), st.sampled_from(OPS), JSON_VALUES, st.integers(0, 99)),
        min_size=1,
        max_size=3,
    )
)
def test_generated_tampering_is_refused_unless_nothing_signed_changed(signed_bundle, changes):
    wire, pin = signed_bundle
    tampered = copy.deepcopy(wire)
    for where, op, value, index in changes:
        paths = _nodes(tampered)
        path = paths[where % len(paths)]
        if not path:
            tampered = _mutate(tampered, op, value, index)
            continue
        parent = tampered
        for step in path[:-1]:
            parent = parent[step]
        parent[path[-1]] = _mutate(parent[path[-1]], op, value, index)

    try:
        verified = verify_bundle(tampered, pin, None)
    except BundleRejected:
        return
    assert canonical_bytes(tampered["bundle"]) == canonical_bytes(wire["bundle"]), changes
    assert verified.seq == wire["bundle"]["seq"]


# -- replays and hostile answers over the wire ------------------------------------------------


class Impostor:
    """Serves whatever `answer` returns at the trust-bundle route, on the CA's old port."""

    def __init__(self) -> None:
        self.answer: Callable[[], web.StreamResponse] = lambda: web.json_response({})
        self.runner: web.AppRunner | None = None

    async def start(self, port: int) -> None:
        async def bundle(request: web.Request) -> web.StreamResponse:
            return self.answer()

        app = web.Application()
        app.router.add_get("/v1/certmesh/trust-bundle", bundle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


class Wire:
    """A member that saw two bundles from a real CA, then restarted; an impostor took over."""

    def __init__(self, member_root: Path, old: dict, new: dict, other: dict) -> None:
        self.member_root = member_root
        self.old, self.new, self.other = old, new, other
        self.impostor = Impostor()

    def files(self) -> dict[str, bytes]:
        root = self.member_root
        return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    def membership(self) -> Membership:
        """The member as it comes back after a restart: loaded from its files."""
        return Membership.load(DataDir(self.member_root), SystemClock())


@pytest_asyncio.fixture
async def wire(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Wire]:
    no_keyring(monkeypatch)
    other_ca = await start_ca(tmp_path / "other-ca", hostname="other-host")
    ca = await start_ca(tmp_path / "ca")
    try:
        membership = await join(ca, tmp_path / "member", "node-02")
        old = await fetch_json("GET", f"{http_base(ca)}/trust-bundle")
        assert (await member_pass(membership, HttpCaLink(membership), SystemClock())).bundle_seq
        await join(ca, tmp_path / "member-3", "node-03")
        ca.ca.revoke("node-03")
        result = await member_pass(membership, HttpCaLink(membership), SystemClock())
        assert result.bundle_updated and result.bundle_seq > old["bundle"]["seq"]
        new = await fetch_json("GET", f"{http_base(ca)}/trust-bundle")
        other = await fetch_json("GET", f"{http_base(other_ca)}/trust-bundle")
        port = ca.address("http")[1]
    finally:
        await ca.shutdown()
        await other_ca.shutdown()
    state = Wire(tmp_path / "member", old, new, other)
    await state.impostor.start(port)
    try:
        yield state
    finally:
        await state.impostor.stop()


def _answers(wire: Wire) -> dict[str, Callable[[], web.StreamResponse]]:
    def json_answer(value: object, status: int = 200) -> Callable[[], web.StreamResponse]:
        return lambda: web.json_response(value, status=status)

    def text_answer(text: str) -> Callable[[], web.StreamResponse]:
        return lambda: web.Response(text=text, content_type="application/json")

    lower = copy.deepcopy(wire.new)
    lower["bundle"]["seq"] = wire.old["bundle"]["seq"]
    unrevoked = copy.deepcopy(wire.new)
    unrevoked["bundle"]["revoked"] = []
    return {
        "the older bundle the CA signed": json_answer(wire.old),
        "the newer bundle with its seq lowered": json_answer(lower),
        "the newer bundle with the revocation dropped": json_answer(unrevoked),
        "another CA's bundle": json_answer(wire.other),
        "another CA's signature on our bundle": json_answer(
            {"bundle": wire.new["bundle"], "signature": wire.other["signature"]}
        ),
        "a 5,000-digit number": text_answer('{"bundle": {"seq": ' + "9" * 5000 + "}}"),
        "JSON nested 50,000 deep": text_answer("[" * 50_000 + "]" * 50_000),
        "not JSON": text_answer("<html>hello</html>"),
        "a disk error of the CA's": json_answer({"error": "io_error", "message": "full"}, 500),
    }


@pytest.mark.asyncio
async def test_a_restarted_member_refuses_replayed_and_forged_bundles_over_the_wire(wire: Wire):
    before = wire.files()
    seq = wire.membership().state.last_bundle_seq
    assert seq == wire.new["bundle"]["seq"] > wire.old["bundle"]["seq"]

    for name, answer in _answers(wire).items():
        wire.impostor.answer = answer
        membership = wire.membership()  # a restart before each attempt
        result = await member_pass(membership, HttpCaLink(membership), SystemClock())
        assert result.outcome == "failed" and result.reachable, (name, result)
        assert result.detail.startswith("trust bundle refused"), (name, result)
        assert wire.files() == before, f"{name}: the member's files changed"
        assert wire.membership().state.last_bundle_seq == seq

    wire.impostor.answer = lambda: web.json_response(wire.new)
    membership = wire.membership()
    result = await member_pass(membership, HttpCaLink(membership), SystemClock())
    assert result.outcome == "not_due" and not result.bundle_updated, result


@pytest.mark.asyncio
async def test_the_renewal_loop_survives_every_hostile_answer(wire: Wire, tmp_path: Path):
    membership = wire.membership()
    results = []
    loop = RenewalLoop(
        lambda force: member_pass(membership, HttpCaLink(membership), SystemClock(), force),
        RenewalRecord(tmp_path / "renewal.json"),
        SystemClock(),
        on_result=results.append,
    )
    for answer in _answers(wire).values():
        wire.impostor.answer = answer
        await loop.pass_now()
    assert [r.outcome for r in results] == ["failed"] * len(_answers(wire))
    assert loop.record.view.consecutive_failures == len(results)
