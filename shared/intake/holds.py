"""Releasing and expiring held requests (the breaker's, or every one under
OFFBOARD_APPROVAL=always).

Release is an operator's decision (an ADMIN-level route, the master key): it queues the
request as if it had just been accepted, without counting it against the breaker again, and
records who released it. The row changes first (a message that found the request still Held
would be dropped), then the message: a release that dies between the two leaves a Queued,
untouched row, which heals like any other (submission.heal). A hold nobody releases
expires (OFFBOARD_HOLD_EXPIRY_SECONDS) through a delayed `hold-expiry` message.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

from azure.core.exceptions import AzureError

from ..adapters.entities import Entities, Query
from ..adapters.queues import WorkQueue
from ..adapters.request_store import RequestStore, StaleRecord
from ..domain import audit
from ..domain.errors import RequestConflict, RequestNotFound
from ..domain.messages import HoldExpiryMessage, utc_now_iso
from ..domain.offboard import Caller
from ..domain.records import AuditEvent, RequestRecord
from ..domain.statuses import Status
from .submission import message_for

log = logging.getLogger(__name__)
# Holds expire within OFFBOARD_HOLD_EXPIRY_SECONDS (at most 7 days): no held request is older.
HOLDS_HORIZON_SECONDS = 8 * 86_400.0


@dataclass
class Holds:
    store: RequestStore
    queue: WorkQueue
    legacy_index: Entities  # the state table's `held` partition, where older versions listed holds

    def held(self) -> Iterator[RequestRecord]:
        """Every held request, newest first (and those an older version listed)."""
        now = time.time()
        yield from self.store.created_between(now, now - HOLDS_HORIZON_SECONDS, {"status": str(Status.HELD)})
        for row in self.legacy_index.query(Query(partition="held")):
            record = self.store.get(row["RowKey"])
            if record is not None and record.status == Status.HELD:
                yield record

    def release_all(self, caller: Caller) -> list[str]:
        released = []
        for record in list(self.held()):
            with contextlib.suppress(RequestConflict, RequestNotFound):  # expired or released meanwhile
                released.append(str(self._release(record, caller)["requestId"]))
        return released

    def release(self, request_id: str, caller: Caller) -> dict[str, object]:
        record = self.store.get(request_id)
        if record is None:
            raise RequestNotFound("RequestNotFound", f"no request {request_id}")
        return self._release(record, caller)

    def _release(self, record: RequestRecord, caller: Caller) -> dict[str, object]:
        if record.status != Status.HELD:
            raise RequestConflict("RequestNotHeld", f"the request is {record.status}, not Held")
        held = record
        try:
            record = self.store.update(
                record,
                AuditEvent(audit.RELEASED, outcome="Queued", caller=caller.label, detail=record.held_message),
                status=Status.QUEUED,
                released_by=caller.label,
                queued_at=utc_now_iso(),
            )
        except StaleRecord:
            raise RequestConflict("RequestChanged", "the request changed meanwhile; ask again") from None
        try:
            self.queue.send(message_for(record))
        except AzureError:
            # Not queued after all: held again, so a later release (or the expiry) still sees it.
            self.store.update(record, status=Status.HELD, released_by=None)
            raise
        self._forget_legacy(held)
        log.warning(
            "Held request %s for %s released by %s", record.request_id, record.machine_id, caller.label
        )
        return record.public()

    def expire(self, message: HoldExpiryMessage) -> None:
        record = self.store.get(message.request_id)
        if record is None or record.status != Status.HELD:
            return  # released (or gone) in time
        self.store.update(
            record,
            AuditEvent(audit.EXPIRED, detail="held and not released in time"),
            status=Status.EXPIRED,
        )
        self._forget_legacy(record)
        log.warning(
            "Held request %s for machine %s expired unreleased", message.request_id, record.machine_id
        )

    def _forget_legacy(self, record: RequestRecord) -> None:
        if record.batch_id is None:
            self.legacy_index.delete("held", record.request_id)
