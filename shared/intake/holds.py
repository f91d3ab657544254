"""Releasing and expiring held requests (the breaker's, or every one under
OFFBOARD_APPROVAL=always).

Release is an operator's decision (an ADMIN-level route, the master key): it queues the
request as if it had just been accepted, without counting it against the breaker again, and
records who released it. The row changes first (a message that found the request still Held
would be dropped), then the message. A release that dies between the two leaves a Queued,
untouched row; the reconciler's one-hour look-back would miss it when the request was held
for longer, so a release first notes itself in a small `releasing` partition of the state
table, and removes the note once the message is sent. The reconciler reads that partition
(a handful of rows at most) and heals what a dead release left (`reconcile_releases`). A hold
nobody releases expires (OFFBOARD_HOLD_EXPIRY_SECONDS) through a delayed `hold-expiry` message.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

from azure.core.exceptions import AzureError

from ..adapters.entities import Entities, EntityChanged, Query
from ..adapters.queues import WorkQueue
from ..adapters.request_store import RequestStore, StaleRecord
from ..domain import audit
from ..domain.errors import RequestConflict, RequestNotFound
from ..domain.messages import HoldExpiryMessage, utc_now_iso
from ..domain.offboard import Caller
from ..domain.records import AuditEvent, RequestRecord
from ..domain.statuses import Status
from .submission import heal, message_for

log = logging.getLogger(__name__)
# Holds expire within OFFBOARD_HOLD_EXPIRY_SECONDS (at most 7 days): no held request is older.
HOLDS_HORIZON_SECONDS = 8 * 86_400.0
RELEASING = "releasing"  # the state table's partition of releases under way


@dataclass
class Holds:
    store: RequestStore
    queue: WorkQueue
    index: Entities  # the state table: its `releasing` partition, and `held` (older versions listed holds)

    def held(self) -> Iterator[RequestRecord]:
        """Every held request, newest first (and those an older version listed)."""
        now = time.time()
        yield from self.store.created_between(now, now - HOLDS_HORIZON_SECONDS, {"status": str(Status.HELD)})
        for row in self.index.query(Query(partition="held")):
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
        self.index.upsert({"PartitionKey": RELEASING, "RowKey": record.request_id, "since": time.time()})
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
            self.store.update(
                record,
                AuditEvent(audit.RELEASE_UNDONE, detail="its message could not be queued; held again"),
                status=Status.HELD,
                released_by=None,
            )
            raise
        self._forget_legacy(held)
        with contextlib.suppress(AzureError):  # a note left behind is only read and removed
            self.index.delete(RELEASING, record.request_id)
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

    def reconcile_releases(self, now: float, lease: float) -> int:
        """Heals the releases that died between the row and the message (older than `lease`:
        a release still at work is left alone); how many got their message."""
        healed = 0
        for note in list(self.index.query(Query(partition=RELEASING))):
            if now - float(note.get("since") or 0) < lease:
                continue
            record = self.store.get(note["RowKey"])
            if (
                record is not None
                and record.status == Status.QUEUED
                and heal(self.store, self.queue, record, now, lease)
            ):
                healed += 1
            # Healed, picked up, or never released (still Held: the operator saw no answer).
            with contextlib.suppress(EntityChanged):  # noted again meanwhile: the next run decides
                self.index.delete(RELEASING, note["RowKey"], note.etag)
        return healed

    def _forget_legacy(self, record: RequestRecord) -> None:
        if record.batch_id is None:
            self.index.delete("held", record.request_id)
