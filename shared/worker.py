"""The queue worker: one message in, one Defender call, one recorded outcome.

A message leaves this function in exactly one of three ways: the request succeeded, a new
(possibly delayed) message carries it on, or a poison record says why it failed. If any of
the writes that make that true fails, the exception propagates and the host redelivers the
original message (at-least-once), so nothing is lost between the two.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import requests

from .defender import DefenderClient
from .errors import DefenderCallError
from .messages import MessageError, OffboardMessage
from .outcome import Failed, Requeue, RetryKind, RetryPolicy, Succeeded, classify
from .queues import WorkQueue

if TYPE_CHECKING:
    from .pacing import Pacer

log = logging.getLogger(__name__)
OFFBOARD = "offboard"  # the rate-limit budget offboard calls spend


@dataclass
class Worker:
    defender: DefenderClient
    queue: WorkQueue
    policy: RetryPolicy
    rng: random.Random = field(default_factory=random.Random)
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    # Spends the shared Defender budget (shared/pacing.py); the app always sets it.
    pacer: Pacer | None = None

    def handle(self, body: bytes) -> None:
        try:
            message = OffboardMessage.from_json(body.decode("utf-8"))
        except (UnicodeDecodeError, MessageError) as exc:
            text = body.decode("utf-8", errors="replace")
            self.queue.poison(text, "MalformedMessage", str(exc))
            log.error("Poisoned an unreadable queue message without calling Defender: %s", exc)
            return
        self.process(message)

    def process(self, message: OffboardMessage) -> None:
        result: requests.Response | DefenderCallError
        try:
            if self.pacer is not None and not self._admitted(message):
                return
            result = self.defender.offboard(message.machine_id, message.comment)
        except DefenderCallError as exc:
            result = exc
        outcome = classify(
            result,
            failures=message.failures,
            policy=self.policy,
            now=self.clock(),
            rng=self.rng,
        )
        ids = (message.request_id, message.machine_id, message.attempt)
        if isinstance(outcome, Succeeded):
            log.info(
                "Offboard %s: request %s machine %s attempt %d action %s",
                "already pending" if outcome.already_pending else "submitted",
                *ids,
                outcome.action_id,
            )
        elif isinstance(outcome, Requeue):
            self.queue.send(
                message.next_attempt(failed=outcome.kind is not RetryKind.THROTTLED), outcome.delay_seconds
            )
            if outcome.kind is RetryKind.THROTTLED and self.pacer is not None:
                self._penalize(outcome.delay_seconds)
            level = logging.ERROR if outcome.kind is RetryKind.CONFIGURATION else logging.WARNING
            log.log(
                level,
                "Offboard %s (%s: %s): request %s machine %s attempt %d, retrying in %ds",
                outcome.kind.value.lower(),
                outcome.code,
                outcome.message,
                *ids,
                outcome.delay_seconds,
            )
        elif isinstance(outcome, Failed):
            self.queue.poison(message, outcome.code, outcome.message, outcome.status)
            log.error(
                "Offboard failed permanently (%s: %s): request %s machine %s attempt %d",
                outcome.code,
                outcome.message,
                *ids,
            )

    def _admitted(self, message: OffboardMessage) -> bool:
        """Take (or confirm) a slot in the shared budget; without room, re-queue the message
        for its slot. Not a failure and not an attempt: Defender was not called. A table
        error propagates, so the host redelivers the message and nothing calls Defender
        without a reservation."""
        assert self.pacer is not None
        # The token first: a slot is a promise to call at that moment, and a first token
        # request (hundreds of milliseconds) after taking it would make the call late. No
        # token (TokenUnavailable) is classified like a failed call, and spends no slot.
        self.defender.warm_up()
        slot = self.pacer.admit(OFFBOARD, message.slot_at)
        if slot is None:
            return True
        delay = self.pacer.requeue_delay(slot)
        self.queue.send(replace(message, slot_at=slot), delay)
        log.info(
            "Offboard paced: request %s machine %s attempt %d holds a slot in %.1fs, back in %ds",
            message.request_id,
            message.machine_id,
            message.attempt,
            slot - self.pacer.clock(),
            delay,
        )
        return False

    def _penalize(self, seconds: int) -> None:
        # The message is already safely re-queued; a table error here must not make the host
        # redeliver it too (that would duplicate the request), so it is only logged.
        assert self.pacer is not None
        try:
            self.pacer.penalize(OFFBOARD, seconds)
        except Exception:
            log.exception("Could not record a 429 in the shared %s budget", OFFBOARD)
