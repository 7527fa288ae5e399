"""`roster.json` with group commit: many changes, one fsync, nothing reported before it is safe.

Changes are made to the *working* roster under `lock` and get a generation number. A
caller then `commit`s its generation: the first caller to take the write lock writes the
newest working roster, which makes every change up to it durable at once, and the others
find theirs already written. Readers that tell other hosts anything (status, trust bundle)
read the *durable* roster, so a sequence number is never announced before it is on disk.

If a write fails, the working roster falls back to the durable one and every change that
was staged but not written fails with the same `StorageError`; later changes go on.
"""

from __future__ import annotations

import threading
from pathlib import Path

from koi_tray.certmesh.errors import StorageError
from koi_tray.certmesh.files import atomic_write, readable_json
from koi_tray.certmesh.roster import Roster, RosterMember


class RosterStore:
    def __init__(self, path: Path, roster: Roster) -> None:
        self.path = path
        self.lock = threading.RLock()
        self._write_lock = threading.Lock()
        self._working = roster
        self._durable = roster
        self._generation = 0
        self._durable_generation = 0
        self._lost: list[tuple[int, int, str]] = []
        self._member_lines: dict[int, tuple[RosterMember, str]] = {}

    @property
    def working(self) -> Roster:
        """The roster with every staged change; read it under `lock` to change it."""
        return self._working

    @property
    def durable(self) -> Roster:
        """The roster as it is on disk."""
        return self._durable

    def stage(self, roster: Roster) -> int:
        """Make `roster` the working roster (hold `lock`); return the generation to commit."""
        self._working = roster
        self._generation += 1
        return self._generation

    def commit(self, generation: int) -> None:
        """Return once the change staged as `generation` is on disk.

        Raises:
            StorageError: The write that carried this change failed; the change is undone.
        """
        with self._write_lock:
            for after, through, reason in self._lost:
                if after < generation <= through:
                    raise StorageError(reason)
            if self._durable_generation >= generation:
                return

            with self.lock:
                snapshot, snapshot_generation = self._working, self._generation
            try:
                atomic_write(self.path, self._render(snapshot).encode("utf-8"))
            except StorageError as exc:
                with self.lock:
                    self._lost.append((self._durable_generation, self._generation, str(exc)))
                    self._working = self._durable
                raise
            self._durable, self._durable_generation = snapshot, snapshot_generation

    def _render(self, roster: Roster) -> str:
        """`readable_json` of the roster, reusing the text of members that did not change.

        Members are immutable values, so a member object seen in the last write has the
        same JSON line; a renewal re-serialises one member instead of all of them.
        """
        lines: dict[int, tuple[RosterMember, str]] = {}
        for member in roster.members:
            cached = self._member_lines.get(id(member))
            if cached is None or cached[0] is not member:
                cached = (member, readable_json(member.to_json(), depth=0))
            lines[id(member)] = cached
        self._member_lines = lines

        members = ",\n".join(f"    {line}" for _, line in lines.values())
        revocations = [r.to_json() for r in roster.revocations]
        return (
            "{\n"
            f'  "metadata": {readable_json(roster.metadata_json(), depth=1, indent="  ")},\n'
            f'  "members": {"[" + chr(10) + members + chr(10) + "  ]" if members else "[]"},\n'
            f'  "revocation_list": {readable_json(revocations, depth=1, indent="  ")}\n'
            "}\n"
        )

    def write_now(self, roster: Roster) -> None:
        """Stage and commit in one step (for changes made outside the hot paths)."""
        with self.lock:
            generation = self.stage(roster)
        self.commit(generation)
