"""Accepting a validated offboard request: state row, audit, queue, and the answer.

Two guards stop one intent from becoming two destructive calls before anything is queued:
a machine that already has an unfinished request gets that request back (a playbook that
fired twice), and a replayed idempotency key gets the answer it got the first time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from azure.core.exceptions import AzureError

from ..adapters import audit
from ..adapters.audit import AuditTrail
from ..adapters.breaker import BlastRadiusBreaker
from ..adapters.queues import WorkQueue
from ..adapters.request_store import RequestRecord, RequestStore, StaleRecord
from ..domain.messages import HoldExpiryMessage, OffboardMessage, utc_now_iso
from ..http.validate import BadRequest, OffboardRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Answer:
    status: int
    body: dict[str, Any]


@dataclass
class Submissions:
    store: RequestStore
    audit: AuditTrail
    queue: WorkQueue
    breaker: BlastRadiusBreaker
    hold_expiry_seconds: int
    dry_run: bool = False  # OFFBOARD_DRY_RUN: every request is a dry run

    def submit(
        self,
        request: OffboardRequest,
        caller: str,
        status_url: Callable[[str], str],
        idempotency_key: str | None = None,
    ) -> Answer:
        if not idempotency_key:
            return self._submit(request, caller, status_url)
        if not self.store.reserve_key(idempotency_key, request.fingerprint):
            return self._replay(idempotency_key, request)
        try:
            answer = self._submit(request, caller, status_url)
        except BaseException:
            # Nothing was accepted: free the key so the caller's retry is a first try.
            with contextlib.suppress(AzureError):
                self.store.forget_key(idempotency_key)
            raise
        self.store.remember_answer(idempotency_key, request.fingerprint, answer.status, answer.body)
        return answer

    def _replay(self, key: str, request: OffboardRequest) -> Answer:
        remembered = self.store.recall_answer(key)
        in_progress = BadRequest(
            "IdempotentRequestInProgress",
            "the first request with this idempotency key is still being accepted; ask again",
            409,
        )
        if remembered is None:
            raise in_progress  # the first one failed and freed the key a moment ago
        fingerprint, status, body = remembered
        if fingerprint != request.fingerprint:
            raise BadRequest(
                "IdempotencyKeyReused",
                "this idempotency key was already used for a different request (machine or comment)",
                422,
            )
        if status == 0:
            raise in_progress
        return Answer(status, {**body, "replayed": True})

    def _submit(self, request: OffboardRequest, caller: str, status_url: Callable[[str], str]) -> Answer:
        request_id = str(uuid.uuid4())
        existing_id = self.store.claim_machine(request.device_key, request_id)
        if existing_id:
            existing = self.store.get(existing_id)
            self.audit.record(
                audit.DUPLICATE,
                request_id=existing_id,
                machine_id=request.machine_id,
                caller=caller,
                detail="another request for this machine arrived; nothing new was queued",
            )
            log.info("Device %s already has request %s; nothing queued", request.device_key, existing_id)
            return Answer(
                202,
                {
                    "requestId": existing_id,
                    **_device(request),
                    "status": existing.status if existing else "Queued",
                    "statusUrl": status_url(existing_id),
                    "existingRequest": True,
                    "message": "this machine already has a request in progress; its id is returned "
                    "and nothing new was queued",
                },
            )
        now = utc_now_iso()
        dry_run = request.dry_run or self.dry_run
        # Dry runs offboard nothing, so they do not count towards the breaker.
        admission = None if dry_run else self.breaker.admit()
        held = admission is not None and not admission.admitted
        record = self.store.create(
            RequestRecord(
                request_id=request_id,
                machine_id=request.machine_id,
                caller=caller,
                comment=request.comment,
                created_at=now,
                status="Held" if held else "Queued",
                dry_run=dry_run,
                lookup=json.dumps(request.lookup.to_dict()) if request.lookup else None,
            )
        )
        self.audit.try_record(
            audit.RECEIVED, request_id=request_id, machine_id=request.machine_id, caller=caller
        )
        if held:
            assert admission is not None
            return self._hold(record, admission.count, status_url)
        message = OffboardMessage(
            request_id=request_id,
            machine_id=request.machine_id,
            comment=request.comment,
            enqueued_at=now,
            caller=caller,
            dry_run=dry_run,
            lookup=request.lookup,
        )
        try:
            self.queue.send(message)
        except Exception:
            # Nothing was queued: say so on the request and free the machine, then let the
            # caller see a 500 and retry.
            try:
                self.store.update(
                    record,
                    status="Failed",
                    last_error_code="EnqueueFailed",
                    last_error_message="queue unavailable",
                )
                self.store.release_machine(request.device_key, request_id)
            except (AzureError, StaleRecord):
                log.exception("Could not mark request %s as not queued", request_id)
            raise
        self.audit.try_record(
            audit.QUEUED, request_id=request_id, machine_id=request.machine_id, caller=caller
        )
        log.info("Offboard request %s queued for %s", request_id, request.device_key)
        body = {
            "requestId": request_id,
            **_device(request),
            "status": "Queued",
            "statusUrl": status_url(request_id),
        }
        return Answer(202, {**body, "dryRun": True} if dry_run else body)

    def _hold(self, record: RequestRecord, count: int, status_url: Callable[[str], str]) -> Answer:
        window = f"{self.breaker.window_seconds:g}s"
        # An error, not a warning: this is the moment someone must look at what is happening.
        log.error(
            "Blast-radius breaker tripped: %d offboards accepted in the last %s (limit %d); request %s "
            "for machine %s is held until an operator releases it",
            count,
            window,
            self.breaker.limit,
            record.request_id,
            record.machine_id,
        )
        self.store.mark_held(record.request_id)
        self.queue.send(HoldExpiryMessage(record.request_id), self.hold_expiry_seconds)
        detail = f"breaker: {count} offboards accepted in the last {window} (limit {self.breaker.limit})"
        self.audit.record_request(
            audit.HELD,
            record,
            caller=record.caller,
            detail=detail,
        )
        return Answer(
            202,
            {
                "requestId": record.request_id,
                "machineId": record.machine_id,
                **({"lookup": json.loads(record.lookup)} if record.lookup else {}),
                "status": "Held",
                "statusUrl": status_url(record.request_id),
                "message": f"held by the blast-radius breaker ({detail}); an operator must release it",
            },
        )


def _device(request: OffboardRequest) -> dict[str, Any]:
    """How the answer names the device: the machine id, or null and the lookup to resolve."""
    if request.lookup is not None:
        return {"machineId": None, "lookup": request.lookup.to_dict()}
    return {"machineId": request.machine_id}
