"""`python -m koi_tray`: the same as the `koi-tray` command."""

import sys

from koi_tray.cli import main

sys.exit(main())
