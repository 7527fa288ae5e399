"""The member side of the wire: preflight, join, trust-bundle pull and mTLS renewal.

`CaLink` is what a member's renewal loop needs from its CA: the signed bundle, and a
signature on a new key. `HttpCaLink` speaks Koi's protocol: the bundle over plain HTTP
(4 MiB cap), renewal over mTLS with the current leaf, each bounded to 30 s. The server's
certificate must chain to the member's pinned `ca.pem`; its name is not checked (Koi
does the same by substituting the server's own first DNS SAN), so a member can dial its
CA by IP address. Every answer is checked again in the certmesh core before it is used.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp

from koi_tray.certmesh import pki
from koi_tray.certmesh.errors import (
    CertmeshError,
    InvalidAuth,
    InvalidPayload,
    RenewalFailed,
    error_from_code,
)
from koi_tray.certmesh.leafstore import LeafStore
from koi_tray.certmesh.member import DEFAULT_HTTP_PORT, DEFAULT_MTLS_PORT, Membership, MemberState

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 30.0
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
JOIN_TIMEOUT = 330.0
INVITE_SHAPE = re.compile(r"[0-9a-f]{48}\.[0-9a-f]{64}")


class CaUnreachable(RenewalFailed):
    """The CA did not answer: connection refused, timed out, TLS failed before HTTP."""

    code = "ca_unreachable"
    http_status = 503


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def parse_endpoint(text: str) -> Endpoint:
    """Read `http://host:port`, `host:port` or `host` (port 5641) as a CA endpoint.

    Raises:
        InvalidPayload: Not something a CA can be dialled at.
    """
    raw = text if "://" in text else f"http://{text}"
    try:
        parts = urlsplit(raw)
        port = parts.port or DEFAULT_HTTP_PORT
    except ValueError as exc:
        raise InvalidPayload(f"not a CA endpoint: {text!r}") from exc
    if parts.scheme != "http" or not parts.hostname:
        raise InvalidPayload(f"not a CA endpoint (expected http://host:port): {text!r}")
    return Endpoint(parts.hostname, port)


async def _read_capped(response: aiohttp.ClientResponse) -> bytes:
    body = bytearray()
    async for chunk in response.content.iter_chunked(65536):
        body.extend(chunk)
        if len(body) > MAX_RESPONSE_BYTES:
            raise RenewalFailed(f"the CA's answer is larger than {MAX_RESPONSE_BYTES} bytes")
    return bytes(body)


async def _json_answer(response: aiohttp.ClientResponse) -> dict[str, Any]:
    """Return a JSON object body, or raise the CA's own error as a typed CertmeshError."""
    raw = await _read_capped(response)
    try:
        value = json.loads(raw.decode("utf-8"))
        json.dumps(value, ensure_ascii=False).encode("utf-8")  # refuse lone surrogates
    except (UnicodeError, ValueError, RecursionError):  # ValueError: also a huge integer
        value = None
    if response.status != 200:
        if isinstance(value, dict) and isinstance(value.get("error"), str):
            raise error_from_code(value["error"], str(value.get("message", "")))
        text = raw[:200].decode("utf-8", "replace")
        raise RenewalFailed(f"the CA answered HTTP {response.status}: {text}")
    if not isinstance(value, dict):
        raise RenewalFailed("the CA's answer is not a JSON object")
    return value


async def fetch_json(
    method: str,
    url: str,
    *,
    body: object = None,
    headers: dict[str, str] | None = None,
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = REQUEST_TIMEOUT,
) -> dict[str, Any]:
    """Make one request and return its JSON object, with Koi errors re-raised typed.

    Raises:
        CaUnreachable: No answer (refused, reset, timed out, TLS handshake failed).
        CertmeshError: The peer's own JSON error, or a malformed answer.
    """
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    connector = aiohttp.TCPConnector(ssl=ssl_context if ssl_context is not None else False)
    try:
        async with (
            aiohttp.ClientSession(timeout=client_timeout, connector=connector) as session,
            session.request(method, url, json=body, headers=headers) as response,
        ):
            return await _json_answer(response)
    except CertmeshError:
        raise
    except (aiohttp.ClientError, TimeoutError, ssl.SSLError, OSError) as exc:
        raise CaUnreachable(f"no answer from {url}: {exc or type(exc).__name__}") from exc


async def fetch_json_lines(
    method: str,
    url: str,
    on_line: Callable[[dict[str, Any]], None],
    *,
    body: object = None,
    headers: dict[str, str] | None = None,
    timeout: float = REQUEST_TIMEOUT,
) -> dict[str, Any]:
    """Make one request answered with NDJSON; pass each line on, return the last one.

    A line `{"error": code, "message": text}` is raised as that typed error, as is a
    non-200 answer's JSON error body.

    Raises:
        CaUnreachable: No answer, or the connection broke before the last line.
        CertmeshError: The peer's own error, or a malformed answer.
    """
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    last: dict[str, Any] | None = None
    try:
        async with (
            aiohttp.ClientSession(timeout=client_timeout) as session,
            session.request(method, url, json=body, headers=headers) as response,
        ):
            if response.status != 200:
                return await _json_answer(response)
            async for raw in response.content:
                last = _json_line(raw)
                if last is not None:
                    on_line(last)
    except CertmeshError:
        raise
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise CaUnreachable(f"no answer from {url}: {exc or type(exc).__name__}") from exc
    except ValueError as exc:  # aiohttp's "Line is too long"
        raise CertmeshError(f"{url} answered with a malformed line: {exc}") from exc
    if last is None:
        raise CaUnreachable(f"{url} closed the connection without an answer")
    return last


