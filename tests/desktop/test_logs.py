"""The tray's log: a rotated file in the given folder, stderr only when asked or on a TTY."""

from __future__ import annotations

import logging
import logging.handlers
from collections.abc import Iterator
from pathlib import Path

import pytest

from koi_tray.desktop import logs


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


def ours() -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers if getattr(h, logs._MARK, False)]


def test_log_file_rotates_at_about_a_megabyte(tmp_path: Path, restore_root: None) -> None:
    path = logs.setup_logging(tmp_path / "log", console=False)

    (handler,) = ours()
    assert isinstance(handler, logging.handlers.RotatingFileHandler)
    assert handler.maxBytes == 1_000_000 and handler.backupCount == 3
    logging.getLogger("koi_tray.test").info("hello %s", "log")
    handler.flush()
    assert path == tmp_path / "log" / "koi-tray.log"
    assert "INFO    koi_tray.test: hello log" in path.read_text()
    assert not logs.logs_to_console()


def test_setting_up_twice_does_not_double_lines(tmp_path: Path, restore_root: None) -> None:
    logs.setup_logging(tmp_path, console=True)
    logs.setup_logging(tmp_path, console=True)

    assert len(ours()) == 2
    assert logs.logs_to_console()


def test_default_folder_is_the_user_log_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", "/tmp/state-home")

    assert logs.log_dir() == Path("/tmp/state-home/koi-tray/log")
