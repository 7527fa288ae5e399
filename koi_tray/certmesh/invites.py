"""One-time invites: minting, checking, reserving during a join, spending on success.

An invite code is `<48 hex secret>.<64 hex CA fingerprint>`; only the SHA-256 of the secret
is stored (`invites.json`, Koi's shape plus `created_at`). A join *reserves* the invite
while it waits for approval, so a second join with the same code is refused, and *spends*
it only when the member is recorded: a refused or denied join leaves it usable.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from koi_tray.certmesh.clock import Clock
from koi_tray.certmesh.errors import CertmeshError, CorruptState, InvalidAuth, InvalidPayload
from koi_tray.certmesh.files import atomic_write, read_json
from koi_tray.certmesh.hostnames import same_host
from koi_tray.certmesh.timefmt import format_timestamp, parse_timestamp

DEFAULT_TTL = dt.timedelta(minutes=60)
MIN_TTL = dt.timedelta(minutes=1)
MAX_TTL = dt.timedelta(days=7)
SECRET_BYTES = 24


def split_code(code: str) -> tuple[str, str | None]:
    """Split an invite code into its secret and its CA fingerprint pin (None if unpinned)."""
    secret, _, pin = code.strip().partition(".")
    return secret, (pin or None)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Invite:
    hostname: str
    token_hash: str
    expires_at: dt.datetime
    used: bool = False
    created_at: dt.datetime | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "hostname": self.hostname,
            "token_hash": self.token_hash,
            "expires_at": format_timestamp(self.expires_at),
            "used": self.used,
        }
        if self.created_at is not None:
            out["created_at"] = format_timestamp(self.created_at)
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Invite:
        created = raw.get("created_at")
        return cls(
            hostname=str(raw["hostname"]),
            token_hash=str(raw["token_hash"]),
            expires_at=parse_timestamp(raw["expires_at"]),
            used=bool(raw.get("used", False)),
            created_at=parse_timestamp(created) if created else None,
        )


@dataclass(frozen=True)
class MintedInvite:
    code: str
    hostname: str
    expires_at: dt.datetime


@dataclass(frozen=True)
class Reservation:
    """An invite held by one join in flight."""

    invite: Invite

    @property
    def token_hash(self) -> str:
        return self.invite.token_hash


class InviteBook:
    """Owns `invites.json`. Thread-safe; every change is written atomically."""

    def __init__(self, path: Path, clock: Clock) -> None:
        self.path = path
        self._clock = clock
        self._lock = threading.Lock()
        self._reserved: set[str] = set()
        self._cache: tuple[tuple[int, int], list[Invite]] | None = None

    def _load(self) -> list[Invite]:
        """Return the stored invites, parsing the file again only when it changed on disk."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return []
        stamp = (stat.st_mtime_ns, stat.st_size)
        if self._cache is not None and self._cache[0] == stamp:
            return list(self._cache[1])
        raw = read_json(self.path)
        try:
            invites = [] if raw is None else [Invite.from_json(i) for i in raw["invites"]]
        except (KeyError, TypeError, ValueError, AttributeError, CertmeshError) as exc:
            raise CorruptState(
                f"{self.path} does not look like a list of invites: {exc!r}"
            ) from exc
        self._cache = (stamp, invites)
        return list(invites)

    def _save(self, invites: list[Invite]) -> None:
        document = {"invites": [i.to_json() for i in invites]}
        atomic_write(self.path, (json.dumps(document) + "\n").encode())
        stat = self.path.stat()
        self._cache = ((stat.st_mtime_ns, stat.st_size), list(invites))

    def mint(
        self, hostname: str, ca_fingerprint: str, ttl: dt.timedelta | None = None
    ) -> MintedInvite:
        """Create an invite for `hostname`, pruning used and expired ones.

        An invite held by a join in flight is kept even if it expired meanwhile: a join
        checked while its invite was valid stays good while a person decides.

        Raises:
            InvalidPayload: `ttl` is outside one minute to seven days.
        """
        ttl = DEFAULT_TTL if ttl is None else ttl
        if not MIN_TTL <= ttl <= MAX_TTL:
            raise InvalidPayload("invite lifetime must be between 1 minute and 7 days")

        now = self._clock.now()
        secret = secrets.token_hex(SECRET_BYTES)
        invite = Invite(hostname, hash_secret(secret), now + ttl, created_at=now)
        with self._lock:
            kept = [
                i
                for i in self._load()
                if (not i.used and i.expires_at > now) or i.token_hash in self._reserved
            ]
            self._save([*kept, invite])
        return MintedInvite(f"{secret}.{ca_fingerprint}", hostname, invite.expires_at)

    def reserve(self, code: str, hostname: str) -> Reservation:
        """Hold the invite matching `code` for a join as `hostname`.

        Raises:
            InvalidAuth: No unused, unexpired, unreserved invite for this hostname matches.
                The message does not say which part failed.
        """
        secret, _ = split_code(code)
        wanted = hash_secret(secret)
        now = self._clock.now()
        with self._lock:
            for invite in self._load():
                if not hmac.compare_digest(invite.token_hash, wanted):
                    continue
                usable = (
                    not invite.used
                    and invite.expires_at > now
                    and same_host(invite.hostname, hostname)
                    and invite.token_hash not in self._reserved
                )
                if usable:
                    self._reserved.add(invite.token_hash)
                    return Reservation(invite)
                break
        raise InvalidAuth("invite is invalid, expired, already used or for another host")

    def release(self, reservation: Reservation) -> None:
        """Give a reserved invite back, unspent."""
        with self._lock:
            self._reserved.discard(reservation.token_hash)

    def spend(self, reservation: Reservation) -> None:
        """Mark a reserved invite used, durably."""
        with self._lock:
            invites = [
                Invite(i.hostname, i.token_hash, i.expires_at, True, i.created_at)
                if i.token_hash == reservation.token_hash
                else i
                for i in self._load()
            ]
            self._save(invites)
            self._reserved.discard(reservation.token_hash)

    def outstanding(self) -> list[Invite]:
        """Invites that could still be used."""
        now = self._clock.now()
        return [i for i in self._load() if not i.used and i.expires_at > now]
