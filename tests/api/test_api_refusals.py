"""Every route on both ports, fed bad requests: a JSON refusal with a stable code, no 5xx,
no traceback, and nothing changed on disk.

Three real nodes run on loopback: a CA, a member known only by its files (it calls the
mTLS port), and a running member node (its management routes write `member.json`).
Before and after each request the state files, the audit log and every certificate file
of all three are compared byte for byte; the only change allowed is the audit line the
CA writes on purpose for a refused join.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from apitools import (
    PASSPHRASE,
    Answer,
    assert_error,
    client_context,
    http_base,
    invite_code,
    join,
    member_csr,
    mtls_base,
    no_keyring,
    raw,
    snapshot,
    start_ca,
    start_member,
)

from koi_tray.api.server import MAX_BODY_BYTES
from koi_tray.certmesh import audit
from koi_tray.compose.node import Node

OVERSIZED = json.dumps({"hostname": "node-01", "padding": "x" * (MAX_BODY_BYTES + 1024)})
MALFORMED: list[bytes | str] = [
    '{"hostname": ',
    "{'hostname': 'node-01'}",
    "[1, 2]",
    '"node-01"',
    "42",
    "null",
    "true",
    b"\xff\xfe{}",
    '{"hostname": "node-01", "reason": "\\ud800"}',  # a lone surrogate: not Unicode text
    "[" * 5000 + "]" * 5000,
]
# Routes that read a JSON body, by port: (method, route).
HTTP_BODY_ROUTES = [
    ("POST", "join"),
    ("POST", "invite"),
    ("POST", "revoke"),
    ("POST", "open-enrollment"),
    ("POST", "close-enrollment"),
    ("PUT", "set-hook"),
    ("POST", "unlock"),
    ("POST", "renew-now"),
    ("POST", "create"),
    ("POST", "local-join"),
]
MTLS_ROUTES = [("POST", "renew"), ("POST", "health")]
MEMBER_BODY_ROUTES = [("PUT", "set-hook"), ("POST", "renew-now")]
TOKEN_ROUTES = [
    ("POST", "invite", {"hostname": "node-09"}),
    ("POST", "revoke", {"hostname": "node-01"}),
    ("POST", "open-enrollment", None),
    ("POST", "close-enrollment", None),
    ("PUT", "set-hook", {"hostname": "node-01", "reload": "/bin/true"}),
    ("POST", "unlock", {"passphrase": PASSPHRASE}),
    ("GET", "log", None),
    ("GET", "node-status", None),
    ("POST", "renew-now", {"force": True}),
    ("POST", "create", {"passphrase": PASSPHRASE}),
    ("POST", "local-join", {"endpoint": "http://127.0.0.1:9", "invite": "x"}),
]


@dataclass
class Nodes:
    ca: Node
    member: Node
    roots: list[Path]
    caller_dir: Path  # certs/node-01/ of the member that calls the mTLS port

    def http(self, route: str, node: Node | None = None) -> str:
        return f"{http_base(node or self.ca)}/{route}"

    def mtls(self, route: str) -> str:
        return f"{mtls_base(self.ca)}/{route}"


@pytest_asyncio.fixture
async def nodes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Nodes]:
    no_keyring(monkeypatch)
    ca = await start_ca(tmp_path / "ca")
    member = await start_member(tmp_path / "member-node", "node-05")
    try:
        await join(ca, tmp_path / "caller", "node-01")
        code = await invite_code(ca, "node-05")
        await member.join_mesh(http_base(ca).rsplit("/v1/", 1)[0], code, lambda code: None)
        await settle(member)
        yield Nodes(
            ca,
            member,
            [tmp_path / "ca", tmp_path / "caller", tmp_path / "member-node"],
            tmp_path / "caller" / "certs" / "node-01",
        )
    finally:
        await member.shutdown()
        await ca.shutdown()


async def settle(member: Node) -> None:
    """Wait for the pass a join wakes, so no background write races the snapshots."""
    for _ in range(200):
        if member.renewal.record.view.last_outcome == "not_due":
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the member's first renewal pass did not finish")


class Refusals:
    """Sends bad requests and collects every way an answer falls short, to report at once."""

    def __init__(self, nodes: Nodes) -> None:
        self.nodes = nodes
        self.problems: list[str] = []
        self.count = 0

    async def expect(
        self,
        status: int,
        code: str,
        method: str,
        url: str,
        data: bytes | str | None = None,
        *,
        token: str | None = None,
        mtls: bool = False,
        headers: dict[str, str] | None = None,
    ) -> None:
        before = [snapshot(root) for root in self.nodes.roots]
        context = client_context(self.nodes.caller_dir) if mtls else None
        answer = await raw(method, url, data, token=token, ssl_context=context, headers=headers)
        after = [snapshot(root) for root in self.nodes.roots]
        self.count += 1
        label = f"{method} {url.split('/v1/certmesh')[-1] or url} {str(data)[:60]!r}"
        try:
            assert answer.status < 500, f"5xx: {answer.text}"
            assert_error(answer, status, code)
        except AssertionError as exc:
            self.problems.append(f"{label}: {exc}")
        for root, old, new in zip(self.nodes.roots, before, after, strict=True):
            problem = changed_files(old, new, url.endswith("/join"))
            if problem:
                self.problems.append(f"{label}: changed {root.name}: {problem}")

    def check(self) -> None:
        assert not self.problems, "\n".join(self.problems)


def changed_files(old: dict, new: dict, join_refusal: bool) -> str:
    """Name what changed between two snapshots, allowing audited join refusals."""
    changed = sorted(name for name in old.keys() | new.keys() if old.get(name) != new.get(name))
    if join_refusal and changed == ["audit"]:
        added = new["audit"][len(old["audit"] or b"") :].decode()
        events = [audit.parse_line(line)[1] for line in added.splitlines()]
        if new["audit"].startswith(old["audit"] or b"") and all(
            event.startswith("enroll_") for event in events
        ):
            return ""
    return ", ".join(changed)


@pytest.mark.asyncio
async def test_malformed_and_oversized_bodies(nodes: Nodes) -> None:
    check = Refusals(nodes)
    ca, member = nodes.ca, nodes.member
    for method, route in HTTP_BODY_ROUTES:
        for body in MALFORMED:
            await check.expect(
                400, "invalid_payload", method, nodes.http(route), body, token=ca.token
            )
    for method, route in MTLS_ROUTES:
        for body in MALFORMED:
            await check.expect(400, "invalid_payload", method, nodes.mtls(route), body, mtls=True)
    for method, route in MEMBER_BODY_ROUTES:
        for body in MALFORMED:
            url = nodes.http(route, member)
            await check.expect(400, "invalid_payload", method, url, body, token=member.token)

    every_http = [*HTTP_BODY_ROUTES, ("GET", "status"), ("GET", "trust-bundle")]
    every_http += [("GET", "node-status"), ("GET", "log")]
    for method, route in every_http:
        url = nodes.http(route)
        await check.expect(413, "payload_too_large", method, url, OVERSIZED, token=ca.token)
    for method, route in MTLS_ROUTES:
        await check.expect(
            413, "payload_too_large", method, nodes.mtls(route), OVERSIZED, mtls=True
        )
    for method, route in MEMBER_BODY_ROUTES:
        url = nodes.http(route, member)
        await check.expect(413, "payload_too_large", method, url, OVERSIZED, token=member.token)
    check.check()
    assert check.count == (10 + 2 + 2) * len(MALFORMED) + 14 + 2 + 2


@pytest.mark.asyncio
async def test_wrong_types_and_impossible_values(nodes: Nodes) -> None:
    check = Refusals(nodes)
    ca, member = nodes.ca, nodes.member
    bad = "invalid_payload"
    code = await invite_code(ca, "node-07")
    _, csr = member_csr("node-07")
    _, other_csr = member_csr("node-06")
    _, caller_csr = member_csr("node-01")
    _, ca_csr = member_csr("ca-host")

    def body(**fields: object) -> str:
        return json.dumps(fields)

    http_cases = [
        (400, bad, "POST", "join", body(hostname=42, csr=csr, invite_token=code)),
        (400, bad, "POST", "join", body(hostname="node-07", csr=["x"], invite_token=code)),
        (400, bad, "POST", "join", body(hostname="node-07", csr=other_csr, invite_token=code)),
        (400, bad, "POST", "join", body(hostname="node-07", csr=csr, invite_token=code, sans="x")),
        (400, bad, "POST", "join", body(hostname="node_07!", csr=csr, invite_token=code)),
        (401, "invalid_auth", "POST", "join", body(hostname="node-07", csr=csr, invite_token=42)),
        (401, "invalid_auth", "POST", "join", body(hostname="node-07", csr=csr)),
        (400, bad, "POST", "join", body(hostname="node-07", csr=csr, auth={"method": "totp"})),
        (400, bad, "POST", "invite", body(hostname=42)),
        (400, bad, "POST", "invite", body(hostname="node-08", ttl_mins="60")),
        (400, bad, "POST", "invite", body(hostname="node-08", ttl_mins=1.5)),
        (400, bad, "POST", "invite", body(hostname="node-08", ttl_mins=True)),
        (400, bad, "POST", "invite", body(hostname="node-08", ttl_mins=10**30)),
        (400, bad, "POST", "invite", body(hostname="node-08", ttl_mins=10**6)),
        (400, bad, "POST", "revoke", body(hostname=42)),
        (400, bad, "POST", "revoke", body(hostname="node-01", reason=5)),
        (400, bad, "POST", "revoke", body(hostname="node-01", operator=[])),
        (404, "not_found", "POST", "revoke", body(hostname="nobody")),
        (403, "scope_violation", "POST", "revoke", body(hostname="ca-host")),
        (400, bad, "PUT", "set-hook", body(hostname=42, reload="/bin/true")),
        (400, bad, "PUT", "set-hook", body(hostname="node-01", reload=42)),
        (400, bad, "PUT", "set-hook", body(hostname="node-01", reload="bin/true")),
        (400, bad, "PUT", "set-hook", body(hostname="node-01", reload="/bin/sh -c 'a; b'")),
        (404, "not_found", "PUT", "set-hook", body(hostname="nobody", reload="/bin/true")),
        (400, bad, "POST", "unlock", body(passphrase=42)),
        (400, bad, "POST", "unlock", body()),
        (400, bad, "POST", "renew-now", body(force="true")),
        (400, bad, "POST", "renew-now", body(force=1)),
        (400, bad, "PUT", "set-hook", body(hostname="ca-host", reload="/bin/true")),
        (400, bad, "POST", "create", body(passphrase=42)),
        (400, bad, "POST", "create", body(passphrase=PASSPHRASE, preset=5)),
        (400, bad, "POST", "create", body(passphrase=PASSPHRASE, enrollment_open="yes")),
        (400, bad, "POST", "create", body(passphrase=PASSPHRASE, preset="everyone")),
        (409, "conflict", "POST", "create", body(passphrase=PASSPHRASE)),
        (400, bad, "POST", "local-join", body(endpoint=42, invite=code)),
        (400, bad, "POST", "local-join", body(endpoint="http://127.0.0.1:9")),
        (400, bad, "POST", "local-join", body(endpoint="x", invite=code, hostname=7)),
        (409, "conflict", "POST", "local-join", body(endpoint="http://127.0.0.1:9", invite=code)),
    ]
    for status, error, method, route, data in http_cases:
        await check.expect(status, error, method, nodes.http(route), data, token=ca.token)

    mtls_cases = [
        (400, bad, "renew", body(hostname=42, csr=caller_csr)),
        (400, bad, "renew", body(hostname="node-01", csr=["x"])),
        (400, bad, "renew", body(hostname="node-01", csr={"pem": caller_csr})),
        (400, bad, "renew", body(hostname="node-01")),
        (400, bad, "renew", body(hostname="node-01", csr=other_csr)),
        (403, "scope_violation", "renew", body(hostname="ca-host", csr=ca_csr)),
        (403, "scope_violation", "renew", body(hostname="node-05", csr=member_csr("node-05")[1])),
        (400, bad, "health", body(hostname=42)),
        (403, "scope_violation", "health", body(hostname="node-05")),
    ]
    for status, error, route, data in mtls_cases:
        await check.expect(status, error, "POST", nodes.mtls(route), data, mtls=True)

    member_cases = [
        (400, bad, "PUT", "set-hook", body(hostname="node-05", reload=42)),
        (400, bad, "PUT", "set-hook", body(hostname="node-05", reload="relative")),
        (404, "not_found", "PUT", "set-hook", body(hostname=42, reload="/bin/true")),
        (400, bad, "POST", "renew-now", body(force="yes")),
        (409, "conflict", "POST", "create", body(passphrase=PASSPHRASE)),
        (409, "conflict", "POST", "local-join", body(endpoint="http://127.0.0.1:9", invite=code)),
    ]
    for status, error, method, route, data in member_cases:
        url = nodes.http(route, member)
        await check.expect(status, error, method, url, data, token=member.token)
    check.check()

    # The refused joins held the invite only while checked: it still works.
    assert [i.hostname for i in ca.ca.invites.outstanding()] == ["node-07"]


@pytest.mark.asyncio
async def test_management_routes_need_the_token(nodes: Nodes) -> None:
    check = Refusals(nodes)
    ca, member = nodes.ca, nodes.member
    for method, route, fields in TOKEN_ROUTES:
        data = None if fields is None else json.dumps(fields)
        url = nodes.http(route)
        await check.expect(401, "unauthorized", method, url, data)
        await check.expect(401, "unauthorized", method, url, data, token="not-the-token")
        await check.expect(401, "unauthorized", method, url, data, token=member.token)
        await check.expect(401, "unauthorized", method, url, data, token=ca.token.upper())
        await check.expect(401, "unauthorized", method, url, data, token="")
    for method, route, fields in [
        ("GET", "node-status", None),
        ("GET", "log", None),
        ("PUT", "set-hook", {"hostname": "node-05", "reload": "/bin/true"}),
        ("POST", "renew-now", {"force": True}),
    ]:
        data = None if fields is None else json.dumps(fields)
        url = nodes.http(route, member)
        await check.expect(401, "unauthorized", method, url, data)
        await check.expect(401, "unauthorized", method, url, data, token=ca.token)
    check.check()

    # A token header that is not UTF-8 is just a wrong token.
    port = nodes.ca.address("http")[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"GET /v1/certmesh/log HTTP/1.1\r\nHost: x\r\nx-koi-token: \xff\xfe\r\n"
        b"Connection: close\r\n\r\n"
    )
    reply = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401"), reply
    assert json.loads(body)["error"] == "unauthorized"


@pytest.mark.asyncio
async def test_unknown_routes_and_wrong_methods(nodes: Nodes) -> None:
    check = Refusals(nodes)
    base = http_base(nodes.ca).rsplit("/v1/", 1)[0]
    for method, url in [
        ("GET", nodes.http("nope")),
        ("GET", f"{base}/"),
        ("POST", nodes.http("promote")),
        ("POST", nodes.http("renew")),
        ("POST", nodes.http("status/extra")),
        ("GET", f"{base}/v1/certmesh"),
    ]:
        await check.expect(404, "not_found", method, url, token=nodes.ca.token)
    for method, route in [
        ("GET", "join"),
        ("DELETE", "status"),
        ("POST", "status"),
        ("POST", "trust-bundle"),
        ("GET", "set-hook"),
        ("POST", "set-hook"),
        ("GET", "invite"),
        ("PUT", "revoke"),
    ]:
        await check.expect(405, "method_not_allowed", method, nodes.http(route), "{}")
    for method, route, status, error in [
        ("GET", "renew", 405, "method_not_allowed"),
        ("PUT", "health", 405, "method_not_allowed"),
        ("POST", "join", 404, "not_found"),
        ("GET", "status", 404, "not_found"),
        ("GET", "trust-bundle", 404, "not_found"),
    ]:
        await check.expect(status, error, method, nodes.mtls(route), mtls=True)
    check.check()


@pytest.mark.asyncio
async def test_good_requests_still_work_after_the_refusals(nodes: Nodes) -> None:
    """The same routes answer normally: the refusals above are not refusing everything."""
    ca = nodes.ca
    answer: Answer = await raw(
        "POST", nodes.http("invite"), '{"hostname": "node-09"}', token=ca.token
    )
    assert answer.status == 200, answer.text
    _, csr = member_csr("node-01")
    body = json.dumps({"hostname": "node-01", "csr": csr})
    answer = await raw(
        "POST", nodes.mtls("renew"), body, ssl_context=client_context(nodes.caller_dir)
    )
    assert answer.status == 200, answer.text
    answer = await raw("POST", nodes.http("close-enrollment"), None, token=ca.token)
    assert (answer.status, answer.json) == (200, {"enrollment_state": "closed"})