def _json_line(raw: bytes) -> dict[str, Any] | None:
    if not raw.strip():
        return None
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeError, ValueError) as exc:
        raise RenewalFailed("the node's answer is not JSON lines") from exc
    if not isinstance(value, dict):
        raise RenewalFailed("the node's answer is not JSON lines")
    if isinstance(value.get("error"), str):
        raise error_from_code(value["error"], str(value.get("message", "")))
    return value


def parse_invite(code: str) -> tuple[str, str]:
    """Split a full invite code, `<48 hex secret>.<64 hex CA fingerprint>`, lowercased.

    Raises:
        InvalidAuth: Not that shape (a secret without its pin included).
    """
    text = code.strip().lower()
    if INVITE_SHAPE.fullmatch(text):
        secret, _, pin = text.partition(".")
        return secret, pin
    if re.fullmatch(r"[0-9a-f]{48}", text):
        raise InvalidAuth("the invite has no CA fingerprint; ask the CA for the full invite code")
    raise InvalidAuth(
        "not an invite code: expected 48 hex digits, a dot and the CA's 64-hex fingerprint, "
        "as 'koi-tray certmesh invite' prints it"
    )


class CaLink(Protocol):
    """What a member's renewal needs from its CA."""

    async def fetch_bundle(self) -> dict[str, Any]: ...

    async def renew(self, csr_pem: str) -> dict[str, Any]: ...


def member_client_context(leaf_store: LeafStore) -> ssl.SSLContext:
    """TLS for dialling the CA's mTLS port with this member's current leaf."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=str(leaf_store.path("ca.pem")))
    context.load_cert_chain(leaf_store.path("cert.pem"), leaf_store.path("key.pem"))
    return context


class HttpCaLink:
    """The real link: Koi's HTTP and mTLS endpoints on the member's CA."""

    def __init__(self, membership: Membership) -> None:
        self.membership = membership

    @property
    def state(self) -> MemberState:
        return self.membership.state

    @property
    def leaf_store(self) -> LeafStore:
        return self.membership.leaf_store

    def _url(self, port: int, path: str, scheme: str = "http") -> str:
        host = f"[{self.state.ca_host}]" if ":" in self.state.ca_host else self.state.ca_host
        return f"{scheme}://{host}:{port}/v1/certmesh/{path}"

    async def fetch_bundle(self) -> dict[str, Any]:
        return await fetch_json("GET", self._url(self.state.ca_http_port, "trust-bundle"))

    async def renew(self, csr_pem: str) -> dict[str, Any]:
        context = await asyncio.get_running_loop().run_in_executor(
            None, member_client_context, self.leaf_store
        )
        url = self._url(self.state.ca_mtls_port, "renew", scheme="https")
        body = {"hostname": self.state.hostname, "csr": csr_pem}
        return await fetch_json("POST", url, body=body, ssl_context=context)


@dataclass(frozen=True)
class JoinPlan:
    """A join about to be sent: where, as whom, with which key."""

    endpoint: Endpoint
    hostname: str
    secret: str
    pin: str
    sans: list[str]
    key: Any
    csr_pem: str
    confirmation_code: str
    mtls_port: int


async def prepare_join(endpoint: Endpoint, invite_code: str, hostname: str) -> JoinPlan:
    """Check the CA against the invite's pin, then make this host's key and CSR.

    Raises:
        InvalidAuth: The invite is malformed or carries no pin, or the CA's fingerprint
            differs from the pin.
        CaUnreachable: The CA did not answer the preflight.
    """
    secret, pin = parse_invite(invite_code)
    status = await fetch_json("GET", f"{endpoint.url}/v1/certmesh/status")
    advertised = str(status.get("ca_fingerprint", ""))
    if not hmac.compare_digest(advertised.encode(), pin.encode()):
        raise InvalidAuth(
            f"the CA at {endpoint.url} has fingerprint {advertised[:16] or 'none'}…, "
            f"but the invite is for {pin[:16]}…; nothing was sent"
        )

    key = pki.generate_key()
    sans = [hostname, f"{hostname}.local"]
    csr_pem = pki.build_csr(key, hostname, sans).decode()
    code = pki.confirmation_code(pki.public_key_fingerprint(key.public_key()))
    mtls_port = status.get("mtls_port")
    if not isinstance(mtls_port, int) or isinstance(mtls_port, bool) or not 0 < mtls_port < 65536:
        mtls_port = DEFAULT_MTLS_PORT
    return JoinPlan(endpoint, hostname, secret, pin, sans, key, csr_pem, code, mtls_port)


async def send_join(plan: JoinPlan) -> dict[str, Any]:
    """Send the join (only the invite's secret half) and wait for the CA's answer."""
    body = {"hostname": plan.hostname, "csr": plan.csr_pem, "invite_token": plan.secret}
    return await fetch_json(
        "POST", f"{plan.endpoint.url}/v1/certmesh/join", body=body, timeout=JOIN_TIMEOUT
    )
