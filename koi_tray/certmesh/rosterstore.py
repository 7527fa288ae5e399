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
from koi_tray.certmesh.files import atomic_write_json
from koi_tray.certmesh.roster import Roster


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
                atomic_write_json(self.path, snapshot.to_json())
            except StorageError as exc:
                with self.lock:
                    self._lost.append((self._durable_generation, self._generation, str(exc)))
                    self._working = self._durable
                raise
            self._durable, self._durable_generation = snapshot, snapshot_generation

    def write_now(self, roster: Roster) -> None:
        """Stage and commit in one step (for changes made outside the hot paths)."""
        with self.lock:
            generation = self.stage(roster)
        self.commit(generation)
