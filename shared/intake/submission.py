"""Accepting offboard requests: guards, the breaker, the rows, the messages, the answers.

Every caller's payload becomes a batch of items (one for the single request form). For each
item, in this order:
1. its idempotency key, if any (guards.py): a key seen before gets its request's answer again;
2. its device's guard: a device with an unfinished request gets that request back (a
   playbook that fired twice), and a dry run never stands in for a real request;
3. the breaker (or the approval rule): admitted items are queued, the others held;
4. the rows: every item's state row and audit events, in as few transactions as fit (a held
   item's expiry message goes first, so no Held row is ever left without one);
5. the messages, the point of no return: the worker takes it from there.

A process may die at any line. Guards record when they were taken and are taken over once
their acceptor is gone (guards.py). A row written whose message was never sent is `Queued`
and untouched; it is healed, its message sent again, by the next request that finds it (a
retry, or any request for the same device) and by the reconciler timer for the rest
(reconcile.py); a duplicate message is harmless, because the worker's claim lets one
delivery call. In the normal case a single request costs four storage requests: the guard,
the breaker, the row with its events, the message.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from azure.core.exceptions import AzureError

from ..adapters.breaker import BlastRadiusBreaker
from ..adapters.guards import Guard, Guards, Held, key_key, machine_key
from ..adapters.queues import WorkQueue
from ..adapters.request_store import BatchItems, NewRequest, RequestStore, StaleRecord, WriteInDoubt
from ..adapters.retrying import Contended
from ..domain import audit, ids
from ..domain.errors import IdempotencyKeyReused, InvalidInput, Refusal, RequestConflict, ServiceUnavailable
from ..domain.messages import HoldExpiryMessage, NotifyMessage, OffboardMessage, utc_now_iso
from ..domain.offboard import Caller, OffboardRequest
from ..domain.records import AuditEvent, RequestRecord
from ..domain.statuses import Status

log = logging.getLogger(__name__)
_TAKE_OVER_TRIES = 3  # a guard that keeps changing under us is someone else's live work


@dataclass(frozen=True)
class Answer:
    status: int
    body: dict[str, Any]


@dataclass(frozen=True)
class Item:
    label: str
    request: OffboardRequest
    key: str | None = None  # the item's idempotency key


@dataclass(frozen=True)
class Hold:
    code: str
    message: str


@dataclass
class _Taking:
    """An item that holds its guards and is about to be written."""

    index: int
    item: Item
    request_id: str
    guards: list[tuple[tuple[str, str], str]] = field(default_factory=list)  # (where, etag)
    hold: Hold | None = None


@dataclass
class Submissions:
    store: RequestStore
    guards: Guards
    queue: WorkQueue
    breaker: BlastRadiusBreaker
    hold_expiry_seconds: int
    status_url: Callable[[str], str]
    dry_run: bool = False  # OFFBOARD_DRY_RUN: every request is a dry run
    approval: str = "breaker"  # "always": every real request is held for an operator
    allowed_tenants: frozenset[str] = frozenset()
    notify: bool = False  # OFFBOARD_HOLD_NOTIFY_URL is set: tell operators about holds
    clock: Callable[[], float] = time.time

    def submit(self, request: OffboardRequest, caller: Caller, key: str | None = None) -> Answer:
        """One request on its own (the watcher, tests): the answer, or its Refusal raised."""
        [answer] = self.accept([Item("request", request, key)], caller, batch=False)[1]
        if isinstance(answer, Refusal):
            raise answer
        return answer

    def accept(
        self, items: Sequence[Item], caller: Caller, *, batch: bool = True, payload_format: str = "native"
    ) -> tuple[str | None, list[Answer | Refusal]]:
        """Accepts every item it can; one answer (or refusal) per item, in order, and the
        batch id when the call was a batch (its status route follows every item)."""
        batch_id = ids.new_batch_id(self.clock())
        attempt = uuid.uuid4().hex
        answers: list[Answer | Refusal | None] = [None] * len(items)
        taking: list[_Taking] = []
        for index, item in enumerate(items):
            request_id = ids.request_id(batch_id, index + 1)
            try:
                found = self._take_guards(item, request_id, attempt, caller)
            except Refusal as exc:
                answers[index] = exc
                continue
            except AzureError:
                log.exception("Storage failed while accepting %s", item.label)
                answers[index] = _unavailable()
                continue
            if isinstance(found, Answer):
                answers[index] = found
            else:
                found.index = index
                taking.append(found)
        self._admit(taking)
        written = self._write(taking, caller, batch_id if batch else None, answers, items, payload_format)
        self._send(written, taking, answers)
        final = [a if a is not None else _unavailable() for a in answers]
        # A batch whose items all named existing requests (a replayed file) still gets its id:
        # its batch row lists them, so it is followed like any other.
        listed = batch and any(isinstance(a, Answer) and "requestId" in a.body for a in final)
        return (batch_id if listed else None), final

    # ---- 1-2: guards --------------------------------------------------------------------

    def _take_guards(self, item: Item, request_id: str, attempt: str, caller: Caller) -> _Taking | Answer:
        request = replace(item.request, dry_run=item.request.dry_run or self.dry_run)
        if request.tenant_id is not None and request.tenant_id not in self.allowed_tenants:
            raise InvalidInput(
                "TenantNotAllowed",
                f"tenant {request.tenant_id} is not one this service offboards in (OFFBOARD_TENANTS)",
            )
        taking = _Taking(0, replace(item, request=request), request_id)
        try:
            if item.key:
                replayed = self._take_key(taking, caller, attempt)
                if replayed is not None:
                    return replayed
            existing = self._take_machine(taking, caller, attempt)
        except BaseException:
            self._release(taking)
            raise
        if existing is not None:
            self._point_key_at(taking, existing)
            return existing
        return taking

    def _take_key(self, taking: _Taking, caller: Caller, attempt: str) -> Answer | None:
        assert taking.item.key is not None
        where = key_key(caller.scope, taking.item.key)
        fingerprint = taking.item.request.fingerprint
        for _ in range(_TAKE_OVER_TRIES):
            outcome = self.guards.take(where, taking.request_id, attempt, fingerprint)
            if not isinstance(outcome, Held):
                taking.guards.append((where, outcome.etag))
                return None
            found = outcome.guard
            if found.fingerprint is not None and found.fingerprint != fingerprint:
                raise IdempotencyKeyReused(
                    "IdempotencyKeyReused",
                    "this idempotency key was already used for a different request (device, comment, "
                    "dry run or tenant)",
                )
            if found.legacy_answer is not None:
                status, body = found.legacy_answer
                return Answer(status, {**body, "replayed": True})
            record = self.store.get(found.request_id) if found.request_id else None
            if record is not None:
                self._heal(record)
                return self._replay(record, found)
            if not found.expired(self.clock(), self.guards.lease):
                raise RequestConflict(
                    "IdempotentRequestInProgress",
                    "the first request with this idempotency key is still being accepted; ask again "
                    f"in {self.guards.lease:g} seconds",
                )
            if self._void(found):
                etag = self.guards.take_over(where, found, taking.request_id, attempt, fingerprint)
                if etag is not None:
                    log.warning("Idempotency key of unaccepted request %s taken over", found.request_id)
                    taking.guards.append((where, etag))
                    return None
        raise RequestConflict("IdempotentRequestInProgress", "this idempotency key keeps changing; ask again")

    def _take_machine(self, taking: _Taking, caller: Caller, attempt: str) -> Answer | None:
        request = taking.item.request
        where = machine_key(request.device_key, request.tenant_id, request.dry_run)
        for _ in range(_TAKE_OVER_TRIES):
            outcome = self.guards.take(where, taking.request_id, attempt)
            if not isinstance(outcome, Held):
                taking.guards.append((where, outcome.etag))
                return None
            found = outcome.guard
            record = self.store.get(found.request_id) if found.request_id else None
            if record is not None and not record.final:
                return self._existing(record, request, caller)
            if record is None and not found.expired(self.clock(), self.guards.lease):
                raise RequestConflict(
                    "RequestBeingAccepted",
                    "another request for this device is being accepted right now; ask again in a few seconds",
                )
            # The named request is over, or its acceptor died before writing it: ours now.
            if record is not None or self._void(found):
                etag = self.guards.take_over(where, found, taking.request_id, attempt, None)
                if etag is not None:
                    taking.guards.append((where, etag))
                    return None
        raise RequestConflict("RequestBeingAccepted", "this device's guard keeps changing; ask again")

    def _void(self, found: Guard) -> bool:
        """Makes sure the request a dead acceptor named can never be written later."""
        return not found.request_id or self.store.void(found.request_id)

    def _point_key_at(self, taking: _Taking, answer: Answer) -> None:
        """A key whose first use found an existing request answers with that one from now on."""
        for where, etag in taking.guards:  # only the key: the machine guard was someone else's
            self.guards.point(where, etag, str(answer.body["requestId"]), taking.item.request.fingerprint)

    def _release(self, taking: _Taking) -> None:
        for where, _ in taking.guards:
            try:
                self.guards.release(where, taking.request_id)
            except AzureError:
                log.warning("Could not release the guard %s; it lapses in %gs", where[0], self.guards.lease)

    # ---- 3: the breaker, or the approval rule -------------------------------------------

    def _admit(self, taking: list[_Taking]) -> None:
        real = [t for t in taking if not t.item.request.dry_run]  # rehearsals offboard nothing
        if self.approval == "always":
            for t in real:
                t.hold = Hold(
                    "ApprovalRequired",
                    "OFFBOARD_APPROVAL=always: every offboard waits for an operator; release it with "
                    "the master key (POST /api/offboard/{id}/release)",
                )
            return
        for tenant in {t.item.request.tenant_id for t in real}:
            group = [t for t in real if t.item.request.tenant_id == tenant]
            try:
                admission = self.breaker.admit(len(group), tenant)
            except (AzureError, Contended):  # unreadable, or changing under a mass event
                log.exception("The breaker could not be read; holding %d request(s)", len(group))
                admission = None
            admitted = admission.admitted if admission is not None else 0
            held = group[admitted:]
            if held:
                hold = self._breaker_hold(admission.count if admission else None, tenant, len(held))
                for t in held:
                    t.hold = hold

    def _breaker_hold(self, count: int | None, tenant: str | None, held: int) -> Hold:
        window = f"{self.breaker.window_seconds:g}s"
        counted = (
            f"{count} offboards accepted in the last {window}"
            if count is not None
            else "the breaker unreadable"
        )
        # An error, not a warning: this is the moment someone must look at what is happening.
        # One line per trip (per call and tenant), however many of its items it holds.
        log.error(
            "Blast-radius breaker tripped%s: %s (limit %d); %d request(s) held until an operator "
            "releases them",
            f" for tenant {tenant}" if tenant else "",
            counted,
            self.breaker.limit,
            held,
        )
        return Hold(
            "BreakerTripped",
            f"the blast-radius breaker holds it: {counted} (limit {self.breaker.limit}); an operator "
            "releases it with the master key (POST /api/offboard/{id}/release)",
        )

    # ---- 4: the rows --------------------------------------------------------------------

    def _write(
        self,
        taking: list[_Taking],
        caller: Caller,
        batch_id: str | None,
        answers: list[Answer | Refusal | None],
        items: Sequence[Item],
        payload_format: str,
    ) -> dict[str, RequestRecord]:
        now = utc_now_iso()
        new = []
        unqueued: set[str] = set()
        for t in taking:
            request = t.item.request
            hold = t.hold
            if hold and not self._queue_expiry(t, answers):
                unqueued.add(t.request_id)
                continue
            record = RequestRecord(
                request_id=t.request_id,
                machine_id=request.machine_id,
                caller=caller.label,
                comment=request.comment,
                status=Status.HELD if hold else Status.QUEUED,
                created_at=now,
                dry_run=request.dry_run,
                lookup=json.dumps(request.lookup.to_dict()) if request.lookup else None,
                tenant_id=request.tenant_id,
                principal=caller.principal,
                held_code=hold.code if hold else None,
                held_message=hold.message.replace("{id}", t.request_id) if hold else None,
            )
            received = AuditEvent(audit.RECEIVED, caller=caller.label)
            # A microsecond later, so the two events of one transaction keep their order.
            later = received.at + timedelta(microseconds=1)
            if hold:
                outcome = AuditEvent(audit.HELD, detail=record.held_message, caller=caller.label, at=later)
            else:
                outcome = AuditEvent(audit.QUEUED, caller=caller.label, at=later)
            new.append(NewRequest(record, (received, outcome)))
        listing = None
        if batch_id is not None:
            refs = []
            for index, item in enumerate(items):
                own = next((t for t in taking if t.index == index), None)
                answer = answers[index]
                if own is not None and own.request_id not in unqueued:
                    refs.append((item.label, own.request_id))
                elif isinstance(answer, Answer) and "requestId" in answer.body:
                    refs.append((item.label, str(answer.body["requestId"])))
            listing = BatchItems(batch_id, tuple(refs), caller.label, payload_format, now) if refs else None
        written, failed = self.store.accept(new, listing)
        for t in taking:
            if t.request_id in failed:
                log.error(
                    "Request %s for %s was not written: %s", t.request_id, t.item.label, failed[t.request_id]
                )
                if not isinstance(failed[t.request_id], WriteInDoubt):
                    self._release(t)  # certainly not written: the retry is a first try
                answers[t.index] = _unavailable()
        return written

    def _queue_expiry(self, taking: _Taking, answers: list[Answer | Refusal | None]) -> bool:
        """A held request's expiry is queued before its row: a Held row that a crash left
        without one would hold its device until someone released or cancelled it by id,
        while an expiry whose row never came finds nothing and is dropped."""
        try:
            self.queue.send(HoldExpiryMessage(taking.request_id), self.hold_expiry_seconds)
        except AzureError:
            log.exception("Request %s was not held: its expiry could not be queued", taking.request_id)
            self._release(taking)
            answers[taking.index] = _unavailable()
            return False
        return True

    # ---- 5: the messages ----------------------------------------------------------------

    def _send(
        self, written: dict[str, RequestRecord], taking: list[_Taking], answers: list[Answer | Refusal | None]
    ) -> None:
        held: list[str] = []
        for t in taking:
            record = written.get(t.request_id)
            if record is None:
                continue
            try:
                if record.status == Status.HELD:
                    held.append(record.request_id)  # its expiry went before its row
                else:
                    self.queue.send(message_for(record))
            except Exception:
                log.exception("Request %s was not queued", record.request_id)
                self._not_queued(record, t)
                answers[t.index] = _unavailable()
                continue
            answers[t.index] = Answer(202, self._accepted_body(record))
            log.info(
                "Request %s %s for %s", record.request_id, record.status.lower(), t.item.request.device_key
            )
        if held and self.notify:
            try:
                self.queue.send(NotifyMessage(tuple(held)))
            except AzureError:
                log.exception("Could not queue the notification of %d held request(s)", len(held))

    def _not_queued(self, record: RequestRecord, taking: _Taking) -> None:
        """Nothing was queued: say so on the request and free its guards, so the caller's
        retry is a first try."""
        try:
            self.store.update(
                record,
                AuditEvent(audit.FAILED, outcome="EnqueueFailed", detail="queue unavailable"),
                status=Status.FAILED,
                last_error_code="EnqueueFailed",
                last_error_message="queue unavailable",
            )
        except (AzureError, StaleRecord):
            # The row stays Queued without its message: the guards keep naming it, so the
            # next request for the device (or the reconciler) heals it rather than start a
            # second one beside it.
            log.exception("Could not mark request %s as not queued", record.request_id)
            return
        self._release(taking)

    # ---- answers ------------------------------------------------------------------------

    def _accepted_body(self, record: RequestRecord) -> dict[str, Any]:
        """The answer a request got when it was accepted (and gets again when replayed): the
        device as the caller named it, and the status it had then."""
        body: dict[str, Any] = {
            "requestId": record.request_id,
            **_device(record, as_named=True),
            "status": "Held" if record.held_code else "Queued",
            "statusUrl": self.status_url(record.request_id),
        }
        if record.tenant_id:
            body["tenantId"] = record.tenant_id
        if record.dry_run:
            body["dryRun"] = True
        if record.held_code:
            body["heldReason"] = {"code": record.held_code, "message": record.held_message}
            body["message"] = record.held_message
        return body

    def _existing(self, record: RequestRecord, request: OffboardRequest, caller: Caller) -> Answer:
        if not caller.may_see(record.principal):
            raise RequestConflict(
                "RequestByAnotherCaller",
                "another caller already has an unfinished request for this device; it is not shown to you",
            )
        self._heal(record)
        self.store.record_event(
            record,
            AuditEvent(
                audit.DUPLICATE,
                caller=caller.label,
                detail="another request for this machine arrived; nothing new was queued",
            ),
        )
        log.info("Device %s already has request %s; nothing queued", request.device_key, record.request_id)
        return Answer(
            202,
            {
                "requestId": record.request_id,
                **_device(record),
                "status": str(record.status),
                "statusUrl": self.status_url(record.request_id),
                "existingRequest": True,
                "message": "this machine already has a request in progress; its id is returned "
                "and nothing new was queued",
                **({"tenantId": record.tenant_id} if record.tenant_id else {}),
                **({"dryRun": True} if record.dry_run else {}),
            },
        )

    def _replay(self, record: RequestRecord, key: Guard) -> Answer:
        """The first answer this key got, again."""
        if key.pointed:
            body = {
                "requestId": record.request_id,
                **_device(record),
                "status": str(record.status),
                "statusUrl": self.status_url(record.request_id),
                "existingRequest": True,
            }
        else:
            body = self._accepted_body(record)
        return Answer(202, {**body, "replayed": True})

    # ---- healing ------------------------------------------------------------------------

    def _heal(self, record: RequestRecord) -> None:
        """A request accepted and never picked up, older than the acceptance lease, may have
        no message (its acceptor died after writing it): send it one. Conditional on the row,
        so two healers send one message between them."""
        heal(self.store, self.queue, record, self.clock(), self.guards.lease)


def heal(store: RequestStore, queue: WorkQueue, record: RequestRecord, now: float, lease: float) -> bool:
    """Sends a message for `record` if it looks stranded (see Submissions._heal)."""
    since = record.last_queued
    if not record.untouched() or not since or now - _epoch(since) < lease:
        return False
    try:
        healed = store.update(
            record,
            AuditEvent(audit.REQUEUED, detail="no worker had picked it up; its message was sent again"),
            queued_at=datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"),
        )
    except StaleRecord:
        return False  # someone touched it meanwhile: it is alive
    queue.send(message_for(healed))
    log.warning("Request %s was never picked up; its message was sent again", record.request_id)
    return True


def message_for(record: RequestRecord) -> OffboardMessage:
    """The offboard message that carries `record` to the worker."""
    return OffboardMessage(
        request_id=record.request_id,
        machine_id=record.machine_id,
        lookup=record.device_lookup() if record.machine_id is None else None,
        comment=record.comment,
        enqueued_at=utc_now_iso(),
        caller=record.caller,
        dry_run=record.dry_run,
        etag=record.etag,
        tenant_id=record.tenant_id,
    )


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def _device(record: RequestRecord, as_named: bool = False) -> dict[str, Any]:
    """How an answer names the device: the machine id, or null and the lookup to resolve
    (`as_named`: as the caller named it, even once the lookup has been resolved)."""
    if record.lookup and (as_named or record.machine_id is None):
        return {"machineId": None, "lookup": json.loads(record.lookup)}
    return {"machineId": record.machine_id}


def _unavailable() -> ServiceUnavailable:
    return ServiceUnavailable("StorageUnavailable", "storage is unavailable right now; try again")
