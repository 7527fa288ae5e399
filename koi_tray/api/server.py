"""The node's two listeners: Koi's HTTP routes and the mTLS renewal port.

The HTTP app carries `/v1/certmesh/*`: `join`, `status` and `trust-bundle` answer anyone;
every other route needs the `x-koi-token` header and a caller on the node's own machine.
`create` and `local-join` (koi-tray's own) turn an unconfigured node into a CA or a
member. The mTLS app carries `renew` and `health`; its TLS layer admits only client
certificates chained to the mesh CA, and each handler takes the caller's identity (CN
and leaf fingerprint) from the handshake.

Handlers hold no lock while a join waits for a person, and run signing and fsync work
in the loop's executor, so status and bundle requests are answered meanwhile.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hmac
import ipaddress
import json
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web
from cryptography import x509

from koi_tray.api.errors import Handler, json_errors, read_json_object
from koi_tray.certmesh import pki
from koi_tray.certmesh.ca import CertificateAuthority, JoinRequest, JoinResult, require_ca
from koi_tray.certmesh.enrollment import run_in_thread
from koi_tray.certmesh.errors import CertmeshError, InvalidPayload, PayloadTooLarge, Unauthorized
from koi_tray.certmesh.member import Membership

log = logging.getLogger(__name__)

PREFIX = "/v1/certmesh"
MAX_BODY_BYTES = 64 * 1024
TOKEN_HEADER = "x-koi-token"


class NodeService(Protocol):
    """What the routes need from a running node (implemented by `compose.node.Node`)."""

    token: str

    @property
    def ca(self) -> CertificateAuthority | None: ...

    def koi_status(self) -> dict[str, Any]: ...

    def node_status(self) -> dict[str, Any]: ...

    async def join(self, join: JoinRequest) -> JoinResult: ...

    async def unlock(self, passphrase: str) -> None: ...

    async def renew_now(self, force: bool) -> dict[str, Any]: ...

    async def set_hook(self, hostname: object, command: object) -> dict[str, Any]: ...

    def audit_text(self) -> str: ...

    async def create_ca(
        self,
        passphrase: str,
        preset: str,
        operator: str | None,
        *,
        hostname: str | None = None,
        **overrides: bool | None,
    ) -> CertificateAuthority: ...

    async def join_mesh(
        self,
        endpoint: str,
        invite: str,
        on_code: Callable[[str], None],
        *,
        hostname: str | None = None,
    ) -> Membership: ...


def is_same_machine(peer: str | None, local: str | None) -> bool:
    """Whether a caller's address is this machine: loopback, or the listener's address."""
    if not peer:
        return False
    try:
        address = ipaddress.ip_address(peer.split("%")[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or bool(mapped and mapped.is_loopback) or peer == local


def _require_local(request: web.Request) -> None:
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    local = sockname[0] if sockname else None
    if not is_same_machine(request.remote, local):
        raise Unauthorized("this route answers only programs on the node's own machine")


def _require_token(request: web.Request, token: str) -> None:
    """Admit a management call: the right token, from a program on this machine.

    Only local programs can read the owner-only token file, so a caller elsewhere on the
    LAN (where `--http-bind` exposes the port for joins) is refused even with it.
    """
    given = request.headers.get(TOKEN_HEADER, "").encode("utf-8", "replace")
    if not hmac.compare_digest(given, token.encode()):
        raise Unauthorized("Missing or invalid x-koi-token header")
    _require_local(request)


def _string(body: dict[str, object], key: str, required: bool = True) -> str | None:
    value = body.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise InvalidPayload(f"{key!r} must be a string")
    return value


def _flag(body: dict[str, object], key: str) -> bool | None:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise InvalidPayload(f"{key!r} must be true or false")
    return value


def membership_summary(membership: Membership) -> dict[str, Any]:
    """What `certmesh join` reports: the name joined as, the CA pin, the leaf's expiry."""
    leaf = membership.leaf()
    return {
        "hostname": membership.state.hostname,
        "ca_fingerprint": membership.state.ca_fingerprint,
        "expires": leaf.cert.not_valid_after_utc.isoformat() if leaf else None,
    }


def _ndjson(value: dict[str, Any]) -> bytes:
    return json.dumps(value).encode() + b"\n"


