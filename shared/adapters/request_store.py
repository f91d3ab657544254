"""Request state in Azure Table storage, updated with ETags so two workers cannot overwrite
each other.

One table holds three kinds of row, each in its own partition so no query ever scans:
- `PartitionKey=<requestId>, RowKey="request"`: the request's state;
- `PartitionKey="machine-<machineId>", RowKey="active"`: which request currently owns the
  machine, so a second request for it (a playbook that fired twice) finds the first;
- `PartitionKey="key-<sha256(Idempotency-Key)>", RowKey="answer"`: the answer given to a
  caller's idempotency key, replayed when the same key comes again;
- `PartitionKey="held", RowKey=<requestId>`: the requests the blast-radius breaker holds;
- `PartitionKey="breaker"`: the breaker's count (see breaker.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime, timedelta
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import TableClient, UpdateMode

from ..domain.devices import Lookup
from ..domain.messages import utc_now_iso

# Statuses, as callers see them. Queued and Throttled: not yet accepted by Defender. Held:
# stopped by the blast-radius breaker until an operator releases it. Submitted, Pending,
# InProgress: Defender has the action. The rest are final (DryRun: everything but the call).
NOT_SENT = frozenset({"Queued", "Throttled"})
TERMINAL = frozenset({"Succeeded", "Failed", "Cancelled", "TimeOut", "Rejected", "Expired", "DryRun"})
# Defender's MachineAction statuses map one to one onto ours.
ACTION_STATUSES = frozenset({"Pending", "InProgress", "Succeeded", "Failed", "TimeOut", "Cancelled"})

# How long a worker's claim on a request holds: the function timeout (host.json). A claim
# older than this belongs to a worker that died, and its message may be retried.
CLAIM_LEASE = timedelta(minutes=5)


class StaleRecord(Exception):
    """Someone else changed the row since it was read (ETag mismatch)."""


@dataclass(frozen=True)
class RequestRecord:
    request_id: str
    machine_id: str | None  # None until a request that names its device otherwise is resolved
    caller: str
    comment: str
    status: str = "Queued"
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
    claimed_by: str | None = None  # queue message id of the worker calling Defender now
    claimed_attempt: int | None = None
    claimed_at: str | None = None
    etag: str | None = None

    @property
    def final(self) -> bool:
        """Nothing more will change from our side: the status poll can stop."""
        return self.status in TERMINAL or self.follow_up == "Stopped"

    def device_lookup(self) -> Lookup | None:
        if not self.lookup:
            return None
        named = json.loads(self.lookup)
        return Lookup.of(named["by"], named["value"])

    def claim_is_live(self, now: datetime) -> bool:
        if not self.claimed_at:
            return False
        return now - datetime.fromisoformat(self.claimed_at) < CLAIM_LEASE

    def public(self) -> dict[str, Any]:
        """The caller-facing view: no claim bookkeeping, no ETag."""
        view: dict[str, Any] = {
            "requestId": self.request_id,
            "machineId": self.machine_id,
            **({"lookup": json.loads(self.lookup)} if self.lookup else {}),
            "status": self.status,
            "attempt": self.attempt,
            "createdAt": self.created_at,
            "updatedAt": self.updated_at,
            "caller": self.caller,
            "comment": self.comment,
        }
        if self.next_attempt_at and self.status in NOT_SENT:
            view["nextAttemptAt"] = self.next_attempt_at
        if self.action_id:
            view["actionId"] = self.action_id
        if self.last_error_code:
            view["lastError"] = {"code": self.last_error_code, "message": self.last_error_message or ""}
        if self.follow_up:
            view["followUp"] = self.follow_up
        if self.dry_run:
            view["dryRun"] = True
        if self.note:
            view["note"] = self.note
        if self.would_send:
            view["wouldSend"] = json.loads(self.would_send)
        return view


_FIELDS = [f.name for f in fields(RequestRecord) if f.name != "etag"]


def _to_entity(record: RequestRecord) -> dict[str, Any]:
    entity: dict[str, Any] = {"PartitionKey": record.request_id, "RowKey": "request"}
    for name, value in asdict(record).items():
        if name != "etag" and value is not None:
            entity[_camel(name)] = value
    return entity


def _from_entity(entity: Any) -> RequestRecord:
    values = {name: entity.get(_camel(name)) for name in _FIELDS}
    values["request_id"] = entity["PartitionKey"]
    values = {k: v for k, v in values.items() if v is not None or k == "machine_id"}
    return RequestRecord(**values, etag=entity.metadata.get("etag"))


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(word.title() for word in rest)


class RequestStore:
    def __init__(self, table: TableClient) -> None:
        self._table = table
        self._ready = False
        self._lock = threading.Lock()

    def _client(self) -> TableClient:
        if not self._ready:
            with self._lock, contextlib.suppress(ResourceExistsError):
                self._table.create_table()
            self._ready = True
        return self._table

    # ---- requests -----------------------------------------------------------------------

    def create(self, record: RequestRecord) -> RequestRecord:
        now = utc_now_iso()
        record = replace(record, created_at=record.created_at or now, updated_at=now)
        meta = self._client().create_entity(_to_entity(record))
        return replace(record, etag=meta.get("etag"))

    def get(self, request_id: str) -> RequestRecord | None:
        try:
            return _from_entity(self._client().get_entity(request_id, "request"))
        except ResourceNotFoundError:
            return None

    def update(self, record: RequestRecord, **changes: Any) -> RequestRecord:
        """Write `changes` onto `record` if nobody changed the row since it was read."""
        updated = replace(record, **changes, updated_at=utc_now_iso())
        try:
            meta = self._client().update_entity(
                _to_entity(updated),
                mode=UpdateMode.REPLACE,  # cleared fields (a released claim) must disappear
                etag=record.etag,
                match_condition=MatchConditions.IfNotModified,
            )
        except (ResourceModifiedError, ResourceNotFoundError) as exc:
            raise StaleRecord(record.request_id) from exc
        return replace(updated, etag=meta.get("etag"))

    # ---- one active request per machine -------------------------------------------------

    def claim_machine(self, device_key: str, request_id: str) -> str | None:
        """Make `request_id` the device's active request, or return the one that already is.
        `device_key` is the machine id, or `by:value` for a device still to be resolved."""
        key = {"PartitionKey": f"machine-{device_key}", "RowKey": "active"}
        table = self._client()
        for _ in range(5):
            try:
                table.create_entity({**key, "requestId": request_id})
                return None
            except ResourceExistsError:
                pass
            try:
                row = table.get_entity(key["PartitionKey"], key["RowKey"])
            except ResourceNotFoundError:
                continue  # released in between; try to create again
            current = self.get(row["requestId"])
            if current is not None and not current.final:
                return current.request_id
            try:  # the previous request is over: take the machine over, if nobody beat us
                table.update_entity(
                    {**key, "requestId": request_id},
                    mode=UpdateMode.REPLACE,
                    etag=row.metadata["etag"],
                    match_condition=MatchConditions.IfNotModified,
                )
                return None
            except (ResourceModifiedError, ResourceNotFoundError):
                continue
        raise StaleRecord(f"machine-{device_key}")

    def release_machine(self, device_key: str, request_id: str) -> None:
        with contextlib.suppress(ResourceNotFoundError):
            row = self._client().get_entity(f"machine-{device_key}", "active")
            if row["requestId"] == request_id:
                self._client().delete_entity(
                    row, etag=row.metadata["etag"], match_condition=MatchConditions.IfNotModified
                )

    # ---- requests held by the breaker ---------------------------------------------------

    def mark_held(self, request_id: str) -> None:
        # An index partition, so releasing all held requests reads one partition, not the table.
        self._client().upsert_entity({"PartitionKey": "held", "RowKey": request_id})

    def held_ids(self) -> list[str]:
        rows = self._client().query_entities(
            "PartitionKey eq @p", parameters={"p": "held"}, select=["RowKey"]
        )
        return [row["RowKey"] for row in rows]

    def unmark_held(self, request_id: str) -> None:
        with contextlib.suppress(ResourceNotFoundError):
            self._client().delete_entity("held", request_id)

    # ---- idempotency keys ---------------------------------------------------------------

    def reserve_key(self, key: str, fingerprint: str) -> bool:
        """Claim `key` for a request about to be accepted; False if it was claimed before.
        Reserving first means two requests racing with one key cannot both be accepted."""
        try:
            self._client().create_entity(
                {
                    "PartitionKey": _key_partition(key),
                    "RowKey": "answer",
                    "fingerprint": fingerprint,
                    "status": 0,  # no answer yet: the first request is still being accepted
                    "body": "{}",
                    "createdAt": utc_now_iso(),
                }
            )
            return True
        except ResourceExistsError:
            return False

    def recall_answer(self, key: str) -> tuple[str, int, dict[str, Any]] | None:
        """(fingerprint of the first body, status, body) given for this key, if any; status 0
        while the first request is still being accepted."""
        try:
            row = self._client().get_entity(_key_partition(key), "answer")
        except ResourceNotFoundError:
            return None
        return row["fingerprint"], int(row["status"]), json.loads(row["body"])

    def remember_answer(self, key: str, fingerprint: str, status: int, body: dict[str, Any]) -> None:
        self._client().upsert_entity(
            {
                "PartitionKey": _key_partition(key),
                "RowKey": "answer",
                "fingerprint": fingerprint,
                "status": status,
                "body": json.dumps(body, separators=(",", ":")),
                "createdAt": utc_now_iso(),
            },
            mode=UpdateMode.REPLACE,
        )

    def forget_key(self, key: str) -> None:
        with contextlib.suppress(ResourceNotFoundError):
            self._client().delete_entity(_key_partition(key), "answer")


def _key_partition(key: str) -> str:
    # Hashed: a caller's key may hold characters a PartitionKey cannot (/, \, #, ?).
    return "key-" + hashlib.sha256(key.encode()).hexdigest()
