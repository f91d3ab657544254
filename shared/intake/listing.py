"""Reading requests back: one request, a batch, a page of them, their audit trails.

Lists read the batch partitions of a time range, newest first (domain/ids.py), with the
filters applied by Table storage itself. They cover requests made since the batch layout
came in; a request of the old layout is still read by its id (status, audit, cancel).
With App Service authentication on, a caller who is not an operator sees its own requests
only; without it, every key holder sees every request (docs/security.md).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..adapters.audit import Rejections
from ..adapters.request_store import RequestStore
from ..domain import ids
from ..domain.errors import InvalidInput, RequestNotFound
from ..domain.messages import MACHINE_ID, TENANT_ID
from ..domain.offboard import Caller
from ..domain.records import RequestRecord
from ..domain.statuses import Status, status_of

PAGE_SIZE = 100
# Without `since`, lists look back this far; the oldest request they can reach is as old as
# the table's rows (nothing is deleted).
DEFAULT_LOOKBACK_SECONDS = 7 * 86_400.0
# Audit events of requests created this long before `since` may still fall after it.
REQUEST_LIFETIME_SECONDS = 10 * 86_400.0


@dataclass(frozen=True)
class Filters:
    status: Status | None = None
    since: float | None = None  # epoch seconds
    machine_id: str | None = None
    batch_id: str | None = None
    tenant_id: str | None = None

    @classmethod
    def parse(cls, params: Mapping[str, str]) -> Filters:
        """The list route's query, validated: a bad filter is refused, never ignored."""
        known = {"status", "since", "machineId", "batchId", "tenantId", "next", "code"}
        unknown = sorted(set(params) - known)
        if unknown:
            raise InvalidInput(
                "InvalidFilter",
                f"unknown filter {unknown[0]!r}; use status, since, machineId, batchId, tenantId",
            )
        status = None
        if params.get("status"):
            status = status_of(params["status"])
            if status is None:
                raise InvalidInput(
                    "InvalidStatus", f"status must be one of {', '.join(s.value for s in Status)}"
                )
        machine_id = (params.get("machineId") or "").lower() or None
        if machine_id is not None and not MACHINE_ID.fullmatch(machine_id):
            raise InvalidInput("InvalidMachineId", "machineId must be 40 hexadecimal characters")
        batch_id = (params.get("batchId") or "").lower() or None
        if batch_id is not None and not ids.is_batch_id(batch_id):
            raise InvalidInput("InvalidBatchId", "batchId must be a batch id this service returned")
        tenant_id = (params.get("tenantId") or "").lower() or None
        if tenant_id is not None and not TENANT_ID.fullmatch(tenant_id):
            raise InvalidInput("InvalidTenantId", "tenantId must be a tenant id (a GUID)")
        return cls(status, since_of(params.get("since")), machine_id, batch_id, tenant_id)

    def where(self, caller: Caller) -> dict[str, str | int | bool]:
        where: dict[str, str | int | bool] = {}
        if self.status is not None:
            where["status"] = str(self.status)
        if self.machine_id is not None:
            where["machineId"] = self.machine_id
        if self.tenant_id is not None:
            where["tenantId"] = self.tenant_id
        if caller.scoped and not caller.operator:
            where["principal"] = caller.principal or "-"  # no principal: nothing is its own
        return where

    def matches(self, record: RequestRecord, caller: Caller) -> bool:
        return (
            (self.status is None or record.status == self.status)
            and (self.machine_id is None or record.machine_id == self.machine_id)
            and (self.tenant_id is None or record.tenant_id == self.tenant_id)
            and caller.may_see(record.principal)
        )


def since_of(raw: str | None) -> float | None:
    if not raw:
        return None
    try:
        when = datetime.fromisoformat(raw.upper().replace("Z", "+00:00"))  # RFC 3339 allows t and z
    except ValueError:
        raise InvalidInput(
            "InvalidSince", "since must be an ISO 8601 time, e.g. 2026-12-01T09:00:00Z"
        ) from None
    if when.tzinfo is None:
        raise InvalidInput("InvalidSince", "since must say its time zone, e.g. 2026-12-01T09:00:00Z")
    return when.timestamp()


