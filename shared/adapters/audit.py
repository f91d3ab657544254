"""The audit trail: one append-only Table storage row per event in a request's life.

Rows are only ever created, never updated or deleted by the app. A request's events share
its id as PartitionKey and sort by time through the RowKey, so
`az storage entity query -t <table> --filter "PartitionKey eq '<requestId>'"` reads its
story in order. Bad requests that never got an id are recorded under `rejected-<date>`.
Tokens, keys and whole payloads are never written.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from azure.core.exceptions import AzureError, ResourceExistsError
from azure.data.tables import TableClient

if TYPE_CHECKING:
    from .request_store import RequestRecord

log = logging.getLogger(__name__)
_DETAIL_LIMIT = 1000

# Events, in the order a request usually meets them.
RECEIVED = "Received"
REJECTED = "Rejected"
QUEUED = "Queued"
DUPLICATE = "Duplicate"
RESOLVED = "Resolved"
CLAIMED = "Claimed"
THROTTLED = "Throttled"
RETRYING = "Retrying"
SUBMITTED = "Submitted"
STATUS_CHANGED = "StatusChanged"
FOLLOW_UP_STOPPED = "FollowUpStopped"
FAILED = "Failed"
CANCELLED = "Cancelled"
HELD = "Held"
RELEASED = "Released"
EXPIRED = "Expired"
PRECHECK = "Prechecked"
DRY_RUN = "DryRun"
TAGGED = "Tagged"


class AuditTrail:
    def __init__(self, table: TableClient) -> None:
        self._table = table
        self._ready = False
        self._lock = threading.Lock()

    def record(
        self,
        event: str,
        *,
        request_id: str | None,
        machine_id: str | None = None,
        caller: str | None = None,
        outcome: str | None = None,
        detail: str | None = None,
    ) -> None:
        now = datetime.now(UTC)
        partition = request_id or f"rejected-{now:%Y-%m-%d}"
        entity: dict[str, Any] = {
            "PartitionKey": partition,
            # Sorts by time; the suffix keeps two events in the same microsecond apart.
            "RowKey": f"{now:%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:8]}",
            "event": event,
            "at": now.isoformat(timespec="milliseconds"),
        }
        for name, value in (("machineId", machine_id), ("caller", caller), ("outcome", outcome)):
            if value:
                entity[name] = value
        if detail:
            entity["detail"] = detail[:_DETAIL_LIMIT]
        if not self._ready:
            with self._lock, contextlib.suppress(ResourceExistsError):
                self._table.create_table()
            self._ready = True
        self._table.create_entity(entity)

    def record_request(self, event: str, request: RequestRecord, **fields: Any) -> None:
        """`record` for an event in a known request's life (its id and machine filled in)."""
        self.record(event, request_id=request.request_id, machine_id=request.machine_id, **fields)

    def try_record_request(self, event: str, request: RequestRecord, **fields: Any) -> None:
        self.try_record(event, request_id=request.request_id, machine_id=request.machine_id, **fields)

    def events(self, request_id: str) -> list[dict[str, Any]]:
        rows = self._table.query_entities("PartitionKey eq @p", parameters={"p": request_id})
        return sorted((dict(row) for row in rows), key=lambda row: row["RowKey"])

    def try_record(self, event: str, **fields: Any) -> None:
        """For events whose loss must not fail the caller's request (e.g. a rejection)."""
        try:
            self.record(event, **fields)
        except AzureError:
            log.exception("Could not write audit event %s", event)
