"""The work queue and its poison queue, written the way the Functions host reads them.

The host decodes queue messages as base64 (host.json `messageEncoding`), so everything this
app sends goes through the SDK's base64 policies; a mismatch would poison every message.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from typing import Any

from azure.core.exceptions import ResourceExistsError
from azure.storage.queue import QueueClient

from ..domain.messages import Message, utc_now_iso
from ..domain.outcome import MAX_DELAY_SECONDS
from .storage import StorageAccess, queue_client

log = logging.getLogger(__name__)

# Messages never expire on their own: a request that waits (throttling, a long outage)
# is delayed and re-sent, never silently dropped by the queue's default 7-day TTL.
NEVER_EXPIRE = -1


class WorkQueue:
    """Sends offboard messages (now or delayed) and poison records with their reason."""

    def __init__(self, work: QueueClient, poison: QueueClient) -> None:
        self._work = work
        self._poison = poison
        self._created: set[str] = set()
        self._lock = threading.Lock()

    @classmethod
    def from_storage(cls, storage: StorageAccess, name: str) -> WorkQueue:
        return cls(queue_client(storage, name), queue_client(storage, f"{name}-poison"))

    def send(self, message: Message, delay_seconds: int = 0) -> None:
        delay = min(max(0, delay_seconds), MAX_DELAY_SECONDS)
        self._ensure(self._work)
        self._work.send_message(
            message.to_json(), visibility_timeout=delay or None, time_to_live=NEVER_EXPIRE
        )

    def poison(self, message: Message | str, code: str, reason: str, status: int | None = None) -> None:
        """Park a request that cannot succeed, with why, where an operator will look for it."""
        original: Any = json.loads(message.to_json()) if not isinstance(message, str) else message
        record = {
            "v": 1,
            "failedAt": utc_now_iso(),
            "reason": {"code": code, "message": reason, "status": status},
            "message": original,
        }
        self._ensure(self._poison)
        self._poison.send_message(json.dumps(record, separators=(",", ":")), time_to_live=NEVER_EXPIRE)

    def _ensure(self, client: QueueClient) -> None:
        # Created on first use rather than at deployment, so a fresh storage account works.
        if client.queue_name in self._created:
            return
        with self._lock:
            with contextlib.suppress(ResourceExistsError):
                client.create_queue()
            self._created.add(client.queue_name)
