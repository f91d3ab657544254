"""One POST of a JSON body to a webhook (the hold notification, OFFBOARD_HOLD_NOTIFY_URL).

The URL is a secret (a Logic App or Teams workflow trigger URL carries its signature), so
what goes wrong is said without it. No redirect is followed, for the same reason as the
bearer calls: one could carry the body somewhere unexpected. Proxy and CA settings are those
of every API client (transport.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import requests

from .transport import api_session

_TIMEOUT = (5.0, 10.0)


@dataclass
class Webhook:
    url: str
    session: requests.Session = field(default_factory=api_session)

    def post(self, body: dict[str, Any]) -> str | None:
        """None when the webhook took the body (2xx); otherwise what went wrong, without the URL."""
        try:
            response = self.session.post(self.url, json=body, timeout=_TIMEOUT, allow_redirects=False)
        except requests.RequestException as exc:
            return type(exc).__name__
        return None if 200 <= response.status_code < 300 else f"answered {response.status_code}"
