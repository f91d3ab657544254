"""One Defender budget shared by every instance: a log of reserved call slots in Azure Tables.

Defender allows, per application and tenant, 100 calls a minute **and** 1,500 an hour. Every
instance of the app spends the same budget, so the budget lives in storage, not in memory.

The algorithm: a sliding-window log of reserved slots
------------------------------------------------------
Each operation ("offboard", "machine-read", "action-read") has one table entity holding the
times of its most recent reserved slots, sorted (at most the largest window count, pruned
once older than the longest window). Reserving a slot for an operation with windows
(L1, W1), (L2, W2), ... and safety margin m takes

    t = max(now, last slot, blocked_until, slot[-L1] + W1 + m, slot[-L2] + W2 + m, ...)

where slot[-L] is the L-th most recent slot, appends t, and writes the entity back only if
its ETag is unchanged (If-Match); a 412 means another instance reserved first, so the entity
is re-read and t recomputed. The caller may call Defender from t on.

Why this holds in ANY sliding window: slots are non-decreasing (t >= last slot) and every
slot n satisfies t_n >= t_(n-L) + W + m. Any L+1 slots inside one window of length W would
include some t_i and t_(i+L) less than W apart: impossible. So no window of W seconds ever
holds more than L slots, for every configured window at once.

Why the full burst goes through: nothing spaces slots evenly. With an empty log the first
100 reservations of a minute all get t = now; the 101st gets the first slot's time plus a
minute. That is the fastest schedule any client can have under a sliding count (the greedy
schedule is the lower bound), which is what an efficiency near 1.0 needs.

The margin m (RATE_LIMIT_MARGIN_SECONDS) absorbs what the log cannot see: clock skew
between instances (slots are each instance's wall clock, Defender counts on its own) and a
call that starts a little after its slot (network jitter, a thread waking late, a message
coming back from the queue late). A slot handed to a re-queued message is honoured only
until t + m/2 (`still_valid`); the other half covers skew and jitter. Arrival times of any
two calls L slots apart then differ by at least W + m - m/2 - (skew + jitter) >= W.

An unused reservation is kept, not released: a message that must wait longer than a few
seconds goes back to the queue carrying its exact slot, and comes back just before it (see
`shared/pacing.py`), so it never reserves twice and the budget it holds is never given out
again. Releasing instead would let later reservations take earlier slots and break the
non-decreasing order the proof relies on. A slot that ends up unused (its message came back
too late) is simply wasted: that costs throughput, never a 429.

`penalize(operation, seconds)` records Defender's Retry-After: no slot of that operation
starts before it, for any instance, and held slots inside it are no longer valid.

Failures of table storage propagate (azure.core exceptions): the caller must not call
Defender without a reservation.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from array import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import TableClient, UpdateMode

from ..settings import RateWindow

log = logging.getLogger(__name__)
T = TypeVar("T")

_ROW_KEY = "budget"
# Many instances may race for one entity; each lost race costs one read and one write.
_MAX_ATTEMPTS = 200


class RateLimiterBusy(Exception):
    """The budget entity kept changing under us; no slot was reserved."""


@dataclass
class _Budget:
    slots: list[float]
    blocked_until: float = 0.0
    etag: str | None = None  # None: the entity does not exist yet


@dataclass
class _Pending:
    slot: float | None = None


def _next_slot(budget: _Budget, now: float, windows: Sequence[RateWindow], margin: float) -> float:
    """Append the earliest slot every window allows (see the module docstring) and prune."""
    slots = budget.slots
    slot = max(now, budget.blocked_until, slots[-1] if slots else now)
    for calls, seconds in windows:
        if len(slots) >= calls:
            slot = max(slot, slots[-calls] + seconds + margin)
    slots.append(slot)
    keep = max(calls for calls, _ in windows)
    horizon = now - max(seconds for _, seconds in windows) - margin
    budget.slots = [s for s in slots[-keep:] if s > horizon]
    return slot


@dataclass
class RateLimiter:
    """Reserves Defender call slots for named operations, shared through one table."""

    table: TableClient
    limits: Mapping[str, Sequence[RateWindow]]
    margin: float = 1.0
    clock: Callable[[], float] = time.time
    _cache: dict[str, _Budget] = field(default_factory=dict, init=False, repr=False)
    _locks: dict[str, threading.Lock] = field(default_factory=dict, init=False, repr=False)
    _pending: dict[str, list[_Pending]] = field(default_factory=dict, init=False, repr=False)
    _guard: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _table_ready: bool = field(default=False, init=False, repr=False)

    def reserve(self, operation: str) -> float:
        """Take the next slot for `operation`; seconds from now until it starts (0.0 = go now)."""
        return max(0.0, self.reserve_at(operation) - self.clock())

    def reserve_at(self, operation: str) -> float:
        """Take the next slot for `operation`; its start as a `clock()` time.

        Threads of one instance queue up and the one holding the lock reserves for all of
        them in a single write ("group commit"): a burst costs one table write per instance
        and per round trip, not one per message, which keeps ETag races between instances
        short.
        """
        windows = self._windows(operation)
        mine = _Pending()
        with self._guard:
            self._pending.setdefault(operation, []).append(mine)
        with self._lock(operation):
            if mine.slot is not None:
                return mine.slot  # reserved by another thread's write
            with self._guard:
                batch = self._pending.pop(operation, [])

            def take(budget: _Budget, now: float) -> list[float]:
                # Each attempt also takes whoever queued up meanwhile: the longer instances
                # race, the more each winning write reserves.
                with self._guard:
                    batch.extend(self._pending.pop(operation, []))
                return [_next_slot(budget, now, windows, self.margin) for _ in batch]

            try:
                slots = self._update_locked(operation, take)
            except BaseException:
                with self._guard:  # the others try again themselves
                    self._pending.setdefault(operation, []).extend(p for p in batch if p is not mine)
                raise
            for pending, slot in zip(batch, slots, strict=True):
                pending.slot = slot
            return next(slot for pending, slot in zip(batch, slots, strict=True) if pending is mine)

    def penalize(self, operation: str, seconds: float) -> None:
        """Defender answered 429 with Retry-After `seconds`: no slot of `operation` starts
        before then, on any instance."""
        self._windows(operation)

        def block(budget: _Budget, now: float) -> None:
            budget.blocked_until = max(budget.blocked_until, now + max(0.0, seconds))

        self._update(operation, block)

    def still_valid(self, operation: str, slot: float) -> bool:
        """Whether a slot reserved earlier may still be used now: no penalty covers it, it
        has not gone stale (used later than `margin / 2` after its start would eat into the
        margin the proof needs), and the log vouches for it: it is in the log, or older than
        everything the log still keeps (with a backlog of more than the largest count,
        early slots leave the log before they are used). A slot later than the newest one
        in the log was never granted by this log (the table was reset, or the setting
        points at another table), so it is void."""
        self._windows(operation)
        # A plain read, outside the lock: waiting behind another thread's reservation would
        # make this message late for the very slot it is checking.
        budget = self._read(operation)
        slots = budget.slots
        vouched = bool(slots) and slot <= slots[-1] and (slot < slots[0] or slot in slots)
        return vouched and slot >= budget.blocked_until and self.clock() <= slot + self.margin / 2

    def _windows(self, operation: str) -> Sequence[RateWindow]:
        windows = self.limits.get(operation)
        if not windows:
            raise ValueError(f"no rate limits configured for operation {operation!r}")
        return windows

    def _lock(self, operation: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(operation, threading.Lock())

    def _update(self, operation: str, change: Callable[[_Budget, float], T]) -> T:
        # Threads of one instance take turns, so only other instances can make a write lose.
        with self._lock(operation):
            return self._update_locked(operation, change)

    def _update_locked(self, operation: str, change: Callable[[_Budget, float], T]) -> T:
        for attempt in range(_MAX_ATTEMPTS):
            budget = self._cache.pop(operation, None) or self._read(operation)
            result = change(budget, self.clock())
            try:
                budget.etag = self._write(operation, budget)
            except (ResourceModifiedError, ResourceExistsError, ResourceNotFoundError):
                # Another instance wrote first (412/409) or the entity vanished: re-read, after
                # a short random pause that grows, so racing instances stop colliding.
                time.sleep(random.uniform(0, 0.004 * 2 ** min(attempt, 5)))
                continue
            self._cache[operation] = budget
            return result
        raise RateLimiterBusy(f"the {operation} budget changed {_MAX_ATTEMPTS} times while reserving")

    def _read(self, operation: str) -> _Budget:
        try:
            entity = self.table.get_entity(operation, _ROW_KEY)
        except ResourceNotFoundError:
            self._ensure_table()
            return _Budget(slots=[])
        slots = array("d")
        slots.frombytes(entity.get("Slots") or b"")
        return _Budget(list(slots), float(entity.get("BlockedUntil") or 0.0), entity.metadata["etag"])

    def _write(self, operation: str, budget: _Budget) -> str:
        entity = {
            "PartitionKey": operation,
            "RowKey": _ROW_KEY,
            "Slots": array("d", budget.slots).tobytes(),
            "BlockedUntil": float(budget.blocked_until),
        }
        if budget.etag is None:
            metadata = self.table.create_entity(entity)
        else:
            metadata = self.table.update_entity(
                entity,
                mode=UpdateMode.REPLACE,
                etag=budget.etag,
                match_condition=MatchConditions.IfNotModified,
            )
        return str(metadata["etag"])

    def _ensure_table(self) -> None:
        # Created on first use, like the queues, so a fresh storage account works.
        if self._table_ready:
            return
        with contextlib.suppress(ResourceExistsError):
            self.table.create_table()
        self._table_ready = True
