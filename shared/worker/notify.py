"""Telling operators that requests are held (OFFBOARD_HOLD_NOTIFY_URL): one POST per call
that held something, with who asked, which devices and why, and how to release them. Never
a key or token. The URL itself is a secret (a Logic App or Teams workflow trigger URL carries
its signature), so it is never logged. A notification that fails is tried twice more and then
dropped with a log line: it never blocks or fails a request.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from ..adapters.queues import WorkQueue
from ..adapters.request_store import RequestStore
from ..adapters.webhook import Webhook
from ..domain.messages import NotifyMessage
from ..domain.statuses import Status

log = logging.getLogger("shared.worker")
_ATTEMPTS = 3
_BACKOFF_SECONDS = (30, 120)


@dataclass
class Notifier:
    webhook: Webhook
    store: RequestStore
    queue: WorkQueue
    status_url: Callable[[str], str | None]

    def handle(self, message: NotifyMessage) -> None:
        held = [
            r
            for r in (self.store.get(i) for i in message.request_ids)
            if r is not None and r.status == Status.HELD
        ]
        if not held:
            return  # released, cancelled or expired meanwhile: nobody needs telling
        requests_held: list[dict[str, Any]] = []
        for record in held:
            view = {
                "requestId": record.request_id,
                "machineId": record.machine_id,
                "caller": record.caller,
                "comment": record.comment,
                "reason": {"code": record.held_code, "message": record.held_message},
            }
            if record.lookup:
                view["lookup"] = record.public()["lookup"]
            if record.tenant_id:
                view["tenantId"] = record.tenant_id
            if (url := self.status_url(record.request_id)) is not None:
                view["statusUrl"] = url
            requests_held.append(view)
        codes = sorted({r.held_code or "" for r in held})
        body = {
            "event": "OffboardRequestsHeld",
            "text": f"{len(held)} offboard request(s) held ({', '.join(codes)}) and waiting for an operator",
            "release": "POST /api/offboard/{requestId}/release (one) or "
            "POST /api/offboard/held/release (all), with the master key",
            "requests": requests_held,
        }
        problem = self.webhook.post(body)
        if problem is None:
            log.info("Told operators of %d held request(s)", len(held))
            return
        if message.attempt < _ATTEMPTS:
            log.warning("The hold notification %s; trying again", problem)
            self.queue.send(
                replace(message, attempt=message.attempt + 1), _BACKOFF_SECONDS[message.attempt - 1]
            )
        else:
            log.error(
                "The hold notification %s %d times; dropped (the requests stay held)", problem, _ATTEMPTS
            )
