"""Durable, private file writes for everything certmesh keeps on disk.

Writes that matter go to a temporary file in the target's directory, are fsynced, renamed
over the target and the directory is fsynced: a crash leaves the old file or the new one,
never half of either. Secret files are created `0600` from their first byte (the mode is
passed to `os.open`, never applied afterwards) and their directories `0700`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import Any

from koi_tray.certmesh.errors import CorruptState, StorageError

PRIVATE_FILE = 0o600
PUBLIC_FILE = 0o644
PRIVATE_DIR = 0o700


def ensure_private_dir(path: Path) -> Path:
    """Create `path` (and parents) as owner-only directories if missing."""
    try:
        path.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create directory {path}: {exc.strerror}") from exc
    return path


def fsync_dir(path: Path) -> None:
    """Flush a directory entry change (a rename or unlink) to disk where the OS allows."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_new_file(path: Path, data: bytes, mode: int = PRIVATE_FILE) -> None:
    """Create `path` with `mode` from the first byte, write `data` and fsync it.

    The file must not exist yet; this is the building block of the atomic writers.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags, mode)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = PRIVATE_FILE) -> None:
    """Replace `path` with `data` so that a crash leaves either the old or the new file.

    Raises:
        StorageError: The directory is not writable, the disk is full, or the rename failed.
            The original file is untouched in every case.
    """
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        write_new_file(temp, data, mode)
        os.replace(temp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from exc


def readable_json(value: Any, depth: int = 2, indent: str = "") -> str:
    """Serialise `value` indented for its first `depth` levels and compact below.

    A roster with a thousand members stays readable (one member per line) and is written
    by the C encoder: `json.dumps(indent=...)` falls back to the pure-Python encoder, which
    is ten times slower on the commit path of every join and renewal.
    """
    inner = indent + "  "
    if depth > 0 and isinstance(value, dict) and value:
        items = [
            f"{inner}{json.dumps(k, ensure_ascii=False)}: {readable_json(v, depth - 1, inner)}"
            for k, v in value.items()
        ]
        return "{\n" + ",\n".join(items) + f"\n{indent}}}"
    if depth > 0 and isinstance(value, list) and value:
        items = [f"{inner}{readable_json(v, depth - 1, inner)}" for v in value]
        return "[\n" + ",\n".join(items) + f"\n{indent}]"
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


def atomic_write_json(path: Path, value: Any, mode: int = PRIVATE_FILE) -> None:
    """Write `value` as readable JSON (see `readable_json`) through `atomic_write`."""
    atomic_write(path, (readable_json(value) + "\n").encode("utf-8"), mode)


def read_json(path: Path) -> Any:
    """Read a JSON state file, or None when it does not exist.

    Raises:
        CorruptState: The file exists but is not valid JSON; the message names the file.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror}") from exc

    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CorruptState(f"{path} is not valid JSON ({exc}); it was left as it is") from exc


def preserve_corrupt_copy(path: Path, stamp: str) -> Path | None:
    """Copy a damaged state file aside (`<name>.corrupt-<stamp>`) before anyone touches it.

    A copy already holding the same bytes is kept instead of making another, so a node
    that is started again and again on the same damage leaves one copy, not one a second.
    """
    if not path.exists():
        return None
    damaged = path.read_bytes()
    for earlier in sorted(path.parent.glob(f"{path.name}.corrupt-*")):
        with contextlib.suppress(OSError):
            if earlier.read_bytes() == damaged:
                return earlier
    copy = path.with_name(f"{path.name}.corrupt-{stamp}")
    if not copy.exists():
        write_new_file(copy, damaged, PRIVATE_FILE)
    return copy
