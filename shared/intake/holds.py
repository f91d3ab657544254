"""Releasing and expiring the requests the blast-radius breaker held.

Release is an operator's decision (an ADMIN-level route): it queues the request as if it had
just been accepted, without counting it against the breaker again. A hold nobody releases
expires (`OFFBOARD_HOLD_EXPIRY_SECONDS`) through a delayed `hold-expiry` message.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from azure.core.exceptions import AzureError

from ..adapters import audit
from ..adapters.audit import AuditTrail
from ..adapters.queues import WorkQueue
from ..adapters.request_store import RequestStore, StaleRecord
from ..domain.messages import HoldExpiryMessage, OffboardMessage, utc_now_iso
from ..http.validate import BadRequest

log = logging.getLogger(__name__)


@dataclass
class Holds:
    store: RequestStore
    audit: AuditTrail
    queue: WorkQueue

    def release_all(self, caller: str) -> list[str]:
        released = []
        for request_id in self.store.held_ids():
            try:
                released.append(str(self.release(request_id, caller)["requestId"]))
            except BadRequest:
                self.store.unmark_held(request_id)  # expired or released meanwhile
        return released

    def release(self, request_id: str, caller: str) -> dict[str, Any]:
        record = self.store.get(request_id)
        if record is None:
            raise BadRequest("RequestNotFound", f"no request {request_id}", 404)
        if record.status != "Held":
            raise BadRequest("RequestNotHeld", f"the request is {record.status}, not Held", 409)
        try:
            # State first: a message that found the request still Held would be dropped.
            record = self.store.update(record, status="Queued")
        except StaleRecord:
            raise BadRequest("RequestChanged", "the request changed meanwhile; ask again", 409) from None
        message = OffboardMessage(
            request_id=record.request_id,
            machine_id=record.machine_id,
            lookup=record.device_lookup(),
            comment=record.comment,
            enqueued_at=utc_now_iso(),
            caller=record.caller,
            dry_run=record.dry_run,
        )
        try:
            self.queue.send(message)
        except AzureError:
            # Not queued after all: held again, so a later release (or the expiry) still sees it.
            self.store.update(record, status="Held")
            raise
        self.store.unmark_held(request_id)
        self.audit.record_request(audit.RELEASED, record, caller=caller, outcome="Queued")
        log.warning("Held request %s for machine %s released by %s", request_id, record.machine_id, caller)
        return record.public()

    def expire(self, message: HoldExpiryMessage) -> None:
        record = self.store.get(message.request_id)
        if record is None or record.status != "Held":
            return  # released (or gone) in time
        self.store.update(record, status="Expired")
        self.store.unmark_held(message.request_id)
        self.audit.record(
            audit.EXPIRED,
            request_id=message.request_id,
            machine_id=record.machine_id,
            detail="held by the breaker and not released in time",
        )
        log.warning(
            "Held request %s for machine %s expired unreleased", message.request_id, record.machine_id
        )
