"""A small client for the Defender for Endpoint machine API.

It only makes calls and reports transport failures as typed errors; deciding what an answer
means is `outcome.classify`'s job.
"""

from __future__ import annotations

from urllib.parse import quote

import requests

from .errors import ConnectionFailed, NoResponse
from .messages import MACHINE_ID
from .token import TokenProvider

USER_AGENT = "defender-offboard-function/1.0"


class DefenderClient:
    def __init__(
        self,
        base_url: str,
        tokens: TokenProvider,
        *,
        connect_timeout: float,
        read_timeout: float,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._tokens = tokens
        self._timeout = (connect_timeout, read_timeout)
        # One session per process: connections to Defender are reused across messages.
        self._session = requests.Session()
        self._session.headers["User-Agent"] = USER_AGENT

    def warm_up(self) -> None:
        """Fetch (or reuse) the token now, so a call made right after starts on time."""
        self._tokens.token()

    def offboard(self, machine_id: str, comment: str) -> requests.Response:
        """POST /api/machines/{id}/offboard, exactly as the API reference shows it."""
        if not MACHINE_ID.fullmatch(machine_id):
            # Defence in depth: an id reaches a URL path only after this check.
            raise ValueError("machine id must be 40 lowercase hex characters")
        return self._post(f"/api/machines/{quote(machine_id, safe='')}/offboard", {"Comment": comment})

    def _post(self, path: str, body: dict[str, str]) -> requests.Response:
        token = self._tokens.token()
        try:
            return self._session.post(
                self._base_url + path,
                json=body,  # requests sets Content-Type: application/json
                headers={"Authorization": f"Bearer {token}"},
                timeout=self._timeout,
                # A redirect is not part of this API; following one could carry the token
                # somewhere unexpected.
                allow_redirects=False,
            )
        except requests.ConnectionError as exc:  # includes ConnectTimeout
            raise ConnectionFailed(_short(exc)) from exc
        except requests.Timeout as exc:
            raise NoResponse(f"no answer within {self._timeout[1]:g}s") from exc
        except requests.RequestException as exc:
            raise NoResponse(_short(exc)) from exc


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:300]}"
