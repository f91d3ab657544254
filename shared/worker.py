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
from dataclasses import dataclass, field
from datetime import UTC, datetime

import requests

from .defender import DefenderClient
from .errors import DefenderCallError
from .messages import MessageError, OffboardMessage
from .outcome import Failed, Outcome, Requeue, RetryKind, RetryPolicy, Succeeded, classify
from .queues import WorkQueue
from .resolve import resolve

log = logging.getLogger(__name__)


@dataclass
class Worker:
    defender: DefenderClient
    queue: WorkQueue
    policy: RetryPolicy
    rng: random.Random = field(default_factory=random.Random)
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)

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
        if message.machine_id is None:
            # A request that names its device another way is resolved first; a lookup that
            # fails or must wait is settled like an offboard call, and is not offboarded.
            resolved = resolve(self.defender, message, policy=self.policy, now=self.clock(), rng=self.rng)
            if not isinstance(resolved, OffboardMessage):
                return self._settle(message, resolved, "Device lookup")
            message = resolved
        assert message.machine_id is not None
        try:
            result: requests.Response | DefenderCallError = self.defender.offboard(
                message.machine_id, message.comment
            )
        except DefenderCallError as exc:
            result = exc
        outcome = classify(
            result,
            failures=message.failures,
            policy=self.policy,
            now=self.clock(),
            rng=self.rng,
        )
        self._settle(message, outcome, "Offboard")

    def _settle(self, message: OffboardMessage, outcome: Outcome, step: str) -> None:
        ids = (message.request_id, message.device, message.attempt)
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
            level = logging.ERROR if outcome.kind is RetryKind.CONFIGURATION else logging.WARNING
            log.log(
                level,
                "%s %s (%s: %s): request %s machine %s attempt %d, retrying in %ds",
                step,
                outcome.kind.value.lower(),
                outcome.code,
                outcome.message,
                *ids,
                outcome.delay_seconds,
            )
        elif isinstance(outcome, Failed):
            self.queue.poison(message, outcome.code, outcome.message, outcome.status)
            log.error(
                "%s failed permanently (%s: %s): request %s machine %s attempt %d",
                step,
                outcome.code,
                outcome.message,
                *ids,
            )
