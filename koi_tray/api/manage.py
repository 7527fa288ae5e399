"""Talking to a running node of this data dir: the breadcrumb, the token, the routes.

A running node writes `node.json` (where its HTTP listener is) and `node.token` (the
`x-koi-token` secret), both owner-only. The command line reads them to send its request
through the node instead of touching files the node owns.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from koi_tray.api.client import JOIN_TIMEOUT, fetch_json, fetch_json_lines
from koi_tray.api.server import PREFIX, TOKEN_HEADER
from koi_tray.certmesh.errors import RenewalFailed, StorageError
from koi_tray.certmesh.layout import DataDir


class ManagementClient:
    """Calls the management routes of the node running on `data`."""

    def __init__(self, data: DataDir) -> None:
        try:
            crumb = json.loads(data.breadcrumb.read_text("utf-8"))
            self.base = f"{crumb['http']}{PREFIX}"
            self.token = data.token_file.read_text("utf-8").strip()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StorageError(
                f"a node holds {data.root} but its endpoint or token cannot be read: {exc}"
            ) from exc

    async def call(
        self, method: str, route: str, body: object = None, timeout: float = 30.0
    ) -> dict[str, Any]:
        """Call `route` with the token; the node's own error comes back typed.

        Raises:
            CertmeshError: The node's refusal, or CaUnreachable if it does not answer.
        """
        headers = {TOKEN_HEADER: self.token}
        return await fetch_json(
            method, f"{self.base}/{route}", body=body, headers=headers, timeout=timeout
        )

    async def join(
        self, endpoint: str, invite: str, hostname: str | None, on_code: Callable[[str], None]
    ) -> dict[str, Any]:
        """Have the node join the mesh at `endpoint`; `on_code` gets the code first.

        Raises:
            CertmeshError: The node's or the CA's refusal, or CaUnreachable.
        """
        body = {"endpoint": endpoint, "invite": invite, "hostname": hostname}

        def on_line(line: dict[str, Any]) -> None:
            if isinstance(line.get("confirmation_code"), str):
                on_code(line["confirmation_code"])

        last = await fetch_json_lines(
            "POST",
            f"{self.base}/local-join",
            on_line,
            body=body,
            headers={TOKEN_HEADER: self.token},
            timeout=JOIN_TIMEOUT + 30,
        )
        if not isinstance(last.get("joined"), dict):
            raise RenewalFailed("the node ended the join without saying how it went")
        return last["joined"]
