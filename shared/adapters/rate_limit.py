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
starts before it, for any instance, and held slots inside it are no longer valid. A
Retry-After longer than the operation's longest window cannot be a rate limit (waiting that
long frees every window), so the penalty is capped there: one bad header must not stop
offboarding for a week.

Budgets are per application and tenant (Defender's limits are): each (operation, tenant)
pair is its own entity, `PartitionKey=<operation>`, `RowKey="budget"` for the home tenant
and `"budget-<tenantId>"` for a customer tenant.

Failures of table storage propagate (azure.core exceptions): the caller must not call
Defender without a reservation.
"""

from __future__ import annotations

import logging
import threading
import time
from array import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from ..settings import RateWindow
from .entities import Entities
from .retrying import retry_on_conflict

log = logging.getLogger(__name__)
T = TypeVar("T")

# Many instances may race for one entity; each lost race costs one read and one write.
_MAX_ATTEMPTS = 200
# The pause between lost races grows from up to 4 ms, so racing instances stop colliding.
_RACE_JITTER = 0.004
BudgetKey = tuple[str, str | None]  # (operation, tenant id; None for the home tenant)


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

    entities: Entities
    limits: Mapping[str, Sequence[RateWindow]]
    margin: float = 1.0
    clock: Callable[[], float] = time.time
    _cache: dict[BudgetKey, _Budget] = field(default_factory=dict, init=False, repr=False)
    _locks: dict[BudgetKey, threading.Lock] = field(default_factory=dict, init=False, repr=False)
    _pending: dict[BudgetKey, list[_Pending]] = field(default_factory=dict, init=False, repr=False)
    _guard: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def reserve(self, operation: str, tenant: str | None = None) -> float:
        """Take the next slot for `operation`; seconds from now until it starts (0.0 = go now)."""
        return max(0.0, self.reserve_at(operation, tenant) - self.clock())

    def longest_window(self, operation: str) -> float:
        """The longest of the operation's windows: no rate-limit wait can be longer."""
        return max(window.seconds for window in self._windows(operation))

    def reserve_at(self, operation: str, tenant: str | None = None) -> float:
        """Take the next slot for `operation`; its start as a `clock()` time.

        Threads of one instance queue up and the one holding the lock reserves for all of
        them in a single write ("group commit"): a burst costs one table write per instance
        and per round trip, not one per message, which keeps ETag races between instances
        short.
        """
        windows = self._windows(operation)
        key = (operation, tenant)
        mine = _Pending()
        with self._guard:
            self._pending.setdefault(key, []).append(mine)
        with self._lock(key):
            if mine.slot is not None:
                return mine.slot  # reserved by another thread's write
            with self._guard:
                batch = self._pending.pop(key, [])

            def take(budget: _Budget, now: float) -> list[float]:
                # Each attempt also takes whoever queued up meanwhile: the longer instances
                # race, the more each winning write reserves.
                with self._guard:
                    batch.extend(self._pending.pop(key, []))
                return [_next_slot(budget, now, windows, self.margin) for _ in batch]

            try:
                slots = self._update_locked(key, take)
            except BaseException:
                with self._guard:  # the others try again themselves
                    self._pending.setdefault(key, []).extend(p for p in batch if p is not mine)
                raise
            for pending, slot in zip(batch, slots, strict=True):
                pending.slot = slot
            return next(slot for pending, slot in zip(batch, slots, strict=True) if pending is mine)

    def penalize(self, operation: str, seconds: float, tenant: str | None = None) -> float:
        """Defender answered 429 with Retry-After `seconds`: no slot of `operation` starts
        before then, on any instance. Returns the seconds recorded (capped at the longest
        window, see the module docstring)."""
        seconds = min(max(0.0, seconds), self.longest_window(operation))

        def block(budget: _Budget, now: float) -> None:
            budget.blocked_until = max(budget.blocked_until, now + seconds)

        self._update((operation, tenant), block)
        return seconds

    def still_valid(self, operation: str, slot: float, tenant: str | None = None) -> bool:
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
        budget = self._read((operation, tenant))
        slots = budget.slots
        vouched = bool(slots) and slot <= slots[-1] and (slot < slots[0] or slot in slots)
        return vouched and slot >= budget.blocked_until and self.clock() <= slot + self.margin / 2

    def _windows(self, operation: str) -> Sequence[RateWindow]:
        windows = self.limits.get(operation)
        if not windows:
            raise ValueError(f"no rate limits configured for operation {operation!r}")
        return windows

    def _lock(self, key: BudgetKey) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def _update(self, key: BudgetKey, change: Callable[[_Budget, float], T]) -> T:
        # Threads of one instance take turns, so only other instances can make a write lose.
        with self._lock(key):
            return self._update_locked(key, change)

    def _update_locked(self, key: BudgetKey, change: Callable[[_Budget, float], T]) -> T:
        def attempt(fresh: bool) -> T:
            cached = None if fresh else self._cache.pop(key, None)
            budget = cached or self._read(key)
            result = change(budget, self.clock())
            self._cache.pop(key, None)  # a lost race must not leave the changed copy behind
            budget.etag = self._write(key, budget)
            self._cache[key] = budget
            return result

        return retry_on_conflict(attempt, _MAX_ATTEMPTS, f"the {key[0]} budget", jitter=_RACE_JITTER)

    def _read(self, key: BudgetKey) -> _Budget:
        stored = self.entities.get(*_where(key))
        if stored is None:
            return _Budget(slots=[])
        slots = array("d")
        slots.frombytes(stored.get("Slots") or b"")
        return _Budget(list(slots), float(stored.get("BlockedUntil") or 0.0), stored.etag)

    def _write(self, key: BudgetKey, budget: _Budget) -> str:
        partition, row = _where(key)
        entity = {
            "PartitionKey": partition,
            "RowKey": row,
            "Slots": array("d", budget.slots).tobytes(),
            "BlockedUntil": float(budget.blocked_until),
        }
        if budget.etag is None:
            return self.entities.insert(entity)
        return self.entities.replace(entity, budget.etag)


def _where(key: BudgetKey) -> tuple[str, str]:
    operation, tenant = key
    return operation, "budget" if tenant is None else f"budget-{tenant}"
