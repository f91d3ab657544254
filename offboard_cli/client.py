"""The service's HTTP API, as the operator command uses it.

One `requests.Session`, the key in the `x-functions-key` header only (never in a URL),
explicit timeouts, no redirects followed (requests would carry our custom key header to
wherever a redirect points), and transient failures retried with backoff: connection
errors, timeouts, 429, 502, 503, 504. Retrying a POST is safe only because every item the
command sends carries its idempotency key (submit.py); the other POSTs (release) are
idempotent by nature: a second release of the same request answers RequestNotHeld.
"""

from __future__ import annotations

import getpass
import json
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import requests

from . import __version__
from .errors import KeyRefused, ServiceError, Unreachable
from .keys import Secret

TRANSIENT_STATUSES = frozenset({429, 502, 503, 504})
CONNECT_TIMEOUT_SECONDS = 5.0
READ_TIMEOUT_SECONDS = 30.0
DEFAULT_RETRIES = 4
BACKOFF_SECONDS = 0.5  # 0.5, 1, 2, 4 (with jitter): about 7 s in all before giving up
MAX_RETRY_AFTER_SECONDS = 30.0
_PRINTABLE = re.compile(r"[^\x20-\x7e]")


@dataclass(frozen=True)
class Reply:
    status: int
    body: Any  # parsed JSON, or None
    headers: Mapping[str, str] = field(default_factory=dict)
    route: str = ""  # "GET /api/offboard", for messages

    def error(self) -> tuple[str, str]:
        """The `{"error": {"code", "message"}}` of an error answer (or what stands in for it)."""
        error = self.body.get("error") if isinstance(self.body, dict) else None
        if isinstance(error, dict):
            return str(error.get("code") or f"HTTP{self.status}"), str(error.get("message") or "")
        return f"HTTP{self.status}", "the service answered without an error body"


