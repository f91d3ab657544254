"""Request state and its audit trail in Table storage: one partition per batch.

Layout (the state table, OFFBOARD_STATE_TABLE_NAME):
- `PartitionKey="batch-<batchId>"` (ids.py: newest batches sort first), holding
  - `RowKey=<requestId>`, `kind="request"`: a request's state, updated with ETags;
  - `RowKey=<requestId>-audit-<time>-<random>`, `kind="audit"`: its audit events, only ever
    added, each in the same transaction as the state change it records, so the trail can
    never disagree with the row;
  - `RowKey="batch"`, `kind="batch"`: for calls with several items, every item's request id
    (items that named an existing request point outside the partition).
- Requests created before this layout keep theirs: `PartitionKey=<requestId>,
  RowKey="request"`, with their audit events in OFFBOARD_AUDIT_TABLE_NAME (`PartitionKey=
  <requestId>`); every read and write here serves both, so a deployed app's old rows keep
  working. Events of requests that never got an id (refused at intake) still go there.

The guards (machine, idempotency key), the breaker and the Intune watcher keep their own
partitions in the same table (guards.py, breaker.py, watcher/).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from azure.core.exceptions import AzureError

from ..domain import ids
from ..domain.records import FIELDS, AuditEvent, RequestRecord, utc_now_iso
from ..domain.statuses import Status
from .entities import Entities, EntityChanged, EntityConflict, Query, Stored, Write

_DETAIL_LIMIT = 1000
_MAX_WRITES = 100  # Table storage's limit for one transaction
AUDIT = "-audit-"


class StaleRecord(Exception):
    """Someone else changed the row since it was read (ETag mismatch)."""


class WriteInDoubt(Exception):
    """A transaction whose answer was lost, and whose rows could not be read back either: it
    may have committed. Its guards must stay (their lease decides), never be freed."""


@dataclass(frozen=True)
class NewRequest:
    """A request to write at acceptance, with the events that record it."""

    record: RequestRecord
    events: tuple[AuditEvent, ...]


@dataclass(frozen=True)
class BatchItems:
    """What a call with several items became: item label and request id, in order."""

    batch_id: str
    items: tuple[tuple[str, str], ...]
    caller: str
    format: str
    created_at: str


def partition_of(request_id: str) -> str:
    return f"batch-{ids.batch_of(request_id)}" if ids.is_batched(request_id) else request_id


def _row_of(request_id: str) -> str:
    return request_id if ids.is_batched(request_id) else "request"


class RequestStore:
    def __init__(self, entities: Entities, legacy_audit: Entities) -> None:
        self._entities = entities
        self._legacy_audit = legacy_audit

    # ---- reading ------------------------------------------------------------------------

    def get(self, request_id: str) -> RequestRecord | None:
        stored = self._entities.get(partition_of(request_id), _row_of(request_id))
        if stored is None or stored.get("kind", "request") != "request":
            return None
        return _record(stored)

    def events(self, request_id: str) -> list[dict[str, Any]]:
        """The request's audit events in order (oldest first)."""
        if not ids.is_batched(request_id):
            rows = self._legacy_audit.query(Query(partition=request_id))
        else:
            rows = self._entities.query(
                Query(partition=partition_of(request_id), rows=(request_id + AUDIT, request_id + AUDIT + "~"))
            )
        return [_event_view(row) for row in rows]

    def batch(self, batch_id: str) -> tuple[BatchItems | None, dict[str, RequestRecord]]:
        """A batch's item list and the records of its requests (those in its partition, and
        any existing request an item named), in one query plus a read per outside request."""
        records: dict[str, RequestRecord] = {}
        items: BatchItems | None = None
        for stored in self._entities.query(Query(partition=f"batch-{batch_id}")):
            kind = stored.get("kind")
            if kind == "request":
                record = _record(stored)
                records[record.request_id] = record
            elif kind == "batch":
                items = BatchItems(
                    batch_id,
                    tuple((label, rid) for label, rid in json.loads(stored["items"])),
                    stored.get("caller", ""),
                    stored.get("format", ""),
                    stored.get("createdAt", ""),
                )
        for _, request_id in items.items if items else ():
            if request_id not in records and (outside := self.get(request_id)) is not None:
                records[request_id] = outside
        if items is None and len(records) == 1:
            # A single request has a partition of its own but no batch row: a batch of one,
            # so the batchId its status shows leads somewhere.
            [only] = records.values()
            items = BatchItems(
                batch_id, (("request", only.request_id),), only.caller, "native", only.created_at or ""
            )
        return items, records

    def created_between(
        self, newest: float, oldest: float, where: dict[str, str | int | bool] | None = None
    ) -> Iterator[RequestRecord]:
        """Requests of this layout created within [oldest, newest] (epoch seconds), newest
        first (partition order), filtered by equality on stored fields."""
        query = Query(
            partitions=(f"batch-{ids.time_prefix(newest)}", f"batch-{ids.time_prefix(oldest)}~"),
            where={"kind": "request", **(where or {})},
        )
        for stored in self._entities.query(query):
            yield _record(stored)

    def page_created_between(
        self,
        newest: float,
        oldest: float,
        where: dict[str, str | int | bool],
        size: int,
        continuation: str | None,
    ) -> tuple[list[RequestRecord], str | None]:
        query = Query(
            partitions=(f"batch-{ids.time_prefix(newest)}", f"batch-{ids.time_prefix(oldest)}~"),
            where={"kind": "request", **where},
        )
        page = self._entities.page(query, size, continuation)
        return [_record(s) for s in page.entities], page.continuation

    def events_between(self, newest: float, oldest: float) -> Iterator[dict[str, Any]]:
        """Audit events of requests created within [oldest, newest], in partition order."""
        query = Query(
            partitions=(f"batch-{ids.time_prefix(newest)}", f"batch-{ids.time_prefix(oldest)}~"),
            where={"kind": "audit"},
        )
        for stored in self._entities.query(query):
            yield _event_view(stored)

    # ---- accepting ----------------------------------------------------------------------

    def accept(
        self, requests: Sequence[NewRequest], batch: BatchItems | None = None
    ) -> tuple[dict[str, RequestRecord], dict[str, Exception]]:
        """Writes the requests of one batch with their events, as few transactions as fit
        (an item's row and its events always share one). Returns the written records and,
        for items whose transaction failed, why (`EntityConflict`: a request id was voided
        by a later request that took its machine or key over; see guards.py)."""
        now = utc_now_iso()
        written: dict[str, RequestRecord] = {}
        failed: dict[str, Exception] = {}
        chunk: list[tuple[RequestRecord | None, list[Write]]] = []
        size = 0
        if batch is not None:
            chunk.append((None, [Write.insert(_batch_entity(batch))]))
            size = 1
        for new in requests:
            record = replace(new.record, created_at=new.record.created_at or now, updated_at=now)
            writes = [Write.insert(_entity(record))] + [
                Write.insert(_event_entity(record, event)) for event in new.events
            ]
            if size + len(writes) > _MAX_WRITES:
                self._commit(chunk, written, failed)
                chunk, size = [], 0
            chunk.append((record, writes))
            size += len(writes)
        self._commit(chunk, written, failed)
        return written, failed

    def _commit(
        self,
        chunk: list[tuple[RequestRecord | None, list[Write]]],
        written: dict[str, RequestRecord],
        failed: dict[str, Exception],
    ) -> None:
        if not chunk:
            return
        writes = [w for _, item_writes in chunk for w in item_writes]
        try:
            etags = self._entities.transact(writes)
        except (EntityConflict, EntityChanged) as exc:  # reported per item
            failed.update({r.request_id: exc for r, _ in chunk if r is not None})
            return
        except AzureError as exc:
            # The answer may have been lost after the transaction committed (a read timeout):
            # read the rows back rather than report a row that exists as not written.
            for record, _ in chunk:
                if record is None:
                    continue
                try:
                    found = self.get(record.request_id)
                except AzureError:
                    failed[record.request_id] = WriteInDoubt(str(exc))
                    continue
                if found is None:
                    failed[record.request_id] = exc
                else:
                    written[record.request_id] = found
            return
        position = 0
        for item, item_writes in chunk:
            if item is not None:
                written[item.request_id] = replace(item, etag=etags[position])
            position += len(item_writes)

    def void(self, request_id: str) -> bool:
        """Claims a request id whose acceptor died before writing its row, so that a slow
        acceptor can never write it later. False if the request's row exists after all."""
        where = {"PartitionKey": partition_of(request_id), "RowKey": _row_of(request_id)}
        try:
            self._entities.insert({**where, "kind": "void", "voidedAt": utc_now_iso()})
        except EntityConflict:
            found = self._entities.get(where["PartitionKey"], where["RowKey"])
            return found is not None and found.get("kind") == "void"  # voided before: still void
        return True

    # ---- changing -----------------------------------------------------------------------

    def update(self, record: RequestRecord, event: AuditEvent | None = None, **changes: Any) -> RequestRecord:
        """Writes `changes` onto `record` if nobody changed the row since it was read, and
        its audit event with it (one transaction; two writes for a request of the old layout)."""
        etag, updated_at = self._merge(record, event, changes)
        return replace(record, **changes, updated_at=updated_at, etag=etag)

    def change(self, about: RequestRecord, event: AuditEvent | None = None, **changes: Any) -> str:
        """Merges `changes` into the row whose ETag `about` carries, without needing the rest
        of the row (the worker knows a request from its message): only the fields named
        change, and a field set to None is cleared. Returns the new ETag; raises StaleRecord
        when the row changed since that ETag."""
        return self._merge(about, event, changes)[0]

    def _merge(
        self, about: RequestRecord, event: AuditEvent | None, changes: dict[str, Any]
    ) -> tuple[str, str]:
        if about.etag is None:
            raise StaleRecord(about.request_id)  # never read: nothing to be conditional on
        updated_at = utc_now_iso()
        delta: dict[str, Any] = {
            "PartitionKey": partition_of(about.request_id),
            "RowKey": _row_of(about.request_id),
            "updatedAt": updated_at,
        }
        for name, value in changes.items():
            if name not in FIELDS or name == "request_id":
                raise ValueError(f"{name} is not a request field")
            # A merge cannot remove a property, so a cleared field is stored empty.
            delta[_camel(name)] = _CLEARED.get(name, "") if value is None else _stored_value(value)
        subject = replace(about, **{k: v for k, v in changes.items() if k in ("machine_id", "tenant_id")})
        batched = ids.is_batched(about.request_id)
        try:
            if event is not None and batched:
                event_write = Write.insert(_event_entity(subject, event))
                etag = self._entities.transact([Write.merge(delta, about.etag), event_write])[0]
            else:
                etag = self._entities.merge(delta, about.etag)
        except EntityChanged as exc:
            raise StaleRecord(about.request_id) from exc
        if event is not None and not batched:
            self._legacy_audit.insert(_event_entity(subject, event, legacy=True))
        return etag, updated_at

    def record_event(self, record_or_id: RequestRecord | str, event: AuditEvent, **about: Any) -> None:
        """An event with no change of state (a duplicate delivery, a tag added)."""
        if isinstance(record_or_id, str):
            request_id, machine_id = record_or_id, about.get("machine_id")
        else:
            request_id, machine_id = record_or_id.request_id, record_or_id.machine_id
        stub = RequestRecord(request_id, machine_id, "", "")
        if ids.is_batched(request_id):
            self._entities.insert(_event_entity(stub, event))
        else:
            self._legacy_audit.insert(_event_entity(stub, event, legacy=True))


