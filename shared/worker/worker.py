"""The queue worker: one message in, at most one Defender call, one recorded outcome.

An offboard message leaves this function in exactly one of three ways: the request was
submitted (and a delayed status check is queued), a new (possibly delayed) message carries
it on, or it failed and a poison record says why. If a write that makes that true fails,
the exception propagates and the host redelivers the original message (at-least-once).

Queues deliver at least once, so before calling Defender the worker claims the request's
state row with its ETag: a second delivery of a request that was already sent, a stale copy
of an earlier attempt, or a worker that lost the race to claim makes no call at all.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import requests
from azure.core.exceptions import AzureError, ResourceExistsError

from ..adapters import audit
from ..adapters.audit import AuditTrail
from ..adapters.defender import DefenderClient
from ..adapters.queues import WorkQueue
from ..adapters.request_store import (
    ACTION_STATUSES,
    NOT_SENT,
    TERMINAL,
    RequestRecord,
    RequestStore,
    StaleRecord,
)
from ..domain.errors import DefenderCallError
from ..domain.guardrails import Protection, verdict
from ..domain.messages import (
    ACTION_ID,
    ActionCheckMessage,
    HoldExpiryMessage,
    MessageError,
    OffboardMessage,
    parse_message,
)
from ..domain.outcome import Failed, Requeue, RetryKind, RetryPolicy, Succeeded, classify, parse_retry_after
from ..intake.holds import Holds
from .resolve import resolve

if TYPE_CHECKING:
    from .pacing import Pacer

log = logging.getLogger(__name__)
# The rate-limit budgets (shared/rate_limit.py) each kind of Defender call spends.
OFFBOARD = "offboard"
MACHINE_READ = "machine-read"
ACTION_READ = "action-read"


@dataclass(frozen=True)
class FollowUpPolicy:
    """When to read an action's status: sparse, because reads spend the same API budget."""

    initial_seconds: float = 60.0
    max_seconds: float = 3600.0
    horizon_seconds: float = 3 * 86_400.0  # offline devices stay Pending for days

    def delay(self, check: int) -> int:
        return int(min(self.max_seconds, self.initial_seconds * 2.0 ** min(check - 1, 30)))


@dataclass(frozen=True)
class Guard:
    """The guardrails in front of the offboard call (see guardrails.py and the README)."""

    precheck: bool = True
    proceed_without_permission: bool = False
    protection: Protection = field(default_factory=Protection)
    tag: str | None = None  # added to the machine after a successful offboard


