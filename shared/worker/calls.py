"""One step for every Defender call the worker makes: call, classify, and when Defender
answers 429, record its Retry-After in the shared budget so no instance calls that
operation again before then."""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import requests

from ..adapters.defender import DefenderClient
from ..domain.errors import DefenderCallError, NoResponse
from ..domain.outcome import Outcome, Requeue, RetryKind, RetryPolicy, classify
from .pacing import Pacer

log = logging.getLogger(__name__)

# The budgets (adapters/rate_limit.py) each kind of Defender call spends.
OFFBOARD = "offboard"
MACHINE_READ = "machine-read"
ACTION_READ = "action-read"
MACHINE_TAG = "machine-tag"
# The app role a 403 tells the operator to grant, per budget.
PERMISSION = {
    OFFBOARD: "Machine.Offboard",
    MACHINE_READ: "Machine.Read.All",
    ACTION_READ: "Machine.Read.All",
    MACHINE_TAG: "Machine.ReadWrite.All",
}


@dataclass(frozen=True)
class Answered:
    """What came back: the raw response (None when there was none), what it means, and
    whether Defender may have acted without saying so (no answer in time, or a 5xx/408:
    a gateway's error can come after the service behind it did the work)."""

    response: requests.Response | None
    outcome: Outcome
    may_have_acted: bool = False


@dataclass
class Calls:
    defender: DefenderClient
    pacer: Pacer
    policy: RetryPolicy
    rng: random.Random
    clock: Callable[[], datetime]

    def warm_up(self, tenant: str | None) -> None:
        """The tenant's token now, before a slot is taken: a slot is a promise to call at that
        moment, and a first token (the identity, then Entra, for a customer tenant) fetched
        after it would make the call late. No token is classified by the call that needs it."""
        with contextlib.suppress(DefenderCallError):
            self.defender.warm_up(tenant)

    def make(
        self,
        operation: str,
        call: Callable[[DefenderClient], requests.Response],
        *,
        failures: int = 0,
        tenant: str | None = None,
    ) -> Answered:
        try:
            result: requests.Response | DefenderCallError = call(self.defender)
        except DefenderCallError as exc:
            result = exc
        outcome = classify(
            result,
            failures=failures,
            policy=self.policy,
            now=self.clock(),
            rng=self.rng,
            permission=PERMISSION[operation],
            longest_wait=self.pacer.longest_window(operation),
        )
        if isinstance(outcome, Requeue) and outcome.kind is RetryKind.THROTTLED:
            self._penalize(operation, outcome, tenant)
        if isinstance(result, requests.Response):
            unsure = result.status_code >= 500 or result.status_code == 408
            return Answered(result, outcome, may_have_acted=unsure)
        return Answered(None, outcome, may_have_acted=isinstance(result, NoResponse))

    def _penalize(self, operation: str, outcome: Requeue, tenant: str | None) -> None:
        if outcome.capped_retry_after is not None:
            log.warning(
                "Defender asked to wait %r on %s, longer than its longest rate-limit window: waiting %ds",
                outcome.capped_retry_after,
                operation,
                outcome.delay_seconds,
            )
        # The message is already safely settled; a table error here must not make the host
        # redeliver it too (that would duplicate the request), so it is only logged.
        try:
            self.pacer.penalize(operation, outcome.delay_seconds, tenant)
        except Exception:
            log.exception("Could not record a 429 in the shared %s budget", operation)
