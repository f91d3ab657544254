"""Audit events of calls refused before they became a request (no request id to file them
under), in OFFBOARD_AUDIT_TABLE_NAME under `PartitionKey="rejected-<yyyy-mm-dd>"`. A
request's own events live with its row (request_store.py)."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime

from azure.core.exceptions import AzureError

from ..domain import audit
from .entities import Entities, Query, Stored

log = logging.getLogger(__name__)
_DETAIL_LIMIT = 1000


class Rejections:
    def __init__(self, entities: Entities) -> None:
        self._entities = entities

    def record(self, caller: str, code: str, detail: str) -> None:
        """Best effort: losing this event must not fail the caller's request."""
        now = datetime.now(UTC)
        entity = {
            "PartitionKey": f"rejected-{now:%Y-%m-%d}",
            "RowKey": f"{now:%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:8]}",
            "event": audit.REJECTED,
            "at": now.isoformat(timespec="milliseconds"),
            "caller": caller,
            "outcome": code,
            "detail": detail[:_DETAIL_LIMIT],
        }
        try:
            self._entities.insert(entity)
        except AzureError:
            log.exception("Could not write the audit event of a rejected call")

    def since(self, since: float, until: float) -> list[Stored]:
        """Every rejection recorded from `since` to `until` (epoch seconds), oldest first."""
        start, end = datetime.fromtimestamp(since, UTC), datetime.fromtimestamp(until, UTC)
        query = Query(
            partitions=(f"rejected-{start:%Y-%m-%d}", f"rejected-{end:%Y-%m-%d}"),
            rows=(f"{start:%Y%m%dT%H%M%S%f}", f"{end:%Y%m%dT%H%M%S%f}~"),
        )
        return [e for e in self._entities.query(query) if e.get("event") == audit.REJECTED]
