"""Turning every failure at the HTTP edge into Koi's JSON error body.

Domain errors carry their own code and status. aiohttp's own refusals (unknown route,
wrong method, body over the limit) become JSON too, and anything unexpected is logged
with its traceback and answered `500 internal` without one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from koi_tray.certmesh.errors import CertmeshError, InvalidPayload

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "invalid_payload",
}


def error_response(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer every refusal as `{"error": code, "message": text}` with a stable code."""
    try:
        return await handler(request)
    except CertmeshError as exc:
        if exc.http_status >= 500:
            log.warning("%s %s failed: %s", request.method, request.path, exc)
        return error_response(exc.http_status, exc.code, str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "invalid_payload")
        return error_response(exc.status, code, exc.reason)
    except Exception:
        log.exception("%s %s raised unexpectedly", request.method, request.path)
        return error_response(500, "internal", "internal error; the node's log has details")


async def read_json_object(request: web.Request) -> dict[str, object]:
    """Read the body as a JSON object (an empty body reads as `{}`).

    Raises:
        InvalidPayload: Not UTF-8 JSON (or text with lone surrogates, or a number longer
            than Python converts), or not an object.
        web.HTTPRequestEntityTooLarge: Over the app's `client_max_size`.
    """
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw.decode("utf-8"))
        json.dumps(value, ensure_ascii=False).encode("utf-8")  # refuse lone surrogates
    except (UnicodeError, ValueError) as exc:  # ValueError: also a 4,301-digit integer
        raise InvalidPayload(f"the body is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise InvalidPayload("the body is JSON nested too deeply") from exc
    if not isinstance(value, dict):
        raise InvalidPayload("the body must be a JSON object")
    return value
