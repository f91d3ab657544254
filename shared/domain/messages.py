"""The work-queue messages: versioned JSON, strict on the way in.

Five types share the queue: `offboard` (call Defender's offboard for a request), `check`
(read the resulting MachineAction's status later), `hold-expiry` (expire a held request if
nobody released it), `tag` (tag offboarded machines, many in one call) and `notify` (tell
operators that requests are held). The queue is the product's memory between the HTTP
intake and the worker, so a message that cannot be understood is never guessed at: it is
refused with a reason and poisoned. Every field added since version 1 is optional, so
messages queued by an older version are read as they were written.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any

from .devices import InvalidLookup, Lookup

SCHEMA_VERSION = 1
MACHINE_ID = re.compile(r"[0-9a-f]{40}")
# MachineAction ids are GUIDs; they reach a URL path, so nothing else is accepted.
ACTION_ID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
REQUEST_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
TENANT_ID = REQUEST_ID  # tenant ids are GUIDs too, lower-cased at intake


class MessageError(ValueError):
    """The queue message is not one this version of the app can process."""


@dataclass(frozen=True)
class OffboardMessage:
    """Exactly one of `machine_id` and `lookup` is set: a request that names its device by
    another identifier carries `lookup` until the worker resolves it; from then on it carries
    the resolved `machine_id` and, in `resolved_from`, the lookup it came from, so a re-queued
    message never resolves twice. Messages with a machine id keep the original v1 shape."""

    request_id: str
    machine_id: str | None
    comment: str
    enqueued_at: str  # ISO 8601, UTC: when the caller's request was accepted
    caller: str
    attempt: int = 1  # the delivery this message is for; +1 on every re-queue
    failures: int = 0  # transient and configuration failures so far (429s don't count)
    dry_run: bool = False  # everything but the offboard call itself
    lookup: Lookup | None = None
    resolved_from: Lookup | None = None
    # The Defender call slot this message reserved before it was re-queued to wait for it
    # (epoch seconds; see shared/pacing.py). Absent on new messages and after a call.
    slot_at: float | None = None
    # Likewise for the read it is waiting to make (device lookup or precheck), in its own
    # budget; kept apart so a read slot is never taken for an offboard slot.
    read_slot_at: float | None = None
    # The precheck passed: a request that waits for its offboard slot is not read again.
    prechecked: bool = False
    # The request row's ETag when this message was sent: the worker claims the row with it,
    # without reading it first (a 412 means it changed: then it reads and decides).
    etag: str | None = None
    tenant_id: str | None = None  # None: the home tenant
    # An earlier delivery claimed this attempt at this time and may have reached Defender:
    # look for the action it may have started before calling again (ISO 8601, UTC).
    in_doubt_since: str | None = None
    # The action-read slot the in-doubt lookup reserved before it was re-queued to wait for
    # it, in that budget: so a lookup that waits is not put at the back of the line again.
    action_slot_at: float | None = None

    def __post_init__(self) -> None:
        if (self.machine_id is None) == (self.lookup is None):
            raise ValueError("a message carries exactly one of machine_id and lookup")

    def next_attempt(self, *, failed: bool) -> OffboardMessage:
        return replace(
            self,
            attempt=self.attempt + 1,
            failures=self.failures + int(failed),
            slot_at=None,
            read_slot_at=None,
            action_slot_at=None,
        )

    def resolved(self, machine_id: str) -> OffboardMessage:
        return replace(self, machine_id=machine_id, lookup=None, resolved_from=self.lookup)

    @property
    def device(self) -> str:
        """The device as logs name it: the machine id, or the lookup still to be resolved."""
        if self.machine_id is not None:
            return self.machine_id
        assert self.lookup is not None  # __post_init__ guarantees one of the two
        return f"{self.lookup.by}={self.lookup.value}"

    def to_json(self) -> str:
        return _dump("offboard", self)

    @classmethod
    def from_json(cls, text: str) -> OffboardMessage:
        message = parse_message(text)
        if not isinstance(message, cls):
            raise MessageError("not an offboard message")
        return message

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> OffboardMessage:
        lookup = _lookup(body, "lookup")
        if lookup is not None and body.get("machineId") is not None:
            raise MessageError("fields 'machineId' and 'lookup' are both set; exactly one must be")
        return cls(
            request_id=_text(body, "requestId", REQUEST_ID),
            machine_id=None if lookup is not None else _text(body, "machineId", MACHINE_ID),
            comment=_text(body, "comment"),
            enqueued_at=_text(body, "enqueuedAt"),
            caller=_text(body, "caller"),
            attempt=_count(body, "attempt"),
            failures=_count(body, "failures"),
            dry_run=_flag(body, "dryRun"),
            lookup=lookup,
            resolved_from=_lookup(body, "resolvedFrom"),
            slot_at=_optional_time(body, "slotAt"),
            read_slot_at=_optional_time(body, "readSlotAt"),
            prechecked=_flag(body, "prechecked"),
            etag=_optional_text(body, "etag"),
            tenant_id=_optional_text(body, "tenantId", TENANT_ID),
            in_doubt_since=_optional_text(body, "inDoubtSince"),
            action_slot_at=_optional_time(body, "actionSlotAt"),
        )


@dataclass(frozen=True)
class ActionCheckMessage:
    """Read the status of the MachineAction a request created, `check` times so far."""

    request_id: str
    machine_id: str
    action_id: str
    submitted_at: str  # ISO 8601, UTC: when Defender accepted the offboard
    check: int = 1
    slot_at: float | None = None  # the action-read slot it waits for (see OffboardMessage)
    # The action's status when this check was queued: an unchanged answer needs no row write.
    status: str | None = None
    tenant_id: str | None = None

    def to_json(self) -> str:
        return _dump("check", self)

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> ActionCheckMessage:
        return cls(
            request_id=_text(body, "requestId", REQUEST_ID),
            machine_id=_text(body, "machineId", MACHINE_ID),
            action_id=_text(body, "actionId", ACTION_ID),
            submitted_at=_text(body, "submittedAt"),
            check=_count(body, "check"),
            slot_at=_optional_time(body, "slotAt"),
            status=_optional_text(body, "status"),
            tenant_id=_optional_text(body, "tenantId", TENANT_ID),
        )


@dataclass(frozen=True)
class HoldExpiryMessage:
    """Sent, delayed, when a request is held by the breaker: if still held then, it expires."""

    request_id: str

    def to_json(self) -> str:
        return _dump("hold-expiry", self)

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> HoldExpiryMessage:
        return cls(request_id=_text(body, "requestId", REQUEST_ID))


@dataclass(frozen=True)
class TagMessage:
    """Tag machines that were offboarded (OFFBOARD_TAG_AFTER_SUCCESS), up to 500 in one call;
    `request_ids[i]` is the request of `machine_ids[i]`, for its audit trail."""

    tag: str
    machine_ids: tuple[str, ...]
    request_ids: tuple[str, ...]
    tenant_id: str | None = None
    slot_at: float | None = None
    attempt: int = 1

    def __post_init__(self) -> None:
        if len(self.machine_ids) != len(self.request_ids) or not 1 <= len(self.machine_ids) <= MAX_TAGGED:
            raise ValueError(f"a tag message names 1-{MAX_TAGGED} machines, each with its request")

    def to_json(self) -> str:
        return _dump("tag", self)

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> TagMessage:
        machines, requests = body.get("machineIds"), body.get("requestIds")
        if not isinstance(machines, list) or not isinstance(requests, list):
            raise MessageError("fields 'machineIds' and 'requestIds' must be lists")
        if not all(isinstance(m, str) and MACHINE_ID.fullmatch(m) for m in machines):
            raise MessageError("field 'machineIds' holds a malformed machine id")
        if not all(isinstance(r, str) and REQUEST_ID.fullmatch(r) for r in requests):
            raise MessageError("field 'requestIds' holds a malformed request id")
        try:
            return cls(
                tag=_text(body, "tag"),
                machine_ids=tuple(machines),
                request_ids=tuple(requests),
                tenant_id=_optional_text(body, "tenantId", TENANT_ID),
                slot_at=_optional_time(body, "slotAt"),
                attempt=_count(body, "attempt"),
            )
        except ValueError as exc:
            raise MessageError(str(exc)) from None


@dataclass(frozen=True)
class NotifyMessage:
    """Tell operators (OFFBOARD_HOLD_NOTIFY_URL) that requests were held: one per call."""

    request_ids: tuple[str, ...]
    attempt: int = 1

    def to_json(self) -> str:
        return _dump("notify", self)

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> NotifyMessage:
        requests = body.get("requestIds")
        if not isinstance(requests, list) or not requests:
            raise MessageError("field 'requestIds' must be a non-empty list")
        if not all(isinstance(r, str) and REQUEST_ID.fullmatch(r) for r in requests):
            raise MessageError("field 'requestIds' holds a malformed request id")
        return cls(request_ids=tuple(requests), attempt=_count(body, "attempt"))


Message = OffboardMessage | ActionCheckMessage | HoldExpiryMessage | TagMessage | NotifyMessage
_TYPES: dict[str, Any] = {
    "offboard": OffboardMessage,
    "check": ActionCheckMessage,
    "hold-expiry": HoldExpiryMessage,
    "tag": TagMessage,
    "notify": NotifyMessage,
}
# The bulk tag call takes up to 500 machines.
MAX_TAGGED = 500


def parse_message(text: str) -> Message:
    try:
        body = json.loads(text)
    except ValueError as exc:
        raise MessageError(f"not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise MessageError("not a JSON object")
    if body.get("v") != SCHEMA_VERSION:
        raise MessageError(f"unknown schema version {body.get('v')!r}")
    kind = _TYPES.get(body.get("type", "offboard"))
    if kind is None:
        raise MessageError(f"unknown message type {body.get('type')!r}")
    message: Message = kind.from_body(body)
    return message


def _dump(kind: str, message: Message) -> str:
    fields = {
        _camel(k): list(v) if isinstance(v, tuple) else v for k, v in asdict(message).items() if v is not None
    }
    body = {"v": SCHEMA_VERSION, "type": kind, **fields}
    return json.dumps(body, separators=(",", ":"))


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


def _optional_text(body: dict[str, Any], name: str, pattern: re.Pattern[str] | None = None) -> str | None:
    return None if body.get(name) is None else _text(body, name, pattern)


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise MessageError(f"field {name!r} is not true or false")
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


def _lookup(body: dict[str, Any], name: str) -> Lookup | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"by", "value"}:
        raise MessageError(f"field {name!r} must be an object with exactly 'by' and 'value'")
    try:
        lookup = Lookup.of(value["by"], value["value"])
    except InvalidLookup as exc:
        raise MessageError(f"field {name!r} is malformed: {exc}") from None
    if lookup.value != value["value"]:
        raise MessageError(f"field {name!r} is malformed: not in its canonical (lower-case) form")
    return lookup
