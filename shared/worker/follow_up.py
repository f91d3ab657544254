"""Following a submitted offboard: read its MachineAction now and then until it is final.

A check message carries the action's status when it was queued, so a check that finds it
unchanged (an offline device stays Pending for days) writes nothing: one budget slot, one
read of Defender, the next check queued. Only a change reads and writes the request's row.
Checks stop at the horizon (OFFBOARD_CHECK_HORIZON_SECONDS after submission).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from ..adapters.queues import WorkQueue
from ..adapters.request_store import RequestStore
from ..domain import audit
from ..domain.messages import ActionCheckMessage
from ..domain.outcome import Failed, Requeue
from ..domain.records import AuditEvent, RequestRecord
from ..domain.statuses import ACTION_STATUSES, TERMINAL, Status, status_of
from .calls import ACTION_READ, Calls
from .offboard import FollowUpPolicy
from .pacing import Pacer

log = logging.getLogger("shared.worker")


@dataclass
class FollowUp:
    calls: Calls
    store: RequestStore
    queue: WorkQueue
    pacer: Pacer
    policy: FollowUpPolicy
    clock: Callable[[], datetime]

    def check(self, message: ActionCheckMessage) -> None:
        self.calls.warm_up(message.tenant_id)
        slot = self.pacer.admit(ACTION_READ, message.slot_at, message.tenant_id)
        if slot is not None:  # the same check, carrying its slot, shortly before it
            self.queue.send(replace(message, slot_at=slot), self.pacer.requeue_delay(slot))
            return
        answered = self.calls.make(
            ACTION_READ,
            lambda c: c.get_action(message.action_id, message.tenant_id),
            tenant=message.tenant_id,
        )
        outcome = answered.outcome
        if isinstance(outcome, Requeue):
            self._next(message, outcome.delay_seconds, message.status)
            return
        if isinstance(outcome, Failed):
            self.stop(message, f"reading action {message.action_id} failed: {outcome.code}")
            return
        status = status_of(str(outcome.action.get("status")))
        if status is None or status not in ACTION_STATUSES:
            self.stop(message, f"Defender returned an unknown action status {outcome.action.get('status')!r}")
            return
        if message.status is not None and status == message.status:
            self._next(message, self.policy.delay(message.check + 1), str(status))
            return
        record = self.store.get(message.request_id)
        if record is None:
            self.queue.poison(message, "UnknownRequest", "no state row for this request")
            return
        if record.status in TERMINAL:
            log.info("Follow-up of request %s ends: it is %s", record.request_id, record.status)
            return
        if status != record.status:
            record = self.store.update(
                record,
                AuditEvent(audit.STATUS_CHANGED, outcome=str(status), detail=f"action {message.action_id}"),
                status=status,
                follow_up="Scheduled" if status not in TERMINAL else None,
            )
            log.info("Request %s machine %s is now %s", record.request_id, record.machine_id, status)
        if status not in TERMINAL:
            self._next(message, self.policy.delay(message.check + 1), str(status), record)

    def _next(
        self, message: ActionCheckMessage, delay: int, status: str | None, record: RequestRecord | None = None
    ) -> None:
        horizon = datetime.fromisoformat(message.submitted_at) + timedelta(
            seconds=self.policy.horizon_seconds
        )
        if self.clock() + timedelta(seconds=delay) > horizon:
            self.stop(message, f"still {status or 'unknown'} at the follow-up horizon", record)
            return
        following = replace(message, check=message.check + 1, slot_at=None, status=status)
        self.queue.send(following, delay)

    def stop(self, message: ActionCheckMessage, why: str, record: RequestRecord | None = None) -> None:
        record = record or self.store.get(message.request_id)
        if record is None or record.final:
            return
        record = self.store.update(
            record, AuditEvent(audit.FOLLOW_UP_STOPPED, detail=why), follow_up="Stopped"
        )
        log.warning(
            "Follow-up of request %s machine %s stopped: %s", record.request_id, record.machine_id, why
        )


__all__ = ["FollowUp", "Status"]
