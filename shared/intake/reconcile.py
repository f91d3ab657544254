"""The reconciler (a timer function, every two minutes): a request whose row says Queued is
always backed by a message, even when nobody asks about it again.

Accepting writes the row, then sends the message; a process that dies between the two
leaves a Queued row that no worker will ever pick up. A later request for the same device,
or a retry with the same idempotency key, heals it at once (submission.heal). For the rest
this timer looks at the requests accepted in the last hour (older than the acceptance
lease, so an acceptor still at work is left alone) that no worker has touched, and sends
each a message; a duplicate message is harmless, because only one delivery can claim the
request. Each heal is conditional on the row, so two reconcilers running at once (the
Functions timer is a singleton, but a scale-out could overlap runs) send one message.
"""

from __future__ import annotations

import logging
import time

from ..adapters.queues import WorkQueue
from ..adapters.request_store import RequestStore
from ..domain.statuses import Status
from .holds import Holds
from .submission import heal

log = logging.getLogger(__name__)
WINDOW_SECONDS = 3600.0


def reconcile(
    store: RequestStore, queue: WorkQueue, lease: float, holds: Holds | None = None, now: float | None = None
) -> int:
    """Heals the stranded requests of the last hour, and those of releases that died between
    the row and the message (holds.py); how many it sent a message for."""
    now = time.time() if now is None else now
    healed = holds.reconcile_releases(now, lease) if holds is not None else 0
    for record in store.created_between(
        now - lease, now - WINDOW_SECONDS, {"status": str(Status.QUEUED), "attempt": 1}
    ):
        if heal(store, queue, record, now, lease):
            healed += 1
    if healed:
        log.warning("Reconciler: %d request(s) had no message and were sent one", healed)
    return healed
