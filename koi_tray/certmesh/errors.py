"""The certmesh error tree: one root, narrow subclasses, each with a stable wire code.

Every error a certmesh operation can raise on purpose derives from `CertmeshError`. The
code and HTTP status follow Koi certmesh 0.9 where Koi has a code for the situation; the
few koi-tray additions (`unauthorized`, `payload_too_large`, `corrupt_state`,
`bundle_rejected`) are marked below. The HTTP layer maps `code` and `http_status` to a
JSON body `{"error": code, "message": str(error)}`; the UI shows `str(error)`.

    CertmeshError
    ├── InvalidPayload      400 invalid_payload
    ├── InvalidAuth         401 invalid_auth
    ├── Unauthorized        401 unauthorized        (management token; as Koi's middleware)
    ├── EnrollmentClosed    403 enrollment_closed
    ├── Revoked             403 revoked
    ├── ScopeViolation      403 scope_violation
    ├── ApprovalDenied      403 approval_denied
    ├── NotFound            404 not_found
    ├── Conflict            409 conflict
    ├── PayloadTooLarge     413 payload_too_large   (koi-tray)
    ├── RateLimited         429 rate_limited
    ├── CaNotInitialized    503 ca_not_initialized
    ├── CaLocked            503 ca_locked
    ├── ApprovalUnavailable 503 approval_unavailable
    ├── ShuttingDown        503 shutting_down
    ├── ApprovalTimeout     504 approval_timeout
    ├── RenewalFailed       500 renewal_failed      (member side)
    ├── BundleRejected      500 bundle_rejected     (member side, koi-tray)
    ├── CorruptState        500 corrupt_state       (koi-tray)
    └── StorageError        500 io_error
"""

from __future__ import annotations


class CertmeshError(Exception):
    """Root of every deliberate certmesh failure.

    Attributes:
        code: The stable snake_case code sent on the wire and printed by the CLI.
        http_status: The HTTP status the API answers with.
    """

    code = "internal"
    http_status = 500


class InvalidPayload(CertmeshError):
    code = "invalid_payload"
    http_status = 400


class InvalidAuth(CertmeshError):
    code = "invalid_auth"
    http_status = 401


class Unauthorized(CertmeshError):
    code = "unauthorized"
    http_status = 401


class EnrollmentClosed(CertmeshError):
    code = "enrollment_closed"
    http_status = 403


class Revoked(CertmeshError):
    code = "revoked"
    http_status = 403


class ScopeViolation(CertmeshError):
    code = "scope_violation"
    http_status = 403


class ApprovalDenied(CertmeshError):
    code = "approval_denied"
    http_status = 403


class NotFound(CertmeshError):
    code = "not_found"
    http_status = 404


class Conflict(CertmeshError):
    code = "conflict"
    http_status = 409


class PayloadTooLarge(CertmeshError):
    code = "payload_too_large"
    http_status = 413


class RateLimited(CertmeshError):
    code = "rate_limited"
    http_status = 429


class CaNotInitialized(CertmeshError):
    code = "ca_not_initialized"
    http_status = 503


class CaLocked(CertmeshError):
    code = "ca_locked"
    http_status = 503


class ApprovalUnavailable(CertmeshError):
    code = "approval_unavailable"
    http_status = 503


class ApprovalTimeout(CertmeshError):
    code = "approval_timeout"
    http_status = 504


class RenewalFailed(CertmeshError):
    code = "renewal_failed"
    http_status = 500


class BundleRejected(CertmeshError):
    code = "bundle_rejected"
    http_status = 500


class CorruptState(CertmeshError):
    code = "corrupt_state"
    http_status = 500


class StorageError(CertmeshError):
    code = "io_error"
    http_status = 500


class ShuttingDown(CertmeshError):
    code = "shutting_down"
    http_status = 503


ERRORS_BY_CODE: dict[str, type[CertmeshError]] = {
    cls.code: cls for cls in CertmeshError.__subclasses__()
}


def error_from_code(code: str, message: str) -> CertmeshError:
    """Rebuild a typed error from a wire code, for clients reading a JSON error body."""
    return ERRORS_BY_CODE.get(code, CertmeshError)(message)
