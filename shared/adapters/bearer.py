"""One call to a Microsoft API with a bearer token, as Defender's and Graph's clients make it.

No redirect is followed: neither API redirects, and following one could carry the token
somewhere unexpected. A failure without an answer is named by what it means for a
destructive call: `ConnectionFailed` (the request never arrived) or `NoResponse` (it may
have arrived, and nobody knows what it did).

`requests` raises `ConnectionError` for both kinds: for a connection never made (refused,
unresolvable, timed out while connecting) and for one dropped after the request went out
("Connection aborted", the server closing without an answer). Only the first is certain.
"""

from __future__ import annotations

from typing import Any

import requests
from urllib3.exceptions import NewConnectionError

from ..domain.errors import ConnectionFailed, NoResponse


def bearer_request(
    session: requests.Session,
    method: str,
    url: str,
    token: str,
    timeout: tuple[float, float],
    **kwargs: Any,
) -> requests.Response:
    try:
        return session.request(
            method,
            url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
            allow_redirects=False,
            **kwargs,
        )
    except requests.ConnectionError as exc:  # includes ConnectTimeout
        if never_sent(exc):
            raise ConnectionFailed(short(exc)) from exc
        raise NoResponse(short(exc)) from exc
    except requests.Timeout as exc:
        raise NoResponse(f"no answer within {timeout[1]:g}s") from exc
    except requests.RequestException as exc:
        raise NoResponse(short(exc)) from exc


def never_sent(exc: requests.ConnectionError) -> bool:
    """Whether no connection was ever made, so the request certainly did not arrive."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    cause = exc.args[0] if exc.args else None
    cause = getattr(cause, "reason", cause)  # MaxRetryError wraps what went wrong
    return isinstance(cause, NewConnectionError)  # refused, unresolvable


def short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:300]}"
