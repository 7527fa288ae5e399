"""Run `run_tray` for a node on loopback (OS-chosen ports), as the CLI would.

Usage: python run_tray_driver.py DATA_DIR HOSTNAME [qt|pystray]

The subprocess tests and the desktop benchmarks start koi-tray through this script so
they need no CLI and no free well-known port.
"""

from __future__ import annotations

import sys
from pathlib import Path

from koi_tray.compose.config import NodeConfig
from koi_tray.desktop.app import run_tray


def main(argv: list[str]) -> int:
    data_dir, hostname = Path(argv[1]), argv[2]
    backend = argv[3] if len(argv) > 3 else "qt"
    config = NodeConfig(
        data_dir=data_dir, hostname=hostname, http_port=0, mtls_port=0, mtls_bind="127.0.0.1"
    )
    return run_tray(config, backend)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
