"""The watcher's own rows in the state table (OFFBOARD_STATE_TABLE_NAME), each kind in its own
partition, written with ETags through the `Entities` contract (adapters/entities.py), so
`MemoryEntities` serves the fast tests and Azurite the end-to-end ones:

- `PartitionKey="intune-watch"`, `RowKey="checkpoint-<mode>"`: the audit checkpoint, Graph's
  "not before" (a Retry-After longer than a run may wait), the skips already recorded (so a
  bad item read again next run is not recorded again), and the last run's summary line. It
  is replaced only with the ETag it was read with; a run that finds it changed reads it again
  and writes the later of the two checkpoints, so a slower run never moves it back.
- `PartitionKey="intune-device"`, `RowKey=<Intune device id>`: the inventory (Entra device id,
  name, operating system, management state; `goneAt` once the device is no longer listed).
  Read once per run, written only where something changed, in transactions of up to 100.
- `PartitionKey="intune-retirement-<mode>"`, `RowKey=<Intune device id>`: the ledger, one row
  per leaving device: its comment, idempotency key and lookup, then its request id and
  outcome. Inserted before its request is submitted (a second run finds it and submits the
  same key and comment), settled after.

A write that loses a race (412, 409) is not an error here: the other run wrote the same
thing, or newer. The caller learns which rows it lost and reads them again where it matters.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from ..adapters.entities import Entities, EntityChanged, EntityConflict, Query, Stored, Write
from ..domain.devices import InvalidLookup, Lookup
from .decide import Device, InventoryChanges, Known, Mode, Retirement, parse_time

log = logging.getLogger("shared.watcher")
WATCH = "intune-watch"
INVENTORY = "intune-device"
_MAX_WRITES = 100  # Table storage's limit for one transaction
_CHECKPOINT_TRIES = 10
_NOTED_DAYS = 2  # a recorded skip is remembered this long
_MAX_NOTED = 500  # ... and at most this many (one property holds them: 64 KiB)
_SUMMARY = 1000


def ledger_partition(mode: Mode) -> str:
    return f"intune-retirement-{mode}"


@dataclass(frozen=True)
class Checkpoint:
    at: datetime | None = None
    not_before: datetime | None = None
    noted: Mapping[str, str] = field(default_factory=dict)  # skip fingerprint -> when recorded
    etag: str | None = None


class WatchStore:
    def __init__(self, entities: Entities, mode: Mode) -> None:
        self._entities = entities
        self.mode = mode
        self._ledger = ledger_partition(mode)

    # ---- the checkpoint -----------------------------------------------------------------

    def checkpoint(self) -> Checkpoint:
        stored = self._entities.get(WATCH, f"checkpoint-{self.mode}")
        return _checkpoint(stored) if stored is not None else Checkpoint()

    def save_checkpoint(
        self,
        previous: Checkpoint,
        at: datetime | None,
        not_before: datetime | None,
        noted: Mapping[str, str],
        summary: str,
        now: datetime,
    ) -> Checkpoint:
        """Writes the later of `at` and what is stored (likewise `not_before`), with both
        runs' recorded skips: conditional on the ETag, read again after a lost race."""
        current = previous
        for _ in range(_CHECKPOINT_TRIES):
            merged = Checkpoint(
                _later(current.at, at),
                _later(current.not_before, not_before),
                _recent({**current.noted, **noted}, now),
            )
            entity = {
                "PartitionKey": WATCH,
                "RowKey": f"checkpoint-{self.mode}",
                "at": _iso(merged.at),
                "notBefore": _iso(merged.not_before),
                "noted": json.dumps(merged.noted, separators=(",", ":")),
                "lastRunAt": now.isoformat(),
                "lastRun": summary[:_SUMMARY],
            }
            try:
                if current.etag is None:
                    etag = self._entities.insert(entity)
                else:
                    etag = self._entities.replace(entity, current.etag)
                return replace(merged, etag=etag)
            except (EntityChanged, EntityConflict):
                current = self.checkpoint()  # another run wrote first: merge with it
        raise EntityChanged(f"{WATCH}/checkpoint-{self.mode} kept changing")

    # ---- the inventory ------------------------------------------------------------------

    def inventory(self) -> dict[str, Known]:
        known: dict[str, Known] = {}
        for stored in self._entities.query(Query(partition=INVENTORY)):
            device = Device(
                stored["RowKey"],
                stored.get("deviceName") or None,
                stored.get("aadDeviceId") or None,
                stored.get("operatingSystem") or None,
                stored.get("managementState") or None,
            )
            known[device.intune_id] = Known(device, parse_time(stored.get("goneAt")), stored.etag)
        return known

    def write_inventory(self, known: Mapping[str, Known], changes: InventoryChanges, now: datetime) -> int:
        """Writes the changes; how many rows were written (lost races are left to next run)."""
        writes: list[Write] = []
        for device in changes.upserts:
            entity = _device_entity(device, now)
            found = known.get(device.intune_id)
            writes.append(Write.replace(entity, found.etag) if found else Write.insert(entity))
        for intune_id in changes.gone:
            stamp = {"PartitionKey": INVENTORY, "RowKey": intune_id, "goneAt": now.isoformat()}
            writes.append(Write.merge(stamp, known[intune_id].etag))
        written = sum(1 for etag in self._write_all(writes) if etag is not None)
        for intune_id in changes.removed:
            try:
                self._entities.delete(INVENTORY, intune_id, known[intune_id].etag)
                written += 1
            except EntityChanged:
                pass  # back in the listing meanwhile, by another run
        return written

    # ---- the ledger ---------------------------------------------------------------------

    def ledger(self) -> dict[str, Retirement]:
        rows = (_retirement(stored) for stored in self._entities.query(Query(partition=self._ledger)))
        return {row.intune_id: row for row in rows if row is not None}

    def open(self, rows: Sequence[Retirement]) -> tuple[dict[str, Retirement], set[str]]:
        """Inserts new ledger rows. Returns the rows as stored, and which of them this call
        inserted: for a row another run inserted first, that run's row (its key and comment
        are the ones to submit)."""
        etags = self._write_all([Write.insert(self._entity(row)) for row in rows])
        opened: dict[str, Retirement] = {}
        ours: set[str] = set()
        for row, etag in zip(rows, etags, strict=True):
            if etag is not None:
                opened[row.intune_id] = replace(row, etag=etag)
                ours.add(row.intune_id)
                continue
            stored = self._entities.get(self._ledger, row.intune_id)
            theirs = _retirement(stored) if stored is not None else None
            if theirs is not None:
                opened[row.intune_id] = theirs
        return opened, ours

    def update(self, rows: Sequence[tuple[Retirement, Retirement]]) -> dict[str, Retirement]:
        """Writes each (read, changed) pair, conditional on the read row's ETag; a row changed
        meanwhile by another run keeps that run's version (returned instead)."""
        writes = [Write.replace(self._entity(new), old.etag or "") for old, new in rows]
        result: dict[str, Retirement] = {}
        for (_, new), etag in zip(rows, self._write_all(writes), strict=True):
            if etag is not None:
                result[new.intune_id] = replace(new, etag=etag)
                continue
            stored = self._entities.get(self._ledger, new.intune_id)
            theirs = _retirement(stored) if stored is not None else None
            if theirs is not None:
                result[new.intune_id] = theirs
        return result

    def prune(self, rows: Iterable[Retirement]) -> int:
        pruned = 0
        for row in rows:
            try:
                self._entities.delete(self._ledger, row.intune_id, row.etag)
                pruned += 1
            except EntityChanged:
                pass
        return pruned

    def _entity(self, row: Retirement) -> dict[str, Any]:
        return {
            "PartitionKey": self._ledger,
            "RowKey": row.intune_id,
            "action": row.action,
            "actions": ",".join(row.actions),
            "source": row.source,
            "at": row.at.isoformat(),
            "openedAt": row.opened_at.isoformat(),
            "comment": row.comment,
            "key": row.key,
            "lookupBy": row.lookup.by if row.lookup else "",
            "lookupValue": row.lookup.value if row.lookup else "",
            "deviceName": row.name or "",
            "actor": row.actor or "",
            "requestId": row.request_id or "",
            "outcome": row.outcome or "",
            "settled": row.settled,
            "attempts": row.attempts,
            "error": (row.error or "")[:_SUMMARY],
        }

    # ---- transactions -------------------------------------------------------------------

    def _write_all(self, writes: Sequence[Write]) -> list[str | None]:
        """Each write's new ETag, or None where another run's write came first. Transactions
        of up to 100 (one partition each); a transaction that loses a race is written again
        one row at a time, so only the rows that really lost are left out."""
        etags: list[str | None] = []
        start = 0
        while start < len(writes):
            partition = writes[start].entity["PartitionKey"]
            end = start
            while (
                end < len(writes)
                and end - start < _MAX_WRITES
                and writes[end].entity["PartitionKey"] == partition
            ):
                end += 1
            chunk = writes[start:end]
            try:
                etags.extend(self._entities.transact(chunk))
            except (EntityChanged, EntityConflict):
                for write in chunk:
                    try:
                        etags.append(self._entities.transact([write])[0])
                    except (EntityChanged, EntityConflict):
                        etags.append(None)
            start = end
        return etags


