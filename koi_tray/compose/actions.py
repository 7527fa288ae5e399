"""Certmesh actions a host performs on a data dir: create a CA, join a mesh, renew once.

The running node and the command line (when no node runs) call the same functions, so a
CA created from the tray and one created by `koi-tray certmesh create` are the same.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from koi_tray.api.client import HttpCaLink, parse_endpoint, prepare_join, send_join
from koi_tray.certmesh import keystore
from koi_tray.certmesh.ca import PRESETS, CertificateAuthority, Posture
from koi_tray.certmesh.clock import Clock
from koi_tray.certmesh.enrollment import run_to_end
from koi_tray.certmesh.errors import Conflict, InvalidPayload
from koi_tray.certmesh.layout import DataDir
from koi_tray.certmesh.member import Membership

log = logging.getLogger(__name__)


def posture_for(
    preset: str, enrollment_open: bool | None = None, requires_approval: bool | None = None
) -> Posture:
    """A preset's posture with explicit overrides applied.

    Raises:
        InvalidPayload: Unknown preset.
    """
    if preset not in PRESETS:
        raise InvalidPayload(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    base = PRESETS[preset]
    return Posture(
        enrollment_open=base.enrollment_open if enrollment_open is None else enrollment_open,
        requires_approval=base.requires_approval
        if requires_approval is None
        else requires_approval,
        auto_unlock=base.auto_unlock,
    )


def ensure_unconfigured(data: DataDir) -> None:
    if data.ca_key.exists():
        raise Conflict(f"{data.root} already holds a certmesh CA")
    if data.member_state.exists():
        raise Conflict(f"{data.root} is already a member of a mesh")


def create_ca(
    data: DataDir,
    hostname: str,
    passphrase: str,
    posture: Posture,
    operator: str | None,
    clock: Clock,
    kdf: keystore.KdfParams | None = None,
) -> CertificateAuthority:
    """Create a CA in an unconfigured data dir (slow: Argon2id; keep it off the loop)."""
    ensure_unconfigured(data)
    return CertificateAuthority.create(
        data, hostname, passphrase, posture, operator, clock=clock, kdf=kdf
    )


async def join_mesh(
    data: DataDir,
    hostname: str,
    endpoint_text: str,
    invite_code: str,
    clock: Clock,
    on_code: Callable[[str], None],
) -> Membership:
    """Join the CA at `endpoint_text` with `invite_code`, as `hostname`.

    `on_code` receives the confirmation code before the join is sent, so the person can
    compare it with the one in the CA's approval dialog.
    """
    ensure_unconfigured(data)
    endpoint = parse_endpoint(endpoint_text)
    plan = await prepare_join(endpoint, invite_code, hostname)
    on_code(plan.confirmation_code)
    answer = await send_join(plan)
    return await run_to_end(
        lambda: Membership.install_join(
            data,
            clock,
            plan.key,
            answer,
            ca_host=endpoint.host,
            ca_http_port=endpoint.port,
            ca_mtls_port=plan.mtls_port,
            pinned_fingerprint=plan.pin,
            sans=plan.sans,
        )
    )


def link_for(membership: Membership) -> HttpCaLink:
    return HttpCaLink(membership)
