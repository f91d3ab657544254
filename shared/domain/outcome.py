"""One pure decision: what a Defender answer (or the lack of one) means for a request.

`classify()` touches no network, clock or global state: time and randomness come in as
arguments, so every row of the outcome table is a plain unit test.
"""

from __future__ import annotations

import enum
import math
import random
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any

import requests

from .errors import DefenderCallError, TokenUnavailable

# Azure Storage refuses a visibility delay longer than 7 days.
MAX_DELAY_SECONDS = 7 * 24 * 3600
THROTTLE_DEFAULT_SECONDS = 60.0
THROTTLE_JITTER_SECONDS = 15.0
_DETAIL_LIMIT = 500
TRANSIENT_STATUSES = frozenset({408, 500, 502, 503, 504})
# A token the managed identity could not give is a hiccup first (azure-identity remembers a
# failed request for a few seconds, so the next try must come a little later), and a
# configuration problem only when it persists: 2, 4, then 8 s (half of each random).
TOKEN_BACKOFF_SECONDS = 2.0
TOKEN_TRANSIENT_FAILURES = 3


class RetryKind(enum.Enum):
    THROTTLED = "Throttled"
    TRANSIENT = "Transient"
    CONFIGURATION = "Configuration"


@dataclass(frozen=True)
class Succeeded:
    action: dict[str, Any] = field(default_factory=dict)
    already_pending: bool = False

    @property
    def action_id(self) -> str | None:
        value = self.action.get("id")
        return value if isinstance(value, str) else None


@dataclass(frozen=True)
class Requeue:
    kind: RetryKind
    delay_seconds: int
    code: str
    message: str
    # A Retry-After longer than the operation's longest rate-limit window, as Defender sent
    # it: the wait was capped (the caller logs it as a warning).
    capped_retry_after: str | None = None


@dataclass(frozen=True)
class Failed:
    code: str
    message: str
    status: int | None = None


Outcome = Succeeded | Requeue | Failed


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 8
    base_seconds: float = 30.0
    max_seconds: float = 3600.0
    config_seconds: float = 900.0


def classify(
    result: requests.Response | DefenderCallError,
    *,
    failures: int,
    policy: RetryPolicy,
    now: datetime,
    rng: random.Random,
    permission: str = "Machine.Offboard",
    longest_wait: float = MAX_DELAY_SECONDS,
) -> Outcome:
    """Decide what to do with one Defender call (the offboard, or a read that serves it).

    `failures` is how many transient or configuration failures the request had before
    this call; it bounds retries so a broken request cannot cycle forever. `permission` is
    the app role a 403 tells the operator to grant. `longest_wait` is the longest window of
    the call's rate limit: a 429 asking to wait longer than that cannot be a rate limit.
    """
    if isinstance(result, DefenderCallError):
        transient_token = failures < TOKEN_TRANSIENT_FAILURES and failures + 1 < policy.max_attempts
        if isinstance(result, TokenUnavailable) and transient_token:
            delay = TOKEN_BACKOFF_SECONDS * 2.0**failures
            return Requeue(
                RetryKind.TRANSIENT,
                _whole_seconds(delay / 2 + rng.uniform(0, delay / 2)),
                "TokenUnavailable",
                f"no token ({result}); trying again shortly",
            )
        if isinstance(result, TokenUnavailable):
            return _configuration(
                "TokenUnavailable",
                f"no token ({result}); check the app's identity, MANAGED_IDENTITY_CLIENT_ID and "
                "DEFENDER_API_SCOPE, and for a customer tenant MULTITENANT_APP_CLIENT_ID and that "
                "tenant's consent (infra/add-tenant.sh)",
                failures,
                policy,
            )
        return _transient(type(result).__name__, str(result), failures, policy, rng)

    status = result.status_code
    code, detail = error_of(result)
    if status in (200, 201):
        body = _json_object(result)
        return Succeeded(action=body or {})
    if status == 400 and code == "ActiveRequestAlreadyExists":
        return Succeeded(already_pending=True)
    if status == 429:
        raw = result.headers.get("Retry-After")
        asked = parse_retry_after(raw, now)
        delay = THROTTLE_DEFAULT_SECONDS + rng.uniform(0, THROTTLE_JITTER_SECONDS) if asked is None else asked
        capped = raw if delay > longest_wait else None
        return Requeue(
            RetryKind.THROTTLED,
            _whole_seconds(min(delay, longest_wait)),
            code or "TooManyRequests",
            detail,
            capped_retry_after=capped[:100] if capped else None,
        )
    if status == 401:
        return _configuration(
            code or "Unauthorized",
            f"Defender refused the token ({detail or 'no detail'}); check DEFENDER_API_SCOPE "
            "matches DEFENDER_API_BASE_URL's cloud",
            failures,
            policy,
        )
    if status == 403:
        return _configuration(
            code or "Forbidden",
            f"Defender denied the call ({detail or 'no detail'}); grant the managed identity "
            f"the WindowsDefenderATP app role {permission}, and check device group access",
            failures,
            policy,
        )
    if status in TRANSIENT_STATUSES or status >= 500:
        return _transient(code or f"Http{status}", detail, failures, policy, rng)
    return Failed(code or f"Http{status}", detail or f"Defender answered {status}", status)


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a Retry-After header, or None when absent or unreadable.

    Accepts delta-seconds and HTTP dates (RFC 9110). Never trusted blindly: negative or
    garbage values are ignored, dates in the past mean "now", and anything beyond what a
    queue can delay is clamped.
    """
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        seconds = float(value)
    else:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        seconds = max(0.0, (when - now).total_seconds())
    return min(seconds, float(MAX_DELAY_SECONDS))


def backoff_seconds(failures: int, policy: RetryPolicy, rng: random.Random) -> float:
    """Exponential backoff with "equal jitter": half fixed, half random, so retries of many
    requests spread out but none comes back immediately."""
    ceiling = min(policy.max_seconds, policy.base_seconds * 2.0 ** min(failures, 30))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


def _transient(code: str, detail: str, failures: int, policy: RetryPolicy, rng: random.Random) -> Outcome:
    if failures + 1 >= policy.max_attempts:
        return Failed("RetriesExhausted", f"{code} after {failures + 1} attempts: {detail}")
    delay = backoff_seconds(failures, policy, rng)
    return Requeue(RetryKind.TRANSIENT, _whole_seconds(delay), code, detail)


def _configuration(code: str, detail: str, failures: int, policy: RetryPolicy) -> Outcome:
    if failures + 1 >= policy.max_attempts:
        return Failed(code, f"{detail} (gave up after {failures + 1} attempts)")
    return Requeue(RetryKind.CONFIGURATION, _whole_seconds(policy.config_seconds), code, detail)


def _whole_seconds(seconds: float) -> int:
    # Queue visibility delays are whole seconds; round up so "wait 7 s" never becomes 6.
    return min(MAX_DELAY_SECONDS, max(0, math.ceil(seconds)))


def _json_object(response: requests.Response) -> dict[str, Any] | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def error_of(response: requests.Response) -> tuple[str | None, str]:
    """Defender's error code and message, from `{"error": {"code", "message"}}`."""
    if response.status_code < 400:
        return None, ""
    body = _json_object(response) or {}
    error = body.get("error")
    if not isinstance(error, dict):
        return None, response.reason or ""
    code = error.get("code")
    message = error.get("message")
    return (
        code if isinstance(code, str) else None,
        (message if isinstance(message, str) else "")[:_DETAIL_LIMIT],
    )
