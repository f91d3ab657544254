"""Every outcome of a delivery is written here: the request's row, its audit event (in the
same transaction) and the log line, in the order that keeps a request safe.

The write-order rules, each because of what a crash between two writes would leave:
- A status check is queued *before* the row says Submitted: a check without a Submitted
  row finds the action anyway; a Submitted row without a check would never end.
- A retry's message is sent *before* the row moves to the next attempt: a row that moved
  without a message would turn the redelivered message away as stale, and nothing would
  carry the request on. (The new message carries no ETag; its delivery reads the row.)
- A failure is recorded *before* the message is poisoned, and keeps its claim: the
  redelivered message then only has to finish the poisoning.
- A paced message is sent *after* its row notes when it will be tried: a lost send
  raises, and the host delivers the current message again.
Anything that raises here propagates: the host delivers the message again (at least once),
and the claim makes sure a second delivery calls Defender no second time.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from azure.core.exceptions import AzureError

from ..adapters.queues import WorkQueue
from ..adapters.request_store import RequestStore, StaleRecord
from ..domain import audit
from ..domain.messages import ActionCheckMessage, OffboardMessage
from ..domain.outcome import Failed, Requeue, RetryKind
from ..domain.records import AuditEvent, RequestRecord
from ..domain.statuses import Status

log = logging.getLogger("shared.worker")
_NO_CLAIM: dict[str, None] = {"claimed_by": None, "claimed_attempt": None, "claimed_at": None}


@dataclass
class Delivery:
    """One delivery of an offboard message, as it goes through the steps: the message (it
    changes as the request is resolved and prechecked) and the row's ETag as last known."""

    message: OffboardMessage
    delivery_id: str
    redelivered: bool = False
    etag: str | None = None
    record: RequestRecord | None = None  # the full row, when it had to be read
    claimed_at: str | None = None  # when this delivery claimed the row for its call

    @property
    def request_id(self) -> str:
        return self.message.request_id

    @property
    def machine_id(self) -> str:
        assert self.message.machine_id is not None, "the request's device has not been resolved"
        return self.message.machine_id

    def about(self) -> RequestRecord:
        """What a conditional write needs to know of the row: its id, device and ETag."""
        m = self.message
        return RequestRecord(
            m.request_id, m.machine_id, m.caller, m.comment, tenant_id=m.tenant_id, etag=self.etag
        )