# What a cleared field is stored as (a merge cannot remove a property); read back as None.
_CLEARED: dict[str, Any] = {"claimed_attempt": 0}
_KEPT = ("caller", "comment")  # may be empty strings in their own right


def _stored_value(value: Any) -> Any:
    return str(value) if isinstance(value, Status) else value


def _entity(record: RequestRecord) -> dict[str, Any]:
    entity: dict[str, Any] = {
        "PartitionKey": partition_of(record.request_id),
        "RowKey": _row_of(record.request_id),
    }
    if ids.is_batched(record.request_id):
        entity["kind"] = "request"
    for name, value in asdict(record).items():
        if name not in ("etag", "request_id") and value is not None:
            entity[_camel(name)] = str(value) if isinstance(value, Status) else value
    return entity


def _record(stored: Stored) -> RequestRecord:
    entity = stored.entity
    request_id = entity["RowKey"] if entity["RowKey"] != "request" else entity["PartitionKey"]
    values: dict[str, Any] = {name: entity.get(_camel(name)) for name in FIELDS}
    values = {
        k: None if v == _CLEARED.get(k, "") and k not in ("caller", "comment") else v
        for k, v in values.items()
    }
    values["request_id"] = request_id
    values["status"] = Status(values.get("status") or Status.QUEUED)
    values = {k: v for k, v in values.items() if v is not None or k == "machine_id"}
    return RequestRecord(**values, etag=stored.etag)


