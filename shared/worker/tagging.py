"""Tagging offboarded machines (OFFBOARD_TAG_AFTER_SUCCESS), so people can see why a device
left Defender: many machines in one call, paced like every other call.

Offboards finish in bursts (Defender admits up to 100 a minute at once), so the threads of
one instance that finish within a moment of each other put their machines into one `tag`
message: the first waits up to `gather_seconds` for the others, then queues the message.
The message is handled like any other: the tag budget's slot, the bulk call
(`POST /api/machines/AddOrRemoveTagForMultipleMachines`, up to 500 machines), a 429 re-queued
after Retry-After. A tag is best effort: it never repeats or undoes an offboard.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ..adapters.queues import WorkQueue
from ..adapters.request_store import RequestStore
from ..domain import audit
from ..domain.messages import MAX_TAGGED, TagMessage
from ..domain.outcome import Requeue, RetryKind, Succeeded
from ..domain.records import AuditEvent
from .calls import MACHINE_TAG, Calls
from .pacing import Pacer

log = logging.getLogger("shared.worker")
# Transient failures of a tag call tried again at most this often: a tag is not worth more.
_TAG_ATTEMPTS = 3


@dataclass
class _Batch:
    machines: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    full: threading.Event = field(default_factory=threading.Event)


@dataclass
class Tagger:
    """Gathers the machines offboarded at about the same time into one tag message."""

    tag: str
    queue: WorkQueue
    gather_seconds: float = 1.0
    sleep: Callable[[float], None] = time.sleep
    _open: dict[str | None, _Batch] = field(default_factory=dict, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def add(self, machine_id: str, request_id: str, tenant_id: str | None) -> None:
        with self._lock:
            batch = self._open.get(tenant_id)
            leader = batch is None
            if batch is None:
                batch = self._open[tenant_id] = _Batch()
            batch.machines.append(machine_id)
            batch.requests.append(request_id)
            if len(batch.machines) >= MAX_TAGGED:
                del self._open[tenant_id]
                batch.full.set()
        if not leader:
            return
        batch.full.wait(self.gather_seconds)
        with self._lock:
            if self._open.get(tenant_id) is batch:
                del self._open[tenant_id]
        try:
            self.queue.send(TagMessage(self.tag, tuple(batch.machines), tuple(batch.requests), tenant_id))
        except Exception:
            log.exception(
                "Could not queue tagging %d offboarded machine(s) with %r", len(batch.machines), self.tag
            )


@dataclass
class Tagging:
    """Handles `tag` messages."""

    calls: Calls
    store: RequestStore
    queue: WorkQueue
    pacer: Pacer

    def handle(self, message: TagMessage) -> None:
        self.calls.warm_up(message.tenant_id)
        slot = self.pacer.admit(MACHINE_TAG, message.slot_at, message.tenant_id)
        if slot is not None:
            self.queue.send(replace(message, slot_at=slot), self.pacer.requeue_delay(slot))
            return
        answered = self.calls.make(
            MACHINE_TAG,
            lambda c: c.tag_machines(message.machine_ids, message.tag, message.tenant_id),
            tenant=message.tenant_id,
        )
        outcome = answered.outcome
        if isinstance(outcome, Requeue) and (
            outcome.kind is RetryKind.THROTTLED or message.attempt < _TAG_ATTEMPTS
        ):
            self.queue.send(
                replace(message, slot_at=None, attempt=message.attempt + 1), outcome.delay_seconds
            )
            return
        if isinstance(outcome, Succeeded):
            detail = f"tag {message.tag!r} added"
        else:
            code = getattr(outcome, "code", "")
            detail = f"adding tag {message.tag!r} failed: {code} (needs Machine.ReadWrite.All)"
            log.warning("Tagging %d machine(s): %s", len(message.machine_ids), detail)
        for machine_id, request_id in zip(message.machine_ids, message.request_ids, strict=True):
            try:
                self.store.record_event(
                    request_id, AuditEvent(audit.TAGGED, detail=detail), machine_id=machine_id
                )
            except Exception:
                log.exception("Could not write audit event %s", audit.TAGGED)
