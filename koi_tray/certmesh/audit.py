"""The append-only audit log, in Koi's line format with every value escaped.

A line is `<UTC second>Z | <event> | key=value | key=value`. Values are escaped so that
no operator name, reason or hostname can add a field or a line: backslash, `|`, `=`,
control characters, line separators and lone surrogates (which UTF-8 cannot encode)
become backslash escapes.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from koi_tray.certmesh.clock import Clock
from koi_tray.certmesh.errors import StorageError
from koi_tray.certmesh.files import PRIVATE_FILE, ensure_private_dir

log = logging.getLogger(__name__)

_ESCAPES = {"\\": "\\\\", "|": "\\|", "=": "\\=", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_value(value: object) -> str:
    """Escape one audit value so it stays one field on one line."""
    out = []
    for char in str(value):
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F or 0x80 <= ord(char) < 0xA0:
            out.append(f"\\x{ord(char):02x}")
        elif char in ("\u2028", "\u2029") or 0xD800 <= ord(char) <= 0xDFFF:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return "".join(out)


def parse_line(line: str) -> tuple[str, str, dict[str, str]]:
    """Split an audit line into (timestamp, event, fields), undoing the escapes.

    Only the spaces of each ` | ` separator are dropped around a field, so a value keeps
    its own leading and trailing white space.
    """
    parts: list[str] = []
    current: list[str] = []
    chars = iter(line.rstrip("\r\n"))
    for char in chars:
        if char == "\\":
            current.append(char + next(chars, ""))
        elif char == "|":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))

    fields: dict[str, str] = {}
    last = len(parts) - 1
    for index, part in enumerate(parts[2:], start=2):
        part = part.removeprefix(" ")
        part = part.removesuffix(" ") if index < last else part
        key, _, value = _split_unescaped_equals(part)
        fields[key.strip()] = _unescape(value)
    event = parts[1].strip() if len(parts) > 1 else ""
    return parts[0].strip(), event, fields


def _split_unescaped_equals(text: str) -> tuple[str, str, str]:
    index = 0
    while index < len(text):
        if text[index] == "\\":
            index += 2
            continue
        if text[index] == "=":
            return text[:index], "=", text[index + 1 :]
        index += 1
    return text, "", ""


def _unescape(text: str) -> str:
    simple = {"\\": "\\", "|": "|", "=": "=", "n": "\n", "r": "\r", "t": "\t"}
    out = []
    index = 0
    while index < len(text):
        char = text[index]
        if char != "\\" or index + 1 >= len(text):
            out.append(char)
            index += 1
            continue
        code = text[index + 1]
        if code in simple:
            out.append(simple[code])
            index += 2
        elif code == "x":
            out.append(chr(int(text[index + 2 : index + 4], 16)))
            index += 4
        else:
            out.append(chr(int(text[index + 2 : index + 6], 16)))
            index += 6
    return "".join(out)


class AuditLog:
    """Appends audit lines to `logs/certmesh-audit.log`, owner-only, one write per line."""

    def __init__(self, path: Path, clock: Clock) -> None:
        self.path = path
        self._clock = clock
        self._lock = threading.Lock()

    def record(self, event: str, **fields: object) -> None:
        """Append one line for `event`; `None` values are left out.

        Raises:
            StorageError: The log could not be written.
        """
        stamp = self._clock.now().strftime("%Y-%m-%dT%H:%M:%SZ")
        items = [
            f"{key}={escape_value(value)}" for key, value in fields.items() if value is not None
        ]
        line = " | ".join([stamp, escape_value(event), *items]) + "\n"
        with self._lock:
            try:
                ensure_private_dir(self.path.parent)
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, PRIVATE_FILE)
                try:
                    os.write(fd, line.encode("utf-8"))
                finally:
                    os.close(fd)
            except OSError as exc:
                raise StorageError(f"cannot append to audit log {self.path}: {exc}") from exc
        log.debug("audit: %s", line.rstrip())

    def read_text(self) -> str:
        try:
            return self.path.read_text("utf-8")
        except FileNotFoundError:
            return ""

    def events(self) -> list[tuple[str, str, dict[str, str]]]:
        """Return every line parsed, oldest first."""
        return [parse_line(line) for line in self.read_text().splitlines() if line.strip()]
