"""The two guards that stop one intent becoming two requests, and that no crash can strand.

- A machine guard (`PartitionKey="machine-<device>"`, `RowKey="active"`) names the one
  unfinished request a device may have: a second request for it gets the first back.
- An idempotency key (`PartitionKey="key-<sha256(scope, key)>"`, `RowKey="answer"`) names the
  request its first use created: a retry with the same key gets that request back.

Each is taken *before* the request is written, by one conditional insert, and records when
and by which acceptance attempt it was taken. The process accepting may die at any line
after that. So a later request that finds a guard naming a request that has no row, older
than the acceptance lease (OFFBOARD_ACCEPT_LEASE_SECONDS, 30 s by default: acceptance is a
handful of storage calls), takes it over: it
first voids that request id (`RequestStore.void`, a conditional insert: a slow acceptor can
then never write it), then moves the guard with its ETag, so two takers cannot both win.
A guard whose request exists and is unfinished is kept; its request heals itself if it was
never queued (submission.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from .entities import Entities, EntityChanged, EntityConflict, Stored

# How long an acceptor may take between taking a guard and writing its request row.
ACCEPT_LEASE = 30.0  # the default of OFFBOARD_ACCEPT_LEASE_SECONDS


@dataclass(frozen=True)
class Guard:
    """A guard as found: the request it names, when and by whom it was taken."""

    request_id: str
    taken_at: float
    attempt: str
    etag: str
    # For keys: the fingerprint of the body it was first used with.
    fingerprint: str | None = None
    # A key answered before guards named their request: the status and body given then.
    legacy_answer: tuple[int, dict[str, Any]] | None = None
    # A key whose first use found the device's existing request names that one instead.
    pointed: bool = False

    def expired(self, now: float, lease: float = ACCEPT_LEASE) -> bool:
        return self.lease_left(now, lease) < 0

    def lease_left(self, now: float, lease: float = ACCEPT_LEASE) -> float:
        """Seconds until the guard's acceptor is presumed dead (negative once it is)."""
        return self.taken_at + lease - now


@dataclass(frozen=True)
class Taken:
    etag: str
    kind: Literal["taken"] = "taken"


@dataclass(frozen=True)
class Held:
    """Someone else's guard is in place."""

    guard: Guard
    kind: Literal["held"] = "held"


Outcome = Taken | Held


def machine_key(device: str, tenant_id: str | None = None, dry_run: bool = False) -> tuple[str, str]:
    """A device's guard. Dry runs have their own, so a rehearsal never stands in for the real
    request; tenants theirs, as machine ids are ids within a tenant."""
    scope = f"{tenant_id}-" if tenant_id else ""
    kind = "dryrun-machine" if dry_run else "machine"
    return f"{kind}-{scope}{device}", "active"


def key_key(scope: str, key: str) -> tuple[str, str]:
    """An idempotency key's guard, per caller scope (a principal): one caller's key never
    replays another's answer. Hashed: a key may hold characters a PartitionKey cannot."""
    material = key if not scope else f"{scope}\n{key}"
    return "key-" + hashlib.sha256(material.encode()).hexdigest(), "answer"


class Guards:
    def __init__(
        self, entities: Entities, lease: float = ACCEPT_LEASE, clock: Callable[[], float] = time.time
    ) -> None:
        self._entities = entities
        self.lease = lease
        self._now = clock

    def take(
        self, where: tuple[str, str], request_id: str, attempt: str, fingerprint: str | None = None
    ) -> Outcome:
        """One conditional insert: the guard is ours, or whose it is."""
        entity = self._entity(where, request_id, attempt, fingerprint)
        try:
            return Taken(self._entities.insert(entity))
        except EntityConflict:
            pass
        found = self.read(where)
        if found is None:  # released in between: one more try
            try:
                return Taken(self._entities.insert(entity))
            except EntityConflict:
                found = self.read(where)
                if found is None:
                    raise EntityChanged(f"{where[0]} keeps changing") from None
        return Held(found)

    def take_over(
        self, where: tuple[str, str], previous: Guard, request_id: str, attempt: str, fingerprint: str | None
    ) -> str | None:
        """Moves a guard from `previous` to `request_id`: its new ETag, or None if someone
        else changed it first."""
        try:
            return self._entities.replace(
                self._entity(where, request_id, attempt, fingerprint), previous.etag
            )
        except EntityChanged:
            return None

    def point(self, where: tuple[str, str], etag: str, request_id: str, fingerprint: str | None) -> None:
        """Our key, taken for a request that turned out to exist already: it names that one."""
        entity = {**self._entity(where, request_id, "", fingerprint), "pointed": True}
        with contextlib.suppress(EntityChanged):  # taken over meanwhile: their answer stands
            self._entities.replace(entity, etag)

    def read(self, where: tuple[str, str]) -> Guard | None:
        stored = self._entities.get(*where)
        return _guard(stored) if stored is not None else None

    def release(self, where: tuple[str, str], request_id: str) -> None:
        """Frees a guard that names `request_id` (a request that was not accepted after all)."""
        found = self.read(where)
        if found is not None and found.request_id == request_id:
            with contextlib.suppress(EntityChanged):  # taken over meanwhile: not ours to free
                self._entities.delete(*where, etag=found.etag)

    def now(self) -> float:
        return self._now()

    def _entity(
        self, where: tuple[str, str], request_id: str, attempt: str, fingerprint: str | None
    ) -> dict[str, object]:
        entity: dict[str, object] = {
            "PartitionKey": where[0],
            "RowKey": where[1],
            "requestId": request_id,
            "takenAt": round(self._now(), 3),
            "attempt": attempt,
        }
        if fingerprint is not None:
            entity["fingerprint"] = fingerprint
        return entity


def _guard(stored: Stored) -> Guard:
    # Guards written before leases existed carry no time: they count as long expired. A key
    # row of that time holds its answer instead of a request id (status 0: never answered).
    status = int(stored.get("status") or 0)
    return Guard(
        request_id=str(stored.get("requestId", "")),
        taken_at=float(stored.get("takenAt") or 0.0),
        attempt=str(stored.get("attempt") or ""),
        etag=stored.etag,
        fingerprint=stored.get("fingerprint"),
        legacy_answer=(status, json.loads(stored.get("body") or "{}")) if status else None,
        pointed=bool(stored.get("pointed")),
    )
