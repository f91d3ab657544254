"""One offboard message, as steps that read top to bottom. Each step either lets the
request go on or settles it (recorded, re-queued, or dropped as a duplicate) and stops:

    resolve → guard the machine → precheck → dry run → settle doubt → slot → claim → call

- resolve: a request that names its device by Entra device id or DNS name gets exactly one
  machine id, or fails saying why (domain/resolution.py);
- guard the machine: once resolved, the machine's own guard, so that a request by name and
  one by machine id for the same device are one request;
- precheck: read the machine and apply the guardrails (domain/guardrails.py);
- dry run: everything but the call;
- settle doubt: an attempt that may already have reached Defender (a redelivery that finds
  its own earlier claim, a retry after a timeout, a 5xx or a dropped connection) looks for
  the action first, follows it if there is one, and calls only when there is none;
- slot: a slot in Defender's shared budget, waited for inline or carried in the re-queued
  message (pacing.py); reads take their slots where they read;
- claim: the row, claimed with the ETag the message carries, right before the call (a
  second delivery, a stale copy or a racing instance loses here and calls nothing);
- call: the offboard, and its outcome recorded (recorder.py).

Writes before the claim are conditional too; when one finds the row changed (a cancel, a
heal), the row is read and the delivery decides again, once (`_decide`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from ..adapters.guards import Guards, Held, machine_key
from ..adapters.queues import WorkQueue
from ..adapters.request_store import NewRequest, RequestStore, StaleRecord
from ..domain import audit
from ..domain.guardrails import Protection, verdict
from ..domain.messages import OffboardMessage
from ..domain.outcome import Failed, Requeue, RetryKind, Succeeded
from ..domain.records import AuditEvent, RequestRecord
from ..domain.resolution import choose, pending_action
from ..domain.statuses import NOT_SENT, Status
from .calls import ACTION_READ, MACHINE_READ, OFFBOARD, Calls
from .pacing import Pacer
from .recorder import Delivery, Recorder

if TYPE_CHECKING:
    from .tagging import Tagger

log = logging.getLogger("shared.worker")
# Defender's clock and ours may differ a little: an action created "before" the claim that
# may have created it is still that action.
_CLOCK_SKEW = timedelta(minutes=5)
NO_PENDING_ACTION = (
    "Defender reports an offboard already pending, but its action could not be found or read; see the portal"
)


@dataclass(frozen=True)
class FollowUpPolicy:
    """When to read an action's status: sparse, because reads spend the same API budget."""

    initial_seconds: float = 60.0
    max_seconds: float = 3600.0
    horizon_seconds: float = 3 * 86_400.0  # offline devices stay Pending for days

    def delay(self, check: int) -> int:
        return int(min(self.max_seconds, self.initial_seconds * 2.0 ** min(check - 1, 30)))


@dataclass(frozen=True)
class Guardrails:
    """The guardrails in front of the offboard call (domain/guardrails.py; docs/how-it-works.md,
    "Guardrails")."""

    precheck: bool = True
    proceed_without_permission: bool = False
    protection: Protection = field(default_factory=Protection)
    by_tenant: dict[str, Protection] = field(default_factory=dict)  # a tenant's own, where set

    def protection_for(self, tenant: str | None) -> Protection:
        return self.by_tenant.get(tenant or "", self.protection)