def _event_entity(record: RequestRecord, event: AuditEvent, *, legacy: bool = False) -> dict[str, Any]:
    stamp = f"{event.at:%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:8]}"
    entity: dict[str, Any] = {
        "PartitionKey": record.request_id if legacy else partition_of(record.request_id),
        # Sorts by time; the suffix keeps two events in the same microsecond apart.
        "RowKey": stamp if legacy else f"{record.request_id}{AUDIT}{stamp}",
        "event": event.event,
        "at": event.at.isoformat(timespec="milliseconds"),
    }
    if not legacy:
        entity["kind"] = "audit"
        entity["requestId"] = record.request_id
    for name, value in (
        ("machineId", record.machine_id),
        ("caller", event.caller),
        ("outcome", event.outcome),
        ("tenantId", record.tenant_id),
    ):
        if value:
            entity[name] = value
    if event.detail:
        entity["detail"] = event.detail[:_DETAIL_LIMIT]
    return entity


def _event_view(stored: Stored) -> dict[str, Any]:
    entity = stored.entity
    view = {k: v for k, v in entity.items() if k not in ("kind",)}
    view.setdefault("requestId", entity["PartitionKey"])
    return view


def _batch_entity(batch: BatchItems) -> dict[str, Any]:
    return {
        "PartitionKey": f"batch-{batch.batch_id}",
        "RowKey": "batch",
        "kind": "batch",
        "items": json.dumps([list(item) for item in batch.items], separators=(",", ":")),
        "caller": batch.caller,
        "format": batch.format,
        "createdAt": batch.created_at,
    }


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(word.title() for word in rest)