@dataclass
class Recorder:
    store: RequestStore
    queue: WorkQueue
    clock: Callable[[], datetime]

    def change(self, d: Delivery, event: AuditEvent | None, **changes: Any) -> None:
        """Writes `changes` (and `event`) if the row is as this delivery last knew it."""
        d.etag = self.store.change(d.about(), event, **changes)

    def submitted(
        self, d: Delivery, action_id: str | None, pending: bool, note: str | None, check_in: int
    ) -> None:
        status = Status.PENDING if pending else Status.SUBMITTED
        if action_id:
            check = ActionCheckMessage(
                request_id=d.request_id,
                machine_id=d.machine_id,
                action_id=action_id,
                submitted_at=self.clock().isoformat(timespec="seconds"),
                status=str(status),
                tenant_id=d.message.tenant_id,
            )
            self.queue.send(check, check_in)
        detail = f"action {action_id}" if action_id else "an offboard was already pending in Defender"
        self.change(
            d,
            AuditEvent(audit.SUBMITTED, outcome=str(status), detail=detail),
            status=status,
            action_id=action_id,
            # Without an action there is nothing to follow: stopped, so the request is final.
            follow_up="Scheduled" if action_id else "Stopped",
            note=note,
            next_attempt_at=None,
            last_error_code=None,
            last_error_message=None,
            **_NO_CLAIM,
        )
        log.info(
            "Offboard %s: request %s machine %s attempt %d action %s",
            status.lower(),
            d.request_id,
            d.machine_id,
            d.message.attempt,
            action_id,
        )

    def retry(self, d: Delivery, outcome: Requeue, step: str) -> None:
        following = d.message.next_attempt(failed=outcome.kind is not RetryKind.THROTTLED)
        self.queue.send(replace(following, etag=None), outcome.delay_seconds)
        throttled = outcome.kind is RetryKind.THROTTLED
        try:
            self.change(
                d,
                AuditEvent(
                    audit.THROTTLED if throttled else audit.RETRYING,
                    outcome=outcome.code,
                    detail=f"{outcome.message} (attempt {d.message.attempt}; "
                    f"next in {outcome.delay_seconds}s)",
                ),
                status=Status.THROTTLED if throttled else Status.QUEUED,
                attempt=following.attempt,
                next_attempt_at=self._in(outcome.delay_seconds),
                last_error_code=outcome.code,
                last_error_message=outcome.message,
                **_NO_CLAIM,
            )
        except (StaleRecord, AzureError):
            # The next message is already queued and supersedes this attempt; raising now
            # would only send a duplicate.
            log.warning("Could not record the retry of request %s; its next attempt carries on", d.request_id)
        level = logging.ERROR if outcome.kind is RetryKind.CONFIGURATION else logging.WARNING
        log.log(
            level,
            "%s %s (%s: %s): request %s machine %s attempt %d, retrying in %ds",
            step,
            outcome.kind.value.lower(),
            outcome.code,
            outcome.message,
            d.request_id,
            d.message.device,
            d.message.attempt,
            outcome.delay_seconds,
        )

    def paced(
        self,
        d: Delivery,
        delay: int,
        *,
        slot_at: float | None = None,
        read_slot_at: float | None = None,
        action_slot_at: float | None = None,
        waiting_for: str = "its Defender slot",
    ) -> None:
        """Waiting (for a slot in Defender's budget, or another acceptor): not a failure, not
        an attempt, and no call was made. The row notes when it will be tried; the message
        carries its slot."""
        self.change(d, None, next_attempt_at=self._in(delay))
        waiting = replace(
            d.message, slot_at=slot_at, read_slot_at=read_slot_at, action_slot_at=action_slot_at, etag=d.etag
        )
        self.queue.send(waiting, delay)
        log.info("Request %s machine %s waits %ds for %s", d.request_id, d.message.device, delay, waiting_for)

    def failed(self, d: Delivery, outcome: Failed, step: str) -> None:
        # The row names the delivery that failed it, also when that was before any claim (a
        # lookup, the precheck): if the poison send below fails, the host's redelivery finds
        # its own failure and sends the poison record then.
        self.change(
            d,
            AuditEvent(audit.FAILED, outcome=outcome.code, detail=outcome.message),
            status=Status.FAILED,
            last_error_code=outcome.code,
            last_error_message=outcome.message,
            claimed_by=d.delivery_id,
        )
        self.queue.poison(d.message, outcome.code, outcome.message, outcome.status)
        log.error(
            "%s failed permanently (%s: %s): request %s machine %s attempt %d",
            step,
            outcome.code,
            outcome.message,
            d.request_id,
            d.message.device,
            d.message.attempt,
        )

    def rejected(self, d: Delivery, code: str, reason: str, **extra: Any) -> None:
        """A guardrail refused the request: final, recorded, and not poisoned (a replay would
        be refused again; there is nothing for an operator to fix in the queue)."""
        self.change(
            d,
            AuditEvent(audit.REJECTED, outcome=code, detail=reason),
            status=Status.REJECTED,
            last_error_code=code,
            last_error_message=reason,
            **extra,
            **_NO_CLAIM,
        )
        log.warning(
            "Offboard refused (%s: %s): request %s machine %s", code, reason, d.request_id, d.message.device
        )

    def nothing_to_do(self, d: Delivery, code: str, note: str) -> None:
        self.change(
            d,
            AuditEvent(audit.PRECHECK, outcome=code, detail=note),
            status=Status.SUCCEEDED,
            note=note,
            **_NO_CLAIM,
        )
        log.info("Request %s machine %s: %s", d.request_id, d.machine_id, note)

    def dry_run(self, d: Delivery, would_send: dict[str, Any]) -> None:
        self.change(
            d,
            AuditEvent(audit.DRY_RUN, detail=f"would send {would_send['method']} {would_send['path']}"),
            status=Status.DRY_RUN,
            would_send=json.dumps(would_send),
            **_NO_CLAIM,
        )
        log.info("Dry run: request %s machine %s was not offboarded", d.request_id, d.machine_id)

    def duplicate(self, d: Delivery, why: str) -> None:
        log.info(
            "No Defender call for request %s machine %s attempt %d: %s",
            d.request_id,
            d.message.device,
            d.message.attempt,
            why,
        )
        try:
            self.store.record_event(
                d.request_id, AuditEvent(audit.DUPLICATE, detail=why), machine_id=d.message.machine_id
            )
        except Exception:
            log.exception("Could not write audit event %s", audit.DUPLICATE)

    def _in(self, seconds: int) -> str:
        return (self.clock() + timedelta(seconds=seconds)).isoformat(timespec="seconds")
