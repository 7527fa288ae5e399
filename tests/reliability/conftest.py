"""Import paths for the reliability suites.

The suites reuse the loopback helpers of the API tests (`apitools`); pytest puts only
this folder and `tests/` on the import path, so `tests/api` is added here.
"""

from __future__ import annotations

import sys
from pathlib import Path

_API_TESTS = str(Path(__file__).resolve().parents[1] / "api")
if _API_TESTS not in sys.path:
    sys.path.insert(0, _API_TESTS)
