"""A loopback managed-identity endpoint speaking the App Service protocol.

azure-identity's ManagedIdentityCredential finds it through IDENTITY_ENDPOINT and
IDENTITY_HEADER, exactly as on App Service, so the app's real credential code runs.
"""

from __future__ import annotations

import secrets
import threading
import time
from typing import cast
from urllib.parse import parse_qs, urlsplit

from .loopback import LoopbackServer, QuietHandler


class IdentityEndpoint(LoopbackServer):
    def __init__(self, port: int = 0) -> None:
        self.header_secret = secrets.token_hex(16)
        self.issued: list[tuple[str, str, str | None]] = []  # (token, resource, client_id)
        self.fail_with: int | None = None  # answer every request with this status
        self.lifetime_seconds = 3600
        self._lock = threading.Lock()
        super().__init__(_Handler, port)

    @property
    def env(self) -> dict[str, str]:
        return {"IDENTITY_ENDPOINT": f"{self.url}/msi/token", "IDENTITY_HEADER": self.header_secret}

    @property
    def tokens(self) -> set[str]:
        with self._lock:
            return {token for token, _, _ in self.issued}

    def issue(self, resource: str, client_id: str | None) -> str:
        token = f"sim-{secrets.token_urlsafe(24)}"
        with self._lock:
            self.issued.append((token, resource, client_id))
        return token


class _Handler(QuietHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        fake = cast(IdentityEndpoint, self.server.owner)  # type: ignore[attr-defined]
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if url.path != "/msi/token":
            return self.send_json(404, {"error": "not found"})
        if self.headers.get("X-IDENTITY-HEADER") != fake.header_secret:
            return self.send_json(401, {"error": "missing or wrong X-IDENTITY-HEADER"})
        if fake.fail_with is not None:
            return self.send_json(fake.fail_with, {"error": "scripted failure"})
        resource = query.get("resource")
        if not resource or query.get("api-version") != "2019-08-01":
            return self.send_json(400, {"error": "resource and api-version=2019-08-01 are required"})
        token = fake.issue(resource, query.get("client_id"))
        self.send_json(
            200,
            {
                "access_token": token,
                "expires_on": str(int(time.time()) + fake.lifetime_seconds),
                "resource": resource,
                "token_type": "Bearer",
            },
        )
