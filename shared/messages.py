"""The work-queue message: versioned JSON, strict on the way in.

The queue is the product's memory between the HTTP intake and the worker, so a message
that cannot be understood is never guessed at: it is refused with a reason and poisoned.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any

SCHEMA_VERSION = 1
MACHINE_ID = re.compile(r"[0-9a-f]{40}")
REQUEST_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class MessageError(ValueError):
    """The queue message is not one this version of the app can process."""


@dataclass(frozen=True)
class OffboardMessage:
    request_id: str
    machine_id: str
    comment: str
    enqueued_at: str  # ISO 8601, UTC: when the caller's request was accepted
    caller: str
    attempt: int = 1  # the delivery this message is for; +1 on every re-queue
    failures: int = 0  # transient and configuration failures so far (429s don't count)
    # The Defender call slot this message reserved before it was re-queued to wait for it
    # (epoch seconds; see shared/pacing.py). Absent on new messages and after a call.
    slot_at: float | None = None

    def next_attempt(self, *, failed: bool) -> OffboardMessage:
        return replace(self, attempt=self.attempt + 1, failures=self.failures + int(failed), slot_at=None)

    def to_json(self) -> str:
        body = {"v": SCHEMA_VERSION, **{_camel(k): v for k, v in asdict(self).items()}}
        if body["slotAt"] is None:
            del body["slotAt"]  # an optional field: older readers never see it
        return json.dumps(body, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> OffboardMessage:
        try:
            body = json.loads(text)
        except ValueError as exc:
            raise MessageError(f"not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise MessageError("not a JSON object")
        if body.get("v") != SCHEMA_VERSION:
            raise MessageError(f"unknown schema version {body.get('v')!r}")
        return cls(
            request_id=_text(body, "requestId", REQUEST_ID),
            machine_id=_text(body, "machineId", MACHINE_ID),
            comment=_text(body, "comment"),
            enqueued_at=_text(body, "enqueuedAt"),
            caller=_text(body, "caller"),
            attempt=_count(body, "attempt"),
            failures=_count(body, "failures"),
            slot_at=_optional_time(body, "slotAt"),
        )


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(word.title() for word in rest)


def _text(body: dict[str, Any], name: str, pattern: re.Pattern[str] | None = None) -> str:
    value = body.get(name)
    if not isinstance(value, str):
        raise MessageError(f"field {name!r} is missing or not a string")
    if pattern is not None and not pattern.fullmatch(value):
        raise MessageError(f"field {name!r} is malformed")
    return value


def _optional_time(body: dict[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise MessageError(f"field {name!r} is not a time in epoch seconds")
    return float(value)


def _count(body: dict[str, Any], name: str) -> int:
    value = body.get(name)
    # bool is an int in Python; a message with "attempt": true is still malformed.
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise MessageError(f"field {name!r} is missing or not a whole number >= 0")
    return value