async def _stream_join(
    request: web.Request, joining: asyncio.Future[Membership], code: str
) -> web.StreamResponse:
    """Answer a local join as two NDJSON lines: the code at once, then the outcome."""
    response = web.StreamResponse(headers={"content-type": "application/x-ndjson"})
    await response.prepare(request)
    await response.write(_ndjson({"confirmation_code": code}))
    try:
        line = {"joined": membership_summary(await joining)}
    except CertmeshError as exc:
        line = {"error": exc.code, "message": str(exc)}
    except Exception:
        log.exception("local join raised unexpectedly")
        line = {"error": "internal", "message": "internal error; the node's log has details"}
    await response.write(_ndjson(line))
    await response.write_eof()
    return response


@web.middleware
async def body_limit(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse a declared body over the limit on every route, whether it reads it or not."""
    if (request.content_length or 0) > MAX_BODY_BYTES:
        raise PayloadTooLarge(f"the body is larger than {MAX_BODY_BYTES} bytes")
    return await handler(request)


def build_http_app(node: NodeService) -> web.Application:
    """Build the plain-HTTP app (Koi's port 5641)."""
    app = web.Application(middlewares=[json_errors, body_limit], client_max_size=MAX_BODY_BYTES)
    routes = web.RouteTableDef()

    @routes.get(f"{PREFIX}/status")
    async def status(request: web.Request) -> web.Response:
        return web.json_response(node.koi_status())

    @routes.get(f"{PREFIX}/trust-bundle")
    async def trust_bundle(request: web.Request) -> web.Response:
        ca = require_ca(node.ca)
        return web.json_response(await run_in_thread(ca.trust_bundle))

    @routes.post(f"{PREFIX}/join")
    async def join(request: web.Request) -> web.Response:
        body = await read_json_object(request)
        if "auth" in body and "invite_token" not in body:
            raise InvalidPayload("koi-tray CAs accept invites only; TOTP joins are not supported")
        result = await node.join(
            JoinRequest(
                hostname=body.get("hostname"),
                csr_pem=body.get("csr"),
                invite_token=body.get("invite_token"),
                peer_address=request.remote,
                sans=body.get("sans"),
            )
        )
        return web.json_response(result.to_json())

    @routes.get(f"{PREFIX}/node-status")
    async def node_status(request: web.Request) -> web.Response:
        _require_token(request, node.token)
        return web.json_response(node.node_status())

    @routes.post(f"{PREFIX}/invite")
    async def invite(request: web.Request) -> web.Response:
        _require_token(request, node.token)
        body = await read_json_object(request)
        ca = require_ca(node.ca)
        ttl_mins = body.get("ttl_mins", 0)
        if not isinstance(ttl_mins, int) or isinstance(ttl_mins, bool):
            raise InvalidPayload("'ttl_mins' must be an integer")
        try:
            ttl = None if ttl_mins <= 0 else dt.timedelta(minutes=ttl_mins)
        except OverflowError as exc:
            raise InvalidPayload("'ttl_mins' is far too large") from exc
        minted = await run_in_thread(ca.mint_invite, body.get("hostname"), ttl)
        return web.json_response(
            {
                "token": minted.code,
                "hostname": minted.hostname,
                "expires_at": minted.expires_at.isoformat(),
                "ca_fingerprint": ca.ca_fingerprint,
            }
        )

    @routes.post(f"{PREFIX}/revoke")
    async def revoke(request: web.Request) -> web.Response:
        _require_token(request, node.token)
        body = await read_json_object(request)
        ca = require_ca(node.ca)
        reason = _string(body, "reason", required=False)
        operator = _string(body, "operator", required=False)
        await run_in_thread(ca.revoke, body.get("hostname"), reason, operator)
        return web.json_response({"revoked": True})

    async def set_enrollment(request: web.Request, open_: bool) -> web.Response:
        _require_token(request, node.token)
        await read_json_object(request)
        ca = require_ca(node.ca)
        await run_in_thread(ca.set_enrollment, open_)
        return web.json_response({"enrollment_state": "open" if open_ else "closed"})

    @routes.post(f"{PREFIX}/open-enrollment")
    async def open_enrollment(request: web.Request) -> web.Response:
        return await set_enrollment(request, True)

    @routes.post(f"{PREFIX}/close-enrollment")
    async def close_enrollment(request: web.Request) -> web.Response:
        return await set_enrollment(request, False)

    @routes.put(f"{PREFIX}/set-hook")
    async def set_hook(request: web.Request) -> web.Response:
        _require_token(request, node.token)
        body = await read_json_object(request)
        return web.json_response(await node.set_hook(body.get("hostname"), body.get("reload")))

    @routes.post(f"{PREFIX}/unlock")
    async def unlock(request: web.Request) -> web.Response:
        _require_token(request, node.token)
        body = await read_json_object(request)
        await node.unlock(_string(body, "passphrase") or "")
        return web.json_response({"success": True})

    @routes.post(f"{PREFIX}/renew-now")
    async def renew_now(request: web.Request) -> web.Response:
        _require_token(request, node.token)
        body = await read_json_object(request)
        force = body.get("force", False)
        if not isinstance(force, bool):
            raise InvalidPayload("'force' must be true or false")
        return web.json_response(await node.renew_now(force))

    @routes.post(f"{PREFIX}/create")
    async def create(request: web.Request) -> web.Response:
        _require_token(request, node.token)
        body = await read_json_object(request)
        ca = await node.create_ca(
            _string(body, "passphrase") or "",
            _string(body, "preset", required=False) or "just-me",
            _string(body, "operator", required=False),
            hostname=_string(body, "hostname", required=False),
            enrollment_open=_flag(body, "enrollment_open"),
            requires_approval=_flag(body, "requires_approval"),
        )
        return web.json_response(
            {
                "ca_fingerprint": ca.ca_fingerprint,
                "hostname": ca.hostname,
                "auto_unlock_problem": ca.auto_unlock_problem,
            }
        )

    @routes.post(f"{PREFIX}/local-join")
    async def local_join(request: web.Request) -> web.StreamResponse:
        _require_token(request, node.token)
        body = await read_json_object(request)
        endpoint = _string(body, "endpoint") or ""
        invite = _string(body, "invite") or ""
        hostname = _string(body, "hostname", required=False)
        code_seen: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        def on_code(code: str) -> None:
            if not code_seen.done():
                code_seen.set_result(code)

        joining = asyncio.ensure_future(
            node.join_mesh(endpoint, invite, on_code, hostname=hostname)
        )
        try:
            await asyncio.wait({joining, code_seen}, return_when=asyncio.FIRST_COMPLETED)
            if not code_seen.done():
                await joining  # refused before a code existed: a plain JSON error
                raise InvalidPayload("the join finished without a confirmation code")
            return await _stream_join(request, joining, code_seen.result())
        finally:
            code_seen.cancel()
            joining.cancel()

    @routes.get(f"{PREFIX}/log")
    async def audit_log(request: web.Request) -> web.Response:
        _require_token(request, node.token)
        return web.json_response({"entries": await run_in_thread(node.audit_text)})

    app.add_routes(routes)
    return app


@dataclass(frozen=True)
class PeerIdentity:
    """Who is calling on the mTLS port, from the certificate they presented."""

    common_name: str | None
    fingerprint: str | None


def peer_identity(request: web.Request) -> PeerIdentity:
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        return PeerIdentity(None, None)
    cert = x509.load_der_x509_certificate(der)
    return PeerIdentity(pki.leaf_common_name(cert), pki.fingerprint(cert))


def build_mtls_app(node: NodeService) -> web.Application:
    """Build the mTLS app (Koi's port 5642): `renew` and `health`."""
    app = web.Application(middlewares=[json_errors, body_limit], client_max_size=MAX_BODY_BYTES)
    routes = web.RouteTableDef()

    @routes.post(f"{PREFIX}/renew")
    async def renew(request: web.Request) -> web.Response:
        peer = peer_identity(request)
        body = await read_json_object(request)
        ca = require_ca(node.ca)
        result = await run_in_thread(
            ca.renew_member,
            peer.common_name,
            peer.fingerprint,
            body.get("hostname"),
            body.get("csr"),
        )
        return web.json_response(result.to_json())

    @routes.post(f"{PREFIX}/health")
    async def health(request: web.Request) -> web.Response:
        peer = peer_identity(request)
        body = await read_json_object(request)
        ca = require_ca(node.ca)
        answer = await run_in_thread(
            ca.health,
            peer.common_name,
            peer.fingerprint,
            body.get("hostname"),
            body.get("pinned_ca_fingerprint"),
        )
        return web.json_response(answer)

    app.add_routes(routes)
    return app


def mtls_server_context(fullchain: Path, key: Path, ca_pem: Path) -> ssl.SSLContext:
    """TLS for the mTLS port: our leaf, and client certificates chained to the mesh CA."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(fullchain, key)
    context.load_verify_locations(cafile=str(ca_pem))
    context.num_tickets = 0
    return context


def reload_server_leaf(context: ssl.SSLContext, fullchain: Path, key: Path) -> None:
    """Swap the leaf a running mTLS listener presents; new handshakes see it at once."""
    context.load_cert_chain(fullchain, key)
