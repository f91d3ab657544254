"""The blast-radius breaker: more than N offboards accepted within a window stops the rest.

A mistake in automation (a query that matches every device, a loop) must not become a
fleet-wide offboard. The breaker counts accepted offboards in one Table storage row per
tenant shared by every instance (ETag concurrency); once the window holds `limit` of them,
further requests are held for an operator instead of queued.

The row and its ETag are kept in memory between calls, as the rate limiter keeps its
budgets: an admission is one conditional write, not a read and a write. A copy another
instance has changed meanwhile costs a 412, a re-read and a retry, never an admission the
shared row did not record.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .entities import Entities, EntityChanged, EntityConflict
from .retrying import retry_on_conflict

log = logging.getLogger(__name__)
_PARTITION = "breaker"
# Instances racing for one row: each lost race costs a read and a write.
_MAX_ATTEMPTS = 20


@dataclass(frozen=True)
class Admission:
    admitted: int  # how many of those asked for were admitted (the rest are held)
    count: int  # offboards accepted in the window, the admitted ones included


@dataclass
class _Row:
    accepted: list[float]
    etag: str | None  # None: the row does not exist yet


class BlastRadiusBreaker:
    def __init__(
        self,
        entities: Entities,
        limit: int,
        window_seconds: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._entities = entities
        self.limit = limit
        self.window_seconds = window_seconds
        self._clock = clock
        self._rows: dict[str, _Row] = {}
        self._lock = threading.Lock()

    def admit(self, count: int = 1, tenant_id: str | None = None) -> Admission:
        """Counts up to `count` more accepted offboards, as many as the window has room for."""
        row_key = "offboard" if tenant_id is None else f"offboard-{tenant_id}"
        with self._lock:  # this instance's threads take turns; only others can make a write lose
            return retry_on_conflict(
                lambda fresh: self._try(row_key, count, fresh), _MAX_ATTEMPTS, f"the breaker of {row_key}"
            )

    def _try(self, row_key: str, count: int, fresh: bool) -> Admission:
        row = None if fresh else self._rows.get(row_key)
        if row is None:
            row = self._read(row_key)
        now = self._clock()
        accepted = [t for t in row.accepted if t > now - self.window_seconds]
        room = max(0, self.limit - len(accepted))
        admitted = min(room, count)
        if admitted == 0:
            self._rows[row_key] = _Row(accepted, row.etag)
            return Admission(0, len(accepted))
        accepted += [round(now, 3)] * admitted
        entity = {
            "PartitionKey": _PARTITION,
            "RowKey": row_key,
            "acceptedAt": json.dumps(accepted, separators=(",", ":")),
        }
        self._rows.pop(row_key, None)
        etag = self._entities.insert(entity) if row.etag is None else self._entities.replace(entity, row.etag)
        self._rows[row_key] = _Row(accepted, etag)
        return Admission(admitted, len(accepted))

    def _read(self, row_key: str) -> _Row:
        stored = self._entities.get(_PARTITION, row_key)
        if stored is None:
            return _Row([], None)
        return _Row(json.loads(stored["acceptedAt"]), stored.etag)


__all__ = ["Admission", "BlastRadiusBreaker", "EntityChanged", "EntityConflict"]