@dataclass
class Listing:
    store: RequestStore
    rejections: Rejections | None = None
    clock: Any = time.time

    def request(self, request_id: str, caller: Caller) -> RequestRecord:
        record = self.store.get(request_id)
        if record is None or not caller.may_see(record.principal):
            raise RequestNotFound("RequestNotFound", f"no request {request_id}")
        return record

    def page(
        self, filters: Filters, caller: Caller, continuation: str | None = None
    ) -> tuple[list[RequestRecord], str | None]:
        if filters.batch_id is not None:
            _, in_batch = self.store.batch(filters.batch_id)
            return [r for r in in_batch.values() if filters.matches(r, caller)], None
        now = self.clock()
        oldest = filters.since if filters.since is not None else now - DEFAULT_LOOKBACK_SECONDS
        try:
            records, following = self.store.page_created_between(
                now, oldest, filters.where(caller), PAGE_SIZE, continuation
            )
        except ValueError:
            raise InvalidInput("InvalidCursor", "next is not a cursor this service gave") from None
        if filters.since is not None:
            records = [r for r in records if r.created_at and _epoch(r.created_at) >= filters.since]
        return records, following

    def batch(self, batch_id: str, caller: Caller) -> dict[str, Any]:
        items, records = self.store.batch(batch_id)
        if items is None or not any(caller.may_see(r.principal) for r in records.values()):
            raise RequestNotFound("RequestNotFound", f"no batch {batch_id}")
        counts: dict[str, int] = {}
        views = []
        done = True
        for label, request_id in items.items:
            record = records.get(request_id)
            if record is None or not caller.may_see(record.principal):
                views.append({"item": label, "requestId": request_id, "status": "Unknown"})
                continue
            counts[str(record.status)] = counts.get(str(record.status), 0) + 1
            done = done and record.final
            views.append({"item": label, **record.public()})
        return {
            "batchId": batch_id,
            "createdAt": items.created_at,
            "caller": items.caller,
            "format": items.format,
            "total": len(items.items),
            "final": done,
            "counts": counts,
            "items": views,
        }

    def events(self, request_id: str, caller: Caller) -> list[dict[str, Any]]:
        self.request(request_id, caller)  # exists, and the caller may see it
        return [_event(e) for e in self.store.events(request_id)]

    def events_since(self, since: float, caller: Caller) -> list[dict[str, Any]]:
        """Every audit event at or after `since`, of the requests the caller may see; and the
        calls refused before they became requests (bad input, a Graph item the Intune watcher
        could not use), for a caller who may see every request: a refusal names no owner."""
        now = self.clock()
        visible: dict[str, bool] = {}
        found = []
        for event in self.store.events_between(now, since - REQUEST_LIFETIME_SECONDS):
            at = event.get("at") or ""
            if not at or _epoch(at) < since:
                continue
            request_id = str(event.get("requestId"))
            if request_id not in visible:
                record = self.store.get(request_id)
                visible[request_id] = record is not None and caller.may_see(record.principal)
            if visible[request_id]:
                found.append(_event(event))
        if self.rejections is not None and caller.may_see(None):  # an operator, or no principals
            found.extend(_event(e.entity) for e in self.rejections.since(since, now) if e.get("at"))
        return sorted(found, key=lambda e: (e["at"], e.get("requestId") or ""))


def _event(row: Mapping[str, Any]) -> dict[str, Any]:
    view = {"at": row.get("at"), "event": row.get("event")}
    if row.get("requestId"):  # a refusal before any request was made has none
        view["requestId"] = row["requestId"]
    for name in ("outcome", "detail", "caller", "machineId", "tenantId"):
        if row.get(name):
            view[name] = row[name]
    return view


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