@dataclass
class Worker:
    defender: DefenderClient
    queue: WorkQueue
    store: RequestStore
    audit: AuditTrail
    policy: RetryPolicy
    holds: Holds
    follow_up: FollowUpPolicy = field(default_factory=FollowUpPolicy)
    guard: Guard = field(default_factory=Guard)
    # Spends the shared Defender budgets (shared/pacing.py); the app always sets it.
    pacer: Pacer | None = None
    rng: random.Random = field(default_factory=random.Random)
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)

    def handle(self, body: bytes, message_id: str) -> None:
        try:
            message = parse_message(body.decode("utf-8"))
        except (UnicodeDecodeError, MessageError) as exc:
            text = body.decode("utf-8", errors="replace")
            self.queue.poison(text, "MalformedMessage", str(exc))
            log.error("Poisoned an unreadable queue message without calling Defender: %s", exc)
            return
        if isinstance(message, ActionCheckMessage):
            self.check(message)
        elif isinstance(message, HoldExpiryMessage):
            self.holds.expire(message)
        else:
            self.process(message, message_id)

    def give_up(self, body: bytes, reason: str) -> None:
        """Best effort, as the host is about to poison this message: mark its request Failed."""
        try:
            message = parse_message(body.decode("utf-8"))
            record = self.store.get(message.request_id)
            if record is None or record.final:
                return
            self.store.update(
                record, status="Failed", last_error_code="PoisonedByHost", last_error_message=reason
            )
            self.audit.record_request(
                audit.FAILED,
                record,
                outcome="PoisonedByHost",
                detail=reason,
            )
        except Exception:  # storage may be what failed in the first place
            log.exception("Could not mark the request of a message the host is poisoning")

    # ---- offboard -----------------------------------------------------------------------

    def process(self, message: OffboardMessage, message_id: str | None = None) -> None:
        record = self._claim(message, message_id or str(uuid.uuid4()))
        if record is None:
            return
        if message.machine_id is None:
            # A request that names its device another way is resolved first; a lookup that
            # fails or must wait is settled like an offboard call, and nothing is offboarded.
            if not self._read_slot(record, message, MACHINE_READ):
                return
            resolved = resolve(self.defender, message, policy=self.policy, now=self.clock(), rng=self.rng)
            if isinstance(resolved, Requeue):
                if resolved.kind is RetryKind.THROTTLED:
                    self._penalize(MACHINE_READ, resolved.delay_seconds)
                return self._requeue(record, message, resolved, "Device lookup")
            if isinstance(resolved, Failed):
                return self._fail(record, message, resolved, "Device lookup")
            message = replace(resolved, read_slot_at=None)  # that read is spent
            assert message.machine_id is not None and message.resolved_from is not None
            record = self.store.update(record, machine_id=message.machine_id)
            self.audit.try_record(
                audit.RESOLVED,
                request_id=record.request_id,
                machine_id=message.machine_id,
                detail=f"{message.resolved_from.by} {message.resolved_from.value} is this machine",
            )
        assert message.machine_id is not None
        # The precheck comes before the offboard slot: a slot is a promise to call at that
        # moment, and a read (or a wait for one) in between would make the call late.
        if self.guard.precheck and not message.prechecked:
            if not self._read_slot(record, message, MACHINE_READ):
                return
            message = replace(message, read_slot_at=None)
            if not self._precheck_passes(record, message):
                return
            message = replace(message, prechecked=True)
        if message.dry_run:  # a rehearsal spends no offboard slot
            self._dry_run(record, message)
            return
        if not self._offboard_slot(record, message):
            return
        try:
            result: requests.Response | DefenderCallError = self.defender.offboard(
                _machine(record), message.comment
            )
        except DefenderCallError as exc:
            result = exc
        outcome = classify(
            result, failures=message.failures, policy=self.policy, now=self.clock(), rng=self.rng
        )
        if isinstance(outcome, Succeeded):
            self._submitted(record, message, outcome)
        elif isinstance(outcome, Requeue):
            self._requeue(record, message, outcome)
            if outcome.kind is RetryKind.THROTTLED:
                self._penalize(OFFBOARD, outcome.delay_seconds)
        else:
            self._fail(record, message, outcome)

    # ---- pacing (shared/pacing.py) ------------------------------------------------------

    def _offboard_slot(self, record: RequestRecord, message: OffboardMessage) -> bool:
        """Take (or confirm) this request's slot in the shared offboard budget; without room,
        re-queue it carrying the slot. A table error propagates: the host redelivers the
        message and nothing calls Defender without a reservation."""
        if self.pacer is None:
            return True
        # The token first: a slot is a promise to call at that moment, and a first token
        # request (hundreds of milliseconds) after taking it would make the call late. No
        # token is classified by the call that needs it.
        with contextlib.suppress(DefenderCallError):
            self.defender.warm_up()
        slot = self.pacer.admit(OFFBOARD, message.slot_at)
        if slot is None:
            return True
        self._wait_for_slot(record, message, self.pacer.requeue_delay(slot), slot)
        return False

    def _read_slot(self, record: RequestRecord, message: OffboardMessage, operation: str) -> bool:
        """A read (lookup, precheck) spends its own budget; a far slot re-queues the request
        carrying that slot, so it is not taken again at the back of the line."""
        if self.pacer is None:
            return True
        slot = self.pacer.admit(operation, message.read_slot_at)
        if slot is None:
            return True
        self._wait_for_slot(record, message, self.pacer.requeue_delay(slot), read_slot=slot)
        return False

    def _wait_for_slot(
        self,
        record: RequestRecord,
        message: OffboardMessage,
        delay: int,
        slot: float | None = None,
        read_slot: float | None = None,
    ) -> None:
        # Not a failure: Defender was not called. Audited only as the row's Throttled status:
        # a backlog waits here by design.
        paced = Requeue(RetryKind.THROTTLED, delay, "Paced", "waiting for a slot in Defender's rate limit")
        self._requeue(record, message, paced, slot_at=slot, read_slot_at=read_slot)

    def _penalize(self, operation: str, seconds: int) -> None:
        # The message is already safely re-queued; a table error here must not make the host
        # redeliver it too (that would duplicate the request), so it is only logged.
        if self.pacer is None:
            return
        try:
            self.pacer.penalize(operation, seconds)
        except Exception:
            log.exception("Could not record a 429 in the shared %s budget", operation)

    def _precheck_passes(self, record: RequestRecord, message: OffboardMessage) -> bool:
        """Reads the machine and applies the guardrails; False when the outcome is recorded."""
        try:
            result: requests.Response | DefenderCallError = self.defender.get_machine(_machine(record))
        except DefenderCallError as exc:
            result = exc
        outcome = classify(
            result,
            failures=message.failures,
            policy=self.policy,
            now=self.clock(),
            rng=self.rng,
            permission="Machine.Read.All",
        )
        forbidden = isinstance(result, requests.Response) and result.status_code == 403
        if forbidden and self.guard.proceed_without_permission:
            log.warning(
                "Precheck of machine %s not possible (403: grant Machine.Read.All); proceeding without it "
                "as OFFBOARD_PRECHECK_WITHOUT_PERMISSION=proceed says",
                message.machine_id,
            )
            return True
        if forbidden:
            self._reject(
                record,
                "PrecheckNotPermitted",
                "the precheck could not read the machine (403): grant the app role Machine.Read.All, "
                "or set OFFBOARD_PRECHECK_WITHOUT_PERMISSION=proceed to offboard without it",
            )
            return False
        if isinstance(outcome, Requeue):
            self._requeue(record, message, outcome, "Precheck")
            if outcome.kind is RetryKind.THROTTLED:
                self._penalize(MACHINE_READ, outcome.delay_seconds)
            return False
        if isinstance(outcome, Failed):
            self._fail(record, message, outcome, "Precheck")
            return False
        refusal = verdict(outcome.action, self.guard.protection)
        if refusal is None:
            return True
        if refusal.done:
            self.store.update(record, status="Succeeded", note=refusal.message, **_NO_CLAIM)
            self.audit.record_request(
                audit.PRECHECK,
                record,
                outcome=refusal.code,
                detail=refusal.message,
            )
            log.info("Request %s machine %s: %s", record.request_id, record.machine_id, refusal.message)
        else:
            self._reject(record, refusal.code, refusal.message)
        return False

    def _reject(self, record: RequestRecord, code: str, reason: str) -> None:
        """A guardrail refused the request: final, recorded, and not poisoned (a replay would be
        refused again; there is nothing for an operator to fix in the queue)."""
        self.store.update(
            record, status="Rejected", last_error_code=code, last_error_message=reason, **_NO_CLAIM
        )
        self.audit.record_request(
            audit.REJECTED,
            record,
            outcome=code,
            detail=reason,
        )
        log.warning(
            "Offboard refused (%s: %s): request %s machine %s",
            code,
            reason,
            record.request_id,
            record.machine_id,
        )

    def _dry_run(self, record: RequestRecord, message: OffboardMessage) -> None:
        would_send = {
            "method": "POST",
            "path": self.defender.offboard_path(_machine(record)),
            "body": {"Comment": message.comment},
        }
        self.store.update(record, status="DryRun", would_send=json.dumps(would_send), **_NO_CLAIM)
        self.audit.record_request(
            audit.DRY_RUN,
            record,
            detail=f"would send POST {would_send['path']}",
        )
        log.info("Dry run: request %s machine %s was not offboarded", record.request_id, record.machine_id)

    def _pending_action(self, machine_id: str) -> str | None:
        """The id of the machine's offboard action Defender is still working on, if readable."""
        if self.pacer is not None:
            wait = self.pacer.limiter.reserve(ACTION_READ)
            if wait > self.pacer.max_inline_wait:
                return None  # the request ends with a note rather than overspend the budget
            self.pacer.sleep(wait)
        try:
            response = self.defender.find_offboard_actions(machine_id)
        except DefenderCallError:
            return None
        if response.status_code == 429:
            self._penalize(
                ACTION_READ, int(parse_retry_after(response.headers.get("Retry-After"), self.clock()) or 60)
            )
        try:
            actions = response.json().get("value", []) if response.status_code == 200 else []
        except (ValueError, AttributeError):
            return None
        open_actions = [
            a
            for a in actions
            if isinstance(a, dict)
            and a.get("status") in ("Pending", "InProgress")
            and isinstance(a.get("id"), str)
        ]
        if not open_actions:
            return None
        newest = max(open_actions, key=lambda a: str(a.get("creationDateTimeUtc", "")))
        action_id = newest["id"]
        return action_id if ACTION_ID.fullmatch(action_id) else None

    def _tag(self, record: RequestRecord, tag: str) -> None:
        """Best effort: a missing tag must not undo or repeat an offboard."""
        try:
            response = self.defender.add_tag(_machine(record), tag)
            ok = response.status_code in (200, 201)
            detail = f"tag {tag!r} added" if ok else f"adding tag {tag!r} answered {response.status_code}"
        except DefenderCallError as exc:
            ok, detail = False, f"adding tag {tag!r} failed: {exc}"
        if not ok:
            log.warning(
                "Request %s machine %s: %s (needs Machine.ReadWrite.All)",
                record.request_id,
                record.machine_id,
                detail,
            )
        self.audit.try_record_request(audit.TAGGED, record, detail=detail)

    def _claim(self, message: OffboardMessage, message_id: str) -> RequestRecord | None:
        """The request's row, claimed for this delivery; None when no call must be made."""
        record = self.store.get(message.request_id) or self._adopt(message)
        why_not = None
        if record.status == "Failed" and record.claimed_by == message_id:
            # This very delivery failed the request but did not get to poison it.
            self.queue.poison(message, record.last_error_code or "Failed", record.last_error_message or "")
            why_not = "already failed; poisoned now"
        elif record.status not in NOT_SENT:
            why_not = f"already {record.status}"
        elif message.attempt < record.attempt:
            why_not = f"stale attempt {message.attempt}, the request is at attempt {record.attempt}"
        elif (
            record.claim_is_live(self.clock())
            and record.claimed_by != message_id
            and (record.claimed_attempt or 0) >= message.attempt
        ):
            why_not = "another worker is sending it now"
        if why_not is None:
            try:
                return self.store.update(
                    record,
                    attempt=message.attempt,
                    claimed_by=message_id,
                    claimed_attempt=message.attempt,
                    claimed_at=self.clock().isoformat(),
                )
            except StaleRecord:
                why_not = "another worker claimed it first"
        log.info(
            "No Defender call for request %s machine %s attempt %d: %s",
            message.request_id,
            message.machine_id,
            message.attempt,
            why_not,
        )
        self.audit.try_record(
            audit.DUPLICATE, request_id=message.request_id, machine_id=message.machine_id, detail=why_not
        )
        return None

    def _adopt(self, message: OffboardMessage) -> RequestRecord:
        """A message with no state row (sent by hand, or by a version before state existed)."""
        record = RequestRecord(
            request_id=message.request_id,
            machine_id=message.machine_id,
            caller=message.caller,
            comment=message.comment,
            attempt=message.attempt,
            created_at=message.enqueued_at,
        )
        try:
            return self.store.create(record)
        except ResourceExistsError:
            return self.store.get(message.request_id) or record

    def _submitted(self, record: RequestRecord, message: OffboardMessage, outcome: Succeeded) -> None:
        status = "Pending" if outcome.already_pending else "Submitted"
        action_id = outcome.action_id
        note = None
        if outcome.already_pending:
            # Someone (a portal user, or our own earlier call whose answer was lost) already
            # started an offboard: follow that action, so this request still ends.
            action_id = self._pending_action(_machine(record))
            if action_id is None:
                note = NO_PENDING_ACTION
        if action_id:
            # Queued before the row changes: if the row write fails, the redelivered message
            # finds Defender's ActiveRequestAlreadyExists, and the check still runs.
            check = ActionCheckMessage(
                request_id=record.request_id,
                machine_id=_machine(record),
                action_id=action_id,
                submitted_at=self.clock().isoformat(timespec="seconds"),
            )
            self.queue.send(check, self.follow_up.delay(1))
        self.store.update(
            record,
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
        if self.guard.tag:
            self._tag(record, self.guard.tag)
        detail = f"action {action_id}" if action_id else "an offboard was already pending in Defender"
        self.audit.try_record_request(
            audit.SUBMITTED,
            record,
            outcome=status,
            detail=detail,
        )
        log.info(
            "Offboard %s: request %s machine %s attempt %d action %s",
            status.lower(),
            record.request_id,
            record.machine_id,
            message.attempt,
            action_id,
        )

    def _requeue(
        self,
        record: RequestRecord,
        message: OffboardMessage,
        outcome: Requeue,
        step: str = "Offboard",
        slot_at: float | None = None,
        read_slot_at: float | None = None,
    ) -> None:
        paced = outcome.code == "Paced"
        # Waiting for a slot is no attempt: Defender was not called.
        following = message if paced else message.next_attempt(failed=outcome.kind is not RetryKind.THROTTLED)
        self.queue.send(replace(following, slot_at=slot_at, read_slot_at=read_slot_at), outcome.delay_seconds)
        throttled = outcome.kind is RetryKind.THROTTLED
        try:
            self.store.update(
                record,
                status="Throttled" if throttled else "Queued",
                attempt=following.attempt,
                next_attempt_at=(self.clock() + timedelta(seconds=outcome.delay_seconds)).isoformat(
                    timespec="seconds"
                ),
                last_error_code=outcome.code,
                last_error_message=outcome.message,
                **_NO_CLAIM,
            )
        except (StaleRecord, AzureError):
            if paced:
                # A paced message keeps its attempt, so the row's claim would turn it away
                # when it returns: fail instead, and the host redelivers this very message.
                raise
            # The next message is already queued and supersedes this attempt; raising now
            # would only send a duplicate.
            log.warning(
                "Could not record the retry of request %s; its next attempt carries on", record.request_id
            )
        if paced:
            log.info(
                "%s paced: request %s machine %s waits %ds for its Defender slot",
                step,
                record.request_id,
                message.device,
                outcome.delay_seconds,
            )
            return
        self.audit.try_record(
            audit.THROTTLED if throttled else audit.RETRYING,
            request_id=record.request_id,
            machine_id=record.machine_id,
            outcome=outcome.code,
            detail=f"{outcome.message} (attempt {message.attempt}; next in {outcome.delay_seconds}s)",
        )
        level = logging.ERROR if outcome.kind is RetryKind.CONFIGURATION else logging.WARNING
        log.log(
            level,
            "%s %s (%s: %s): request %s machine %s attempt %d, retrying in %ds",
            step,
            outcome.kind.value.lower(),
            outcome.code,
            outcome.message,
            record.request_id,
            message.device,
            message.attempt,
            outcome.delay_seconds,
        )

    def _fail(
        self, record: RequestRecord, message: OffboardMessage, outcome: Failed, step: str = "Offboard"
    ) -> None:
        # Recorded first, with the reason, then poisoned. The claim stays on the row so a
        # redelivery of this message knows it only has to finish the poisoning.
        self.store.update(
            record, status="Failed", last_error_code=outcome.code, last_error_message=outcome.message
        )
        self.audit.record_request(
            audit.FAILED,
            record,
            outcome=outcome.code,
            detail=outcome.message,
        )
        self.queue.poison(message, outcome.code, outcome.message, outcome.status)
        log.error(
            "%s failed permanently (%s: %s): request %s machine %s attempt %d",
            step,
            outcome.code,
            outcome.message,
            record.request_id,
            message.device,
            message.attempt,
        )

    # ---- follow-up of the MachineAction -------------------------------------------------

    def check(self, message: ActionCheckMessage) -> None:
        record = self.store.get(message.request_id)
        if record is None:
            self.queue.poison(message, "UnknownRequest", "no state row for this request")
            return
        if record.status in TERMINAL:
            log.info("Follow-up of request %s ends: it is %s", record.request_id, record.status)
            return
        if self.pacer is not None:
            slot = self.pacer.admit(ACTION_READ, message.slot_at)
            if slot is not None:  # the same check, carrying its slot, shortly before it
                self.queue.send(replace(message, slot_at=slot), self.pacer.requeue_delay(slot))
                return
        try:
            result: requests.Response | DefenderCallError = self.defender.get_action(message.action_id)
        except DefenderCallError as exc:
            result = exc
        outcome = classify(
            result,
            failures=0,
            policy=self.policy,
            now=self.clock(),
            rng=self.rng,
            permission="Machine.Read.All",
        )
        if isinstance(outcome, Requeue):
            if outcome.kind is RetryKind.THROTTLED:
                self._penalize(ACTION_READ, outcome.delay_seconds)
            self._schedule_check(record, message, outcome.delay_seconds)
            return
        if isinstance(outcome, Failed):
            self._stop_follow_up(record, f"reading action {message.action_id} failed: {outcome.code}")
            return
        status = outcome.action.get("status")
        if status not in ACTION_STATUSES:
            self._stop_follow_up(record, f"Defender returned an unknown action status {status!r}")
            return
        if status != record.status:
            record = self.store.update(
                record, status=status, follow_up="Scheduled" if status not in TERMINAL else None
            )
            self.audit.record_request(
                audit.STATUS_CHANGED,
                record,
                outcome=status,
                detail=f"action {message.action_id}",
            )
            log.info("Request %s machine %s is now %s", record.request_id, record.machine_id, status)
        if status not in TERMINAL:
            self._schedule_check(record, message, self.follow_up.delay(message.check + 1))

    def _schedule_check(self, record: RequestRecord, message: ActionCheckMessage, delay: int) -> None:
        horizon = datetime.fromisoformat(message.submitted_at) + timedelta(
            seconds=self.follow_up.horizon_seconds
        )
        if self.clock() + timedelta(seconds=delay) > horizon:
            self._stop_follow_up(record, f"still {record.status} at the follow-up horizon")
            return
        following = ActionCheckMessage(
            request_id=message.request_id,
            machine_id=message.machine_id,
            action_id=message.action_id,
            submitted_at=message.submitted_at,
            check=message.check + 1,
        )
        self.queue.send(following, delay)

    def _stop_follow_up(self, record: RequestRecord, why: str) -> None:
        self.store.update(record, follow_up="Stopped")
        self.audit.record_request(audit.FOLLOW_UP_STOPPED, record, detail=why)
        log.warning(
            "Follow-up of request %s machine %s stopped: %s", record.request_id, record.machine_id, why
        )


def _machine(record: RequestRecord) -> str:
    """The machine id of a request past resolution (every step after it needs one)."""
    assert record.machine_id is not None, "the request's device has not been resolved"
    return record.machine_id


NO_PENDING_ACTION = (
    "Defender reports an offboard already pending, but its action was not found; see the portal"
)
_NO_CLAIM: dict[str, None] = {"claimed_by": None, "claimed_attempt": None, "claimed_at": None}
