"""The queue worker: one message in, at most one Defender call, one recorded outcome.

It reads the message and hands it to the flow of its type: an offboard (offboard.py), a
status check (follow_up.py), a hold's expiry (intake/holds.py), tags (tagging.py), a hold
notification (notify.py). A message it cannot read is poisoned with the reason, never
guessed at. If a write that settles a message fails, the exception propagates and the host
delivers the message again (at least once): every flow is written to be delivered twice.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from ..adapters.queues import WorkQueue
from ..adapters.request_store import RequestStore
from ..domain import audit
from ..domain.messages import (
    ActionCheckMessage,
    HoldExpiryMessage,
    MessageError,
    NotifyMessage,
    OffboardMessage,
    TagMessage,
    parse_message,
)
from ..domain.records import AuditEvent
from ..domain.statuses import NOT_SENT, Status
from ..intake.holds import Holds
from .follow_up import FollowUp
from .notify import Notifier
from .offboard import OffboardFlow
from .tagging import Tagging

log = logging.getLogger("shared.worker")


@dataclass
class Worker:
    offboards: OffboardFlow
    checks: FollowUp
    holds: Holds
    tagging: Tagging
    queue: WorkQueue
    store: RequestStore
    notifier: Notifier | None = None

    def handle(self, body: bytes, message_id: str, dequeue_count: int = 1) -> None:
        try:
            message = parse_message(body.decode("utf-8"))
        except (UnicodeDecodeError, MessageError) as exc:
            self.queue.poison(body.decode("utf-8", errors="replace"), "MalformedMessage", str(exc))
            log.error("Poisoned an unreadable queue message without calling Defender: %s", exc)
            return
        if isinstance(message, OffboardMessage):
            self.offboards.run(message, message_id or str(uuid.uuid4()), redelivered=dequeue_count > 1)
        elif isinstance(message, ActionCheckMessage):
            self.checks.check(message)
        elif isinstance(message, HoldExpiryMessage):
            self.holds.expire(message)
        elif isinstance(message, TagMessage):
            self.tagging.handle(message)
        elif isinstance(message, NotifyMessage):
            if self.notifier is not None:
                self.notifier.handle(message)
        else:  # pragma: no cover - parse_message returns only the types above
            raise AssertionError(type(message))

    def process(self, message: OffboardMessage, message_id: str | None = None) -> None:
        """One offboard message, as if delivered now (tests and tools)."""
        self.offboards.run(message, message_id or str(uuid.uuid4()))

    def give_up(self, body: bytes, reason: str) -> None:
        """Best effort, as the host is about to poison this message: a status check that failed
        on every delivery stops the follow-up (the offboard itself went through, so the request
        keeps what Defender last said); the live offboard message of a request not yet sent
        marks it Failed. Any other message (an older attempt's, a tag, a hold's expiry) leaves
        the request as it is."""
        try:
            message = parse_message(body.decode("utf-8"))
            if isinstance(message, ActionCheckMessage):
                self.checks.stop(message, f"its status check failed on every delivery: {reason}")
                return
            if not isinstance(message, OffboardMessage):
                return
            record = self.store.get(message.request_id)
            if record is None or record.status not in NOT_SENT or message.attempt < record.attempt:
                return
            self.store.update(
                record,
                AuditEvent(audit.FAILED, outcome="PoisonedByHost", detail=reason),
                status=Status.FAILED,
                last_error_code="PoisonedByHost",
                last_error_message=reason,
            )
        except Exception:  # storage may be what failed in the first place
            log.exception("Could not mark the request of a message the host is poisoning")