class Client:
    def __init__(
        self,
        base_url: str,
        key: Secret,
        *,
        retries: int = DEFAULT_RETRIES,
        backoff_seconds: float = BACKOFF_SECONDS,
        sleep: Callable[[float], None] = time.sleep,
        what_key: str = "function key",
        token: Secret | None = None,
    ) -> None:
        self.base_url = base_url
        self.retries = retries
        self.backoff_seconds = backoff_seconds
        self.sleep = sleep
        self.what_key = what_key
        self._key = key
        self._session = requests.Session()
        self._session.trust_env = True  # proxies from the environment, as curl would
        self._session.headers.update(
            {"Accept": "application/json", "User-Agent": user_agent(), "x-functions-key": key.reveal()}
        )
        if token is not None:  # App Service authentication: who is asking, besides the key
            self._session.headers["Authorization"] = f"Bearer {token.reveal()}"

    def get(self, path: str, params: Mapping[str, str] | None = None) -> Reply:
        return self._send("GET", self.base_url + path, params=params)

    def get_url(self, url: str) -> Reply:
        """A URL the service gave (a `next` link): only to the same scheme, host and port,
        since the key goes with it."""
        theirs, ours = urlsplit(url), urlsplit(self.base_url)
        if (theirs.scheme, theirs.netloc.lower()) != (ours.scheme, ours.netloc.lower()):
            raise Unreachable(
                f"the service gave a link to {theirs.scheme}://{theirs.hostname}, not {self.base_url}; "
                "not sending the key there (is OFFBOARD_PUBLIC_BASE_URL set right on the app?)"
            )
        return self._send("GET", url)

    def post(self, path: str, body: Any = None) -> Reply:
        data = None if body is None else json.dumps(body, ensure_ascii=False).encode()
        return self._send("POST", self.base_url + path, data=data)

    def close(self) -> None:
        self._session.close()

    def _send(
        self, method: str, url: str, *, params: Mapping[str, str] | None = None, data: bytes | None = None
    ) -> Reply:
        headers = {"Content-Type": "application/json"} if data is not None else {}
        attempt = 0
        while True:
            failure: str
            retry_after: float | None = None
            try:
                response = self._session.request(
                    method,
                    url,
                    params=params,
                    data=data,
                    headers=headers,
                    timeout=(CONNECT_TIMEOUT_SECONDS, READ_TIMEOUT_SECONDS),
                    allow_redirects=False,
                )
            except requests.Timeout as exc:
                failure = (
                    "timed out connecting"
                    if isinstance(exc, requests.ConnectTimeout)
                    else (f"no answer within {READ_TIMEOUT_SECONDS:.0f} s")
                )
            except requests.ConnectionError as exc:
                failure = _connection_failure(exc)
            else:
                reply = _reply_of(response, f"{method} {urlsplit(url).path}")
                if reply.status not in TRANSIENT_STATUSES:
                    return self._checked(reply, url)
                code, message = reply.error()
                failure = f"answered {reply.status} {code}" + (f" ({message})" if message else "")
                retry_after = _retry_after(reply.headers.get("Retry-After"))
            if attempt >= self.retries:
                where = urlsplit(url)
                raise Unreachable(
                    f"could not reach {where.scheme}://{where.netloc}: {failure}"
                    + (f" (after {attempt + 1} tries)" if attempt else "")
                )
            delay = self.backoff_seconds * (2**attempt) * random.uniform(0.75, 1.25)
            if retry_after is not None:
                delay = max(delay, min(retry_after, MAX_RETRY_AFTER_SECONDS))
            attempt += 1
            self.sleep(delay)

    def _checked(self, reply: Reply, url: str) -> Reply:
        if reply.status == 401:
            raise KeyRefused(
                f"the service refused the {self.what_key} (401): check "
                + (
                    "OFFBOARD_ADMIN_KEY (the app's master key)"
                    if self.what_key == "master key"
                    else "OFFBOARD_KEY"
                )
            )
        if 300 <= reply.status < 400:
            location = urlsplit(reply.headers.get("Location", ""))
            raise Unreachable(
                f"the service answered a redirect ({reply.status}) to "
                f"{location.scheme}://{location.hostname}; not following it with the key: "
                "is the URL the app's base URL, with https?"
            )
        if reply.status == 404 and not isinstance(reply.body, dict):
            raise Unreachable(
                f"{urlsplit(url).path} is not a route there (404 without the service's error body): "
                "is the URL the app's base URL?"
            )
        return reply


def user_agent() -> str:
    """The audit trail's `caller` for key holders is their user agent (function keys name no
    one), so say which tool and, as told by this machine, which login ran it."""
    try:
        login = _PRINTABLE.sub("?", getpass.getuser())[:64]
    except Exception:  # no login name in this environment (containers)
        login = ""
    return f"offboard-cli/{__version__}" + (f" (user {login})" if login else "")


def raise_for_error(reply: Reply) -> None:
    if reply.status >= 400:
        code, message = reply.error()
        raise ServiceError(reply.status, code, message, reply.route)


def _reply_of(response: requests.Response, route: str) -> Reply:
    body: Any = None
    if response.content:
        try:
            body = response.json()
        except ValueError:
            body = None
    return Reply(response.status_code, body, dict(response.headers), route)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _connection_failure(exc: BaseException) -> str:
    """The cause in a few words ("Connection refused"), not urllib3's paragraph."""
    seen: BaseException | None = exc
    while seen is not None:
        for arg in (seen, *getattr(seen, "args", ())):
            if isinstance(arg, OSError) and arg.strerror:
                return str(arg.strerror)
            text = str(arg)
            if (
                "Name or service not known" in text
                or "nodename nor servname" in text
                or "getaddrinfo" in text
            ):
                return "the host name does not resolve"
            match = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
            if match:
                return match.group(1).strip()
        seen = seen.__cause__ or seen.__context__
    return type(exc).__name__
