"""The work queue and its poison queue, written the way the Functions host reads them.

The host decodes queue messages as base64 (host.json `messageEncoding`), so everything this
app sends goes through the SDK's base64 policies; a mismatch would poison every message.
`MemoryQueue` is the in-memory twin for fast tests: it keeps what was sent, with when each
message becomes visible, as the real queue does.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..domain.messages import Message
from ..domain.outcome import MAX_DELAY_SECONDS
from ..domain.records import utc_now_iso

if TYPE_CHECKING:
    from azure.storage.queue import QueueClient

    from ..storage_settings import StorageAccess

# Messages never expire on their own: a request that waits (throttling, a long outage)
# is delayed and re-sent, never silently dropped by the queue's default 7-day TTL.
NEVER_EXPIRE = -1


class Sink(Protocol):
    """Where a queue's messages go: an azure-storage-queue client, or its twin."""

    def send(self, text: str, delay_seconds: int) -> None: ...


class _QueueSink:
    def __init__(self, client: QueueClient) -> None:
        self._client = client
        self._created = False
        self._lock = threading.Lock()

    def send(self, text: str, delay_seconds: int) -> None:
        from azure.core.exceptions import ResourceNotFoundError

        try:
            self._send(text, delay_seconds)
        except ResourceNotFoundError:
            # Created on first use rather than at deployment, so a fresh account works.
            from azure.core.exceptions import ResourceExistsError

            with self._lock, contextlib.suppress(ResourceExistsError):
                self._client.create_queue()
            self._send(text, delay_seconds)

    def _send(self, text: str, delay_seconds: int) -> None:
        self._client.send_message(text, visibility_timeout=delay_seconds or None, time_to_live=NEVER_EXPIRE)


@dataclass(frozen=True)
class Sent:
    text: str
    visible_at: float

    def json(self) -> Any:
        return json.loads(self.text)


@dataclass
class MemoryQueue:
    """A queue in a list: `due()` hands out what has become visible, as a receive would."""

    clock: Any = time.time
    sent: list[Sent] = field(default_factory=list)
    fail_next: int = 0  # the next sends raise, as an unreachable queue does
    # ConnectionError stands for a process dying mid-step (nothing catches it); an AzureError
    # such as ServiceRequestError is what the SDK raises when the queue is unreachable.
    fail_with: type[Exception] = ConnectionError

    def send(self, text: str, delay_seconds: int) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise self.fail_with("queue unavailable (MemoryQueue.fail_next)")
        self.sent.append(Sent(text, self.clock() + delay_seconds))

    def due(self) -> list[Sent]:
        now = self.clock()
        ready = [m for m in self.sent if m.visible_at <= now]
        self.sent = [m for m in self.sent if m.visible_at > now]
        return ready

    def bodies(self) -> list[Any]:
        return [m.json() for m in self.sent]


class WorkQueue:
    """Sends offboard messages (now or delayed) and poison records with their reason."""

    def __init__(self, work: Sink, poison: Sink) -> None:
        self._work = work
        self._poison = poison

    @classmethod
    def from_storage(cls, storage: StorageAccess, name: str) -> WorkQueue:
        from .storage import queue_client

        return cls(
            _QueueSink(queue_client(storage, name)), _QueueSink(queue_client(storage, f"{name}-poison"))
        )

    def send(self, message: Message, delay_seconds: int = 0) -> None:
        self._work.send(message.to_json(), min(max(0, delay_seconds), MAX_DELAY_SECONDS))

    def poison(self, message: Message | str, code: str, reason: str, status: int | None = None) -> None:
        """Park a request that cannot succeed, with why, where an operator will look for it."""
        original: Any = json.loads(message.to_json()) if not isinstance(message, str) else message
        record = {
            "v": 1,
            "failedAt": utc_now_iso(),
            "reason": {"code": code, "message": reason, "status": status},
            "message": original,
        }
        self._poison.send(json.dumps(record, separators=(",", ":")), 0)
