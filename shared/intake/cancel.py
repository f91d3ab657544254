"""Cancelling a request: before it is sent, just mark it; once Defender has the action, ask
Defender to cancel it. A request that is final cannot be cancelled (409). Who may cancel:
the principal that created it, or an operator (domain/offboard.py, `Caller.may_see`); the
master key alone when OFFBOARD_CANCEL=admin (function_app.py sets the route's level)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from ..adapters.defender import DefenderClient
from ..adapters.request_store import RequestStore, StaleRecord
from ..domain import audit
from ..domain.errors import DefenderCallError, DefenderUnavailable, RequestConflict, RequestNotFound
from ..domain.offboard import Caller
from ..domain.outcome import error_of
from ..domain.records import AuditEvent, RequestRecord
from ..domain.statuses import NOT_SENT, TERMINAL, Status
from .submission import Answer

log = logging.getLogger(__name__)


@dataclass
class Cancellations:
    store: RequestStore
    defender: DefenderClient

    def cancel(self, request_id: str, comment: str, caller: Caller) -> Answer:
        record = self.store.get(request_id)
        if record is None or not caller.may_see(record.principal):
            raise RequestNotFound("RequestNotFound", f"no request {request_id}")
        if record.status in TERMINAL:
            raise RequestConflict("RequestFinished", f"the request is already {record.status}")
        if record.status in NOT_SENT or record.status == Status.HELD:
            return self._before_sending(record, caller)
        return self._in_defender(record, comment, caller)

    def _before_sending(self, record: RequestRecord, caller: Caller) -> Answer:
        busy = RequestConflict(
            "RequestBeingSent", "the request is being sent to Defender right now; ask again in a minute"
        )
        if record.claim_is_live(datetime.now(UTC)):
            raise busy
        try:
            # The ETag makes this lose against a worker that claimed the row in between.
            record = self.store.update(
                record,
                AuditEvent(
                    audit.CANCELLED, caller=caller.label, detail="cancelled before it was sent to Defender"
                ),
                status=Status.CANCELLED,
                next_attempt_at=None,
            )
        except StaleRecord:
            raise busy from None
        return self._cancelled(record, "cancelled before it was sent to Defender")

    def _in_defender(self, record: RequestRecord, comment: str, caller: Caller) -> Answer:
        if not record.action_id:
            raise RequestConflict(
                "NoActionToCancel",
                "Defender reported an offboard already pending for this machine, but not its action id; "
                "cancel it in the Defender portal",
            )
        try:
            response = self.defender.cancel_action(record.action_id, comment, record.tenant_id)
        except DefenderCallError as exc:
            raise DefenderUnavailable("DefenderUnavailable", f"Defender could not be reached: {exc}") from exc
        if response.status_code not in (200, 201):
            code, message = error_of(response)
            kind = RequestConflict if response.status_code in (400, 404) else DefenderUnavailable
            raise kind(code or f"Http{response.status_code}", message or "Defender refused to cancel")
        detail = f"action {record.action_id} cancelled in Defender"
        for _ in range(3):  # the follow-up may update the row at the same moment
            try:
                record = self.store.update(
                    record,
                    AuditEvent(audit.CANCELLED, caller=caller.label, detail=detail),
                    status=Status.CANCELLED,
                    follow_up=None,
                )
                break
            except StaleRecord:
                record = self.store.get(record.request_id) or record
        return self._cancelled(record, detail)

    def _cancelled(self, record: RequestRecord, detail: str) -> Answer:
        log.info("Request %s machine %s cancelled: %s", record.request_id, record.machine_id, detail)
        return Answer(200, record.public())
