"""The tray's log: a size-rotated file in the user's log directory, and stderr on a terminal.

This module owns where the desktop host writes its log and how the lines look. The file
is `koi-tray.log` under `platformdirs.user_log_dir("koi-tray")`, rotated at about 1 MB
with three old files kept. Lines also go to stderr when koi-tray was started from a
terminal (stdin or stderr is a TTY); started from the desktop session, stderr usually
leads nowhere a person reads.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

APP_NAME = "koi-tray"
LOG_FILE = "koi-tray.log"
MAX_BYTES = 1_000_000
BACKUPS = 3
LINE_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

_MARK = "_koi_tray_handler"


def log_dir() -> Path:
    """The per-user log directory (`~/.local/state/koi-tray/log` on Linux)."""
    import platformdirs

    return Path(platformdirs.user_log_dir(APP_NAME, appauthor=False))


def setup_logging(
    directory: Path | None = None, level: int = logging.INFO, console: bool | None = None
) -> Path:
    """Send koi-tray's log to the rotated file, and to stderr on a terminal.

    Calling it again replaces the handlers it added before, so a test or a second host in
    the same process does not double every line.

    Args:
        directory: Where the file goes; None means `log_dir()`.
        level: The root logger's level.
        console: Also log to stderr; None means "when stdin or stderr is a TTY".

    Returns:
        The path of the log file.
    """
    path = (directory or log_dir()) / LOG_FILE
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _MARK, False)]:
        root.removeHandler(handler)
        handler.close()

    formatter = logging.Formatter(LINE_FORMAT)
    handlers: list[logging.Handler] = []
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        handlers.append(
            logging.handlers.RotatingFileHandler(
                path, maxBytes=MAX_BYTES, backupCount=BACKUPS, encoding="utf-8"
            )
        )
    except OSError as exc:
        sys.stderr.write(f"koi-tray: cannot write the log file {path}: {exc}\n")
    if console if console is not None else _on_terminal():
        handlers.append(logging.StreamHandler(sys.stderr))

    for handler in handlers:
        handler.setFormatter(formatter)
        setattr(handler, _MARK, True)
        root.addHandler(handler)
    root.setLevel(level)
    return path


def logs_to_console() -> bool:
    """Tell whether `setup_logging` sent the log to stderr as well."""
    return any(
        getattr(h, _MARK, False) and getattr(h, "stream", None) is sys.stderr
        for h in logging.getLogger().handlers
        if not isinstance(h, logging.FileHandler)
    )


def _on_terminal() -> bool:
    for stream in (sys.stdin, sys.stderr):
        try:
            if stream is not None and os.isatty(stream.fileno()):
                return True
        except (OSError, ValueError, AttributeError):
            continue
    return False
