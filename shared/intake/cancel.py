"""Cancelling a request: before it is sent, just mark it; once Defender has the action, ask
Defender to cancel it. A request that is final cannot be cancelled (409)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from ..adapters import audit
from ..adapters.audit import AuditTrail
from ..adapters.defender import DefenderClient
from ..adapters.request_store import NOT_SENT, TERMINAL, RequestRecord, RequestStore, StaleRecord
from ..domain.errors import DefenderCallError
from ..domain.outcome import error_of
from ..http.validate import BadRequest
from .submission import Answer

log = logging.getLogger(__name__)


@dataclass
class Cancellations:
    store: RequestStore
    audit: AuditTrail
    defender: DefenderClient

    def cancel(self, request_id: str, comment: str, caller: str) -> Answer:
        record = self.store.get(request_id)
        if record is None:
            raise BadRequest("RequestNotFound", f"no request {request_id}", 404)
        if record.status in TERMINAL:
            raise BadRequest("RequestFinished", f"the request is already {record.status}", 409)
        if record.status in NOT_SENT or record.status == "Held":
            return self._before_sending(record, caller)
        return self._in_defender(record, comment, caller)

    def _before_sending(self, record: RequestRecord, caller: str) -> Answer:
        busy = BadRequest(
            "RequestBeingSent", "the request is being sent to Defender right now; ask again in a minute", 409
        )
        if record.claim_is_live(datetime.now(UTC)):
            raise busy
        try:
            # The ETag makes this lose against a worker that claimed the row in between.
            record = self.store.update(record, status="Cancelled", next_attempt_at=None)
        except StaleRecord:
            raise busy from None
        self.store.unmark_held(record.request_id)
        return self._cancelled(record, caller, "cancelled before it was sent to Defender")

    def _in_defender(self, record: RequestRecord, comment: str, caller: str) -> Answer:
        if not record.action_id:
            raise BadRequest(
                "NoActionToCancel",
                "Defender reported an offboard already pending for this machine, but not its action id; "
                "cancel it in the Defender portal",
                409,
            )
        try:
            response = self.defender.cancel_action(record.action_id, comment)
        except DefenderCallError as exc:
            raise BadRequest("DefenderUnavailable", f"Defender could not be reached: {exc}", 502) from exc
        if response.status_code not in (200, 201):
            code, message = error_of(response)
            status = 409 if response.status_code in (400, 404) else 502
            raise BadRequest(
                code or f"Http{response.status_code}", message or "Defender refused to cancel", status
            )
        for _ in range(3):  # the follow-up may update the row at the same moment
            try:
                record = self.store.update(record, status="Cancelled", follow_up=None)
                break
            except StaleRecord:
                record = self.store.get(record.request_id) or record
        return self._cancelled(record, caller, f"action {record.action_id} cancelled in Defender")

    def _cancelled(self, record: RequestRecord, caller: str, detail: str) -> Answer:
        self.audit.record_request(
            audit.CANCELLED,
            record,
            caller=caller,
            detail=detail,
        )
        log.info("Request %s machine %s cancelled: %s", record.request_id, record.machine_id, detail)
        return Answer(200, record.public())
