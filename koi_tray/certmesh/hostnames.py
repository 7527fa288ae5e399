"""Hostname and SAN rules: RFC 1123 names, IP literals, and the leaf's SAN list."""

from __future__ import annotations

import ipaddress
import re

from koi_tray.certmesh.errors import InvalidPayload

MAX_EXTRA_SANS = 16

_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def is_valid_hostname(name: object) -> bool:
    """Tell whether `name` is an RFC 1123 hostname (1–253 chars, labels of 1–63)."""
    if not isinstance(name, str) or not 1 <= len(name) <= 253 or not name.isascii():
        return False
    return all(_LABEL.fullmatch(label) for label in name.split("."))


def validate_hostname(name: object) -> str:
    """Return `name` if it is an RFC 1123 hostname.

    Raises:
        InvalidPayload: With a message that quotes the refused value safely.
    """
    if not is_valid_hostname(name):
        shown = repr(name)[:80]
        raise InvalidPayload(f"invalid hostname {shown}: expected an RFC 1123 name")
    return name


def same_host(a: str, b: str) -> bool:
    """Compare hostnames the way DNS does: case-insensitively, ignoring a trailing dot."""
    return a.rstrip(".").lower() == b.rstrip(".").lower()


def is_ip_literal(value: str) -> bool:
    """Tell whether `value` is a plain IPv4 or IPv6 address (no zone such as `%eth0`)."""
    if "%" in value:
        return False
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def leaf_sans(hostname: str, extras: object = None) -> list[str]:
    """Build a leaf's SAN list: hostname, hostname.local, then validated extras.

    Raises:
        InvalidPayload: `extras` is not a list of strings, holds more than 16 entries, or an
            entry is neither an IP address nor an RFC 1123 name (wildcards are refused).
    """
    sans = [hostname, f"{hostname}.local"]
    if extras is None:
        return sans

    if not isinstance(extras, list) or not all(isinstance(e, str) for e in extras):
        raise InvalidPayload("sans must be a list of strings")
    if len(extras) > MAX_EXTRA_SANS:
        raise InvalidPayload(f"at most {MAX_EXTRA_SANS} extra SANs are allowed, got {len(extras)}")

    for extra in extras:
        if not (is_ip_literal(extra) or is_valid_hostname(extra)):
            raise InvalidPayload(f"invalid SAN {extra[:80]!r}: expected an IP or RFC 1123 name")
        if not any(same_host(extra, known) for known in sans):
            sans.append(extra)
    return sans
