"""A request's state as stored and as shown, and the events of its audit trail."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from typing import Any

from . import ids
from .devices import Lookup
from .messages import utc_now_iso
from .statuses import NOT_SENT, TERMINAL, Status

# How long a worker's claim on a request holds: the function timeout (host.json). A claim
# older than this belongs to a worker that died.
CLAIM_LEASE = timedelta(minutes=5)


@dataclass(frozen=True)
class RequestRecord:
    request_id: str
    machine_id: str | None  # None until a request that names its device otherwise is resolved
    caller: str
    comment: str
    status: Status = Status.QUEUED
    attempt: int = 1
    created_at: str = ""
    updated_at: str = ""
    next_attempt_at: str | None = None
    action_id: str | None = None
    last_error_code: str | None = None
    last_error_message: str | None = None
    follow_up: str | None = None  # "Scheduled" while checks run; "Stopped" after the horizon
    dry_run: bool = False
    would_send: str | None = None  # for a dry run: the call that was not made, as JSON
    note: str | None = None  # why a request ended as it did, when that is not an error
    lookup: str | None = None  # JSON {"by", "value"}: how the caller named the device
    claimed_by: str | None = None  # the delivery (queue message id) calling Defender now
    claimed_attempt: int | None = None
    claimed_at: str | None = None
    tenant_id: str | None = None  # None: the home tenant
    principal: str | None = None  # the App Service principal that asked, when there is one
    held_code: str | None = None  # why it is Held, and what releases it
    held_message: str | None = None
    released_by: str | None = None
    duplicate_of: str | None = None  # the request that offboards the same machine instead
    queued_at: str | None = None  # when its message was last sent by a release or a heal
    etag: str | None = None

    @property
    def final(self) -> bool:
        """Nothing more will change from our side: the status poll can stop."""
        return self.status in TERMINAL or self.follow_up == "Stopped"

    @property
    def batch_id(self) -> str | None:
        return ids.batch_of(self.request_id) if ids.is_batched(self.request_id) else None

    def device_lookup(self) -> Lookup | None:
        if not self.lookup:
            return None
        named = json.loads(self.lookup)
        return Lookup.of(named["by"], named["value"])

    def claim_is_live(self, now: datetime) -> bool:
        if not self.claimed_at:
            return False
        return now - datetime.fromisoformat(self.claimed_at) < CLAIM_LEASE

    def untouched(self) -> bool:
        """Queued and never picked up by a worker (which would have claimed, resolved, paced
        or retried it): its message may be missing (the acceptor died between the row and the
        message), and one more is harmless, so it is safe to send another."""
        return (
            self.status == Status.QUEUED
            and self.attempt == 1
            and not self.claimed_at
            and not self.next_attempt_at
            and not (self.lookup and self.machine_id)
        )

    @property
    def last_queued(self) -> str:
        return self.queued_at or self.created_at

    def public(self) -> dict[str, Any]:
        """The caller-facing view: no claim bookkeeping, no ETag."""
        view: dict[str, Any] = {
            "requestId": self.request_id,
            "machineId": self.machine_id,
            **({"lookup": json.loads(self.lookup)} if self.lookup else {}),
            "status": str(self.status),
            "attempt": self.attempt,
            "createdAt": self.created_at,
            "updatedAt": self.updated_at,
            "caller": self.caller,
            "comment": self.comment,
        }
        optional: dict[str, Any] = {
            "tenantId": self.tenant_id,
            "batchId": self.batch_id,
            "nextAttemptAt": self.next_attempt_at if self.status in NOT_SENT else None,
            "actionId": self.action_id,
            "lastError": {"code": self.last_error_code, "message": self.last_error_message or ""}
            if self.last_error_code
            else None,
            "heldReason": {"code": self.held_code, "message": self.held_message or ""}
            if self.held_code and self.status == Status.HELD
            else None,
            "releasedBy": self.released_by,
            "duplicateOf": self.duplicate_of,
            "followUp": self.follow_up,
            "dryRun": True if self.dry_run else None,
            "note": self.note,
            "wouldSend": json.loads(self.would_send) if self.would_send else None,
        }
        view.update({k: v for k, v in optional.items() if v is not None})
        return view


FIELDS = tuple(f.name for f in fields(RequestRecord) if f.name != "etag")
__all__ = ["CLAIM_LEASE", "FIELDS", "AuditEvent", "RequestRecord", "utc_now_iso"]


@dataclass(frozen=True)
class AuditEvent:
    """One event in a request's life; never a token, key or whole payload."""

    event: str
    outcome: str | None = None
    detail: str | None = None
    caller: str | None = None
    at: datetime = field(default_factory=lambda: datetime.now(UTC))