@dataclass
class OffboardFlow:
    calls: Calls
    recorder: Recorder
    store: RequestStore
    queue: WorkQueue
    guards: Guards
    pacer: Pacer
    guardrails: Guardrails
    follow_up: FollowUpPolicy
    tagger: Tagger | None = None
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)

    def run(self, message: OffboardMessage, delivery_id: str, redelivered: bool = False) -> None:
        d = Delivery(message, delivery_id, redelivered, etag=message.etag)
        # Read the row first when the message has no ETag (sent by an older version, or by
        # hand) or comes back from a delivery that died: an earlier claim of its own is found
        # here, so the doubt is settled before the offboard slot, not after it.
        if (d.etag is None or redelivered) and not self._decide(d):
            return
        steps = (
            self._resolve,
            self._guard_machine,
            self._precheck,
            self._rehearse,
            self._settle_doubt,
            self._slot,
            self._claim,
            self._call,
        )
        for step in steps:
            try:
                go_on = step(d)
            except StaleRecord:
                # The row changed since the message was sent: read it, decide (which may find
                # that an earlier call of this attempt was made), try once more.
                go_on = self._decide(d) and self._settle_doubt(d) and step(d)
            if not go_on:
                return

    # ---- the steps ----------------------------------------------------------------------

    def _resolve(self, d: Delivery) -> bool:
        lookup = d.message.lookup
        if lookup is None:
            return True
        if not self._read_slot(d):
            return False
        m = d.message
        answered = self.calls.make(
            MACHINE_READ,
            lambda c: c.find_machines(lookup.odata_filter(), m.tenant_id),
            failures=m.failures,
            tenant=m.tenant_id,
        )
        outcome = answered.outcome
        if isinstance(outcome, Requeue):
            self.recorder.retry(d, outcome, "Device lookup")
            return False
        # For a GET, the "action" classify returns is simply the JSON body: {"value": [machines]}.
        chosen = choose(lookup, outcome.action) if isinstance(outcome, Succeeded) else outcome
        if isinstance(chosen, Failed):
            self.recorder.failed(d, chosen, "Device lookup")
            return False
        d.message = replace(m.resolved(chosen), read_slot_at=None)  # that read is spent
        self.recorder.change(
            d,
            AuditEvent(audit.RESOLVED, detail=f"{lookup.by} {lookup.value} is this machine"),
            machine_id=chosen,
        )
        log.info(
            "Device resolved: request %s %s=%s is machine %s", m.request_id, lookup.by, lookup.value, chosen
        )
        return True

    def _guard_machine(self, d: Delivery) -> bool:
        """A request resolved here also takes its machine's guard: one request per machine,
        however each named it."""
        m = d.message
        if m.resolved_from is None or m.slot_at is not None or m.prechecked:
            return True  # not resolved, or guarded on an earlier delivery
        where = machine_key(d.machine_id, m.tenant_id, m.dry_run)
        for _ in range(3):  # a guard that keeps moving belongs to live work: decided below
            outcome = self.guards.take(where, m.request_id, d.delivery_id)
            if not isinstance(outcome, Held) or outcome.guard.request_id == m.request_id:
                return True
            guard = outcome.guard
            other = self.store.get(guard.request_id)
            if other is None and guard.request_id:
                # No row yet: its acceptor may still be between the guard and the row. Wait out
                # the acceptance lease, then void the id, so that a slow acceptor can never
                # write it later (the intake's own take-over does the same).
                left = guard.lease_left(self.guards.now(), self.guards.lease)
                if left > 0:
                    waiting = f"request {guard.request_id}, still being accepted for the machine"
                    self.recorder.paced(d, math.ceil(left) + 1, waiting_for=waiting)
                    return False
                if not self.store.void(guard.request_id):
                    continue  # written after all: look again
            elif other is not None and not other.final:
                if self._same_caller(d, other):
                    named, duplicate_of = f"request {other.request_id}", other.request_id
                else:  # another principal's request: the intake would not show it either
                    named, duplicate_of = "another caller's request", None
                self.recorder.rejected(
                    d,
                    "DuplicateRequest",
                    f"machine {d.machine_id} already has {named} in progress; that one offboards it",
                    duplicate_of=duplicate_of,
                )
                return False
            # Its request is over (or was never written): the guard is ours to take.
            if self.guards.take_over(where, guard, m.request_id, d.delivery_id, None) is not None:
                return True
        raise StaleRecord(where[0])

    def _same_caller(self, d: Delivery, other: RequestRecord) -> bool:
        """Whether this request's caller may be told the other's id, as the intake decides it
        (Caller.may_see): both by one principal, or no principals at all. Read only on this rare
        path: the message carries no principal."""
        mine = d.record or self.store.get(d.request_id)
        return mine is not None and mine.principal == other.principal

    def _precheck(self, d: Delivery) -> bool:
        m = d.message
        if not self.guardrails.precheck or m.prechecked:
            return True
        if not self._read_slot(d):
            return False
        answered = self.calls.make(
            MACHINE_READ,
            lambda c: c.get_machine(d.machine_id, m.tenant_id),
            failures=m.failures,
            tenant=m.tenant_id,
        )
        outcome = answered.outcome
        if answered.response is not None and answered.response.status_code == 403:
            if self.guardrails.proceed_without_permission:
                log.warning(
                    "Precheck of machine %s not possible (403: grant Machine.Read.All); proceeding "
                    "without it as OFFBOARD_PRECHECK_WITHOUT_PERMISSION=proceed says",
                    d.machine_id,
                )
                return True
            self.recorder.rejected(
                d,
                "PrecheckNotPermitted",
                "the precheck could not read the machine (403): grant the app role Machine.Read.All, "
                "or set OFFBOARD_PRECHECK_WITHOUT_PERMISSION=proceed to offboard without it",
            )
            return False
        if isinstance(outcome, Requeue):
            self.recorder.retry(d, outcome, "Precheck")
            return False
        if isinstance(outcome, Failed):
            self.recorder.failed(d, outcome, "Precheck")
            return False
        refusal = verdict(outcome.action, self.guardrails.protection_for(m.tenant_id))
        if refusal is None:
            d.message = replace(m, prechecked=True, read_slot_at=None)
            return True
        if refusal.done:
            self.recorder.nothing_to_do(d, refusal.code, refusal.message)
        else:
            self.recorder.rejected(d, refusal.code, refusal.message)
        return False

    def _rehearse(self, d: Delivery) -> bool:
        if not d.message.dry_run:
            return True
        would_send = {
            "method": "POST",
            "path": self.calls.defender.offboard_path(d.machine_id),
            "body": {"Comment": d.message.comment},
        }
        self.recorder.dry_run(d, would_send)  # a rehearsal spends no offboard slot
        return False

    def _settle_doubt(self, d: Delivery) -> bool:
        """An earlier attempt may have reached Defender (its worker died mid-call, or the call
        timed out): look for the action it may have started before calling again, and follow
        it if there is one. Before the offboard slot, so a lookup that must wait spends none."""
        m = d.message
        if m.in_doubt_since is None or m.machine_id is None:
            return True  # no earlier call, or not even resolved yet: nothing can have been sent
        since = datetime.fromisoformat(m.in_doubt_since) - _CLOCK_SKEW
        found = self._find_action(d, since)
        if found is None:
            return False  # paced or retried: the lookup comes first, on the next delivery
        if found:
            log.warning("Request %s: following action %s an earlier delivery started", m.request_id, found)
            self._submitted(d, found, pending=False)
            return False
        d.message = replace(m, in_doubt_since=None)  # no such action: calling is safe
        return True

    def _slot(self, d: Delivery) -> bool:
        """The offboard's slot in the shared budget. The token first: a slot is a promise to
        call at that moment, and a first token request (hundreds of milliseconds) after taking
        it would make the call late. No token is classified by the call that needs it."""
        m = d.message
        self.calls.warm_up(m.tenant_id)
        slot = self.pacer.admit(OFFBOARD, m.slot_at, m.tenant_id)
        if slot is None:
            return True
        self.recorder.paced(d, self.pacer.requeue_delay(slot), slot_at=slot)
        return False

    def _claim(self, d: Delivery) -> bool:
        m = d.message
        d.claimed_at = self.clock().isoformat()
        claim = {
            "attempt": m.attempt,
            "claimed_by": d.delivery_id,
            "claimed_attempt": m.attempt,
            "claimed_at": d.claimed_at,
        }
        try:
            self.recorder.change(d, None, **claim)
        except StaleRecord:
            if not self._decide(d):
                return False
            looked = d.message.in_doubt_since is not None and d.message.machine_id is not None
            # A lookup made now took time since the slot: take the slot again (a late call
            # could be early on Defender's clock for a later one); the first is wasted.
            if not self._settle_doubt(d) or (looked and not self._slot(d)):
                return False
            try:
                self.recorder.change(d, None, **claim)
            except StaleRecord:
                self.recorder.duplicate(d, "another worker claimed it first")
                return False
        return True

    def _call(self, d: Delivery) -> bool:
        m = d.message
        answered = self.calls.make(
            OFFBOARD,
            lambda c: c.offboard(d.machine_id, m.comment, m.tenant_id),
            failures=m.failures,
            tenant=m.tenant_id,
        )
        outcome = answered.outcome
        if isinstance(outcome, Succeeded):
            action_id = outcome.action_id
            if outcome.already_pending:
                # Someone (a portal user, or our own earlier call whose answer was lost) already
                # started an offboard: follow that action, so this request still ends.
                action_id = self._find_action(d) or None
            self._submitted(d, action_id, pending=outcome.already_pending)
        elif isinstance(outcome, Requeue):
            if answered.may_have_acted:
                # Timed out, or a 5xx: the next attempt looks for an action before calling.
                d.message = replace(m, in_doubt_since=d.claimed_at)
            self.recorder.retry(d, outcome, "Offboard")
        else:
            self.recorder.failed(d, outcome, "Offboard")
        return False

    # ---- helpers ------------------------------------------------------------------------

    def _submitted(self, d: Delivery, action_id: str | None, pending: bool) -> None:
        note = NO_PENDING_ACTION if pending and action_id is None else None
        self.recorder.submitted(d, action_id, pending, note, self.follow_up.delay(1))
        if self.tagger is not None:
            self.tagger.add(d.machine_id, d.request_id, d.message.tenant_id)

    def _find_action(self, d: Delivery, since: datetime | None = None) -> str | None:
        """The offboard action to follow: its id; "" when there is none; None when the lookup
        could not be made now (the message was re-queued to make it later)."""
        m = d.message
        self.calls.warm_up(m.tenant_id)
        held = m.action_slot_at if since is not None else None  # the in-doubt lookup's, if it waited
        slot = self.pacer.admit(ACTION_READ, held, m.tenant_id)
        if slot is not None:
            if since is None:
                return ""  # the request ends with a note rather than overspend the budget
            self.recorder.paced(d, self.pacer.requeue_delay(slot), action_slot_at=slot)
            return None
        d.message = replace(d.message, action_slot_at=None)
        answered = self.calls.make(
            ACTION_READ,
            lambda c: c.find_offboard_actions(d.machine_id, m.tenant_id),
            failures=m.failures,
            tenant=m.tenant_id,
        )
        outcome = answered.outcome
        if isinstance(outcome, Succeeded):
            return pending_action(outcome.action, since) or ""
        if since is None:
            return ""  # following a pending action only: the request ends with a note instead
        # Not knowing whether the earlier attempt reached Defender, never call blindly: retry
        # the lookup (its failures count, so a permission never granted ends the request).
        if isinstance(outcome, Requeue):
            self.recorder.retry(d, outcome, "Action lookup")
        else:
            self.recorder.failed(d, outcome, "Action lookup")
        return None

    def _read_slot(self, d: Delivery) -> bool:
        """A read (lookup, precheck) spends its own budget; a far slot re-queues the request
        carrying that slot, so it is not taken again at the back of the line."""
        self.calls.warm_up(d.message.tenant_id)
        slot = self.pacer.admit(MACHINE_READ, d.message.read_slot_at, d.message.tenant_id)
        if slot is None:
            d.message = replace(d.message, read_slot_at=None)
            return True
        self.recorder.paced(d, self.pacer.requeue_delay(slot), read_slot_at=slot)
        return False

    def _decide(self, d: Delivery) -> bool:
        """Reads the row and decides whether this delivery may go on; notes, in the message,
        when an earlier delivery of this attempt may already have called Defender."""
        record = self.store.get(d.request_id) or self._adopt(d.message)
        why_not = None
        if record.status == Status.FAILED and record.claimed_by == d.delivery_id:
            # This very delivery failed the request but did not get to poison it.
            self.queue.poison(d.message, record.last_error_code or "Failed", record.last_error_message or "")
            why_not = "already failed; poisoned now"
        elif record.status not in NOT_SENT:
            why_not = f"already {record.status}"
        elif d.message.attempt < record.attempt:
            why_not = f"stale attempt {d.message.attempt}, the request is at attempt {record.attempt}"
        elif (
            record.claim_is_live(self.clock())
            and record.claimed_by != d.delivery_id
            and (record.claimed_attempt or 0) >= d.message.attempt
        ):
            why_not = "another worker is sending it now"
        if why_not is not None:
            self.recorder.duplicate(d, why_not)
            return False
        d.etag, d.record = record.etag, record
        if (
            record.claimed_at
            and record.claimed_attempt == d.message.attempt
            and d.message.in_doubt_since is None
        ):
            # Claimed for this attempt before: by this message on a delivery that died, or by a
            # worker whose claim lapsed. Either may have reached Defender.
            d.message = replace(d.message, in_doubt_since=record.claimed_at)
        if record.machine_id and d.message.machine_id is None and record.lookup:
            lookup = record.device_lookup()
            d.message = replace(d.message, machine_id=record.machine_id, lookup=None, resolved_from=lookup)
        return True

    def _adopt(self, message: OffboardMessage) -> RequestRecord:
        """A message with no state row (sent by hand, or by a version before state existed)."""
        record = RequestRecord(
            request_id=message.request_id,
            machine_id=message.machine_id,
            caller=message.caller,
            comment=message.comment,
            attempt=message.attempt,
            created_at=message.enqueued_at,
            tenant_id=message.tenant_id,
        )
        written, failed = self.store.accept([NewRequest(record, ())])
        if record.request_id in written:
            return written[record.request_id]
        existing = self.store.get(message.request_id)  # created meanwhile by another delivery
        if existing is None:
            raise failed[record.request_id]
        return existing


__all__ = ["NO_PENDING_ACTION", "FollowUpPolicy", "Guardrails", "OffboardFlow", "RetryKind"]