def _device_entity(device: Device, now: datetime) -> dict[str, Any]:
    return {
        "PartitionKey": INVENTORY,
        "RowKey": device.intune_id,
        "deviceName": device.name or "",
        "aadDeviceId": device.aad_device_id or "",
        "operatingSystem": device.operating_system or "",
        "managementState": device.state or "",
        "goneAt": "",
        "updatedAt": now.isoformat(),
    }


def _retirement(stored: Stored) -> Retirement | None:
    at, opened = parse_time(stored.get("at")), parse_time(stored.get("openedAt"))
    if at is None or opened is None or stored.get("action") not in ("retire", "wipe", "delete"):
        log.warning("Ledger row %s is unreadable; it is left alone", stored["RowKey"])
        return None
    lookup = None
    if stored.get("lookupBy"):
        try:
            lookup = Lookup.of(stored["lookupBy"], stored.get("lookupValue"))
        except InvalidLookup:
            lookup = None
    return Retirement(
        intune_id=stored["RowKey"],
        action=stored["action"],
        source=stored.get("source") or "",
        at=at,
        opened_at=opened,
        comment=stored.get("comment") or "",
        key=stored.get("key") or "",
        lookup=lookup,
        name=stored.get("deviceName") or None,
        actor=stored.get("actor") or None,
        actions=tuple(a for a in (stored.get("actions") or "").split(",") if a),
        request_id=stored.get("requestId") or None,
        outcome=stored.get("outcome") or None,
        settled=bool(stored.get("settled")),
        attempts=int(stored.get("attempts") or 0),
        error=stored.get("error") or None,
        etag=stored.etag,
    )


def _checkpoint(stored: Stored) -> Checkpoint:
    try:
        noted = json.loads(stored.get("noted") or "{}")
    except ValueError:
        noted = {}
    return Checkpoint(
        parse_time(stored.get("at")),
        parse_time(stored.get("notBefore")),
        noted if isinstance(noted, dict) else {},
        stored.etag,
    )


def _later(a: datetime | None, b: datetime | None) -> datetime | None:
    if a is None or b is None:
        return a or b
    return max(a, b)


def _recent(noted: Mapping[str, str], now: datetime) -> dict[str, str]:
    cutoff = now - timedelta(days=_NOTED_DAYS)
    kept = sorted(
        ((fp, at) for fp, at in noted.items() if (parse_time(at) or cutoff) > cutoff),
        key=lambda item: item[1],
    )
    return dict(kept[-_MAX_NOTED:])


def _iso(moment: datetime | None) -> str:
    return moment.isoformat() if moment else ""
