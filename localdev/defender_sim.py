"""A loopback Defender for Endpoint API that speaks the real protocol.

It checks what the real service checks (bearer token, JSON content type, a `Comment`),
answers with a MachineAction, and can be scripted per machine to answer 429 with
Retry-After, Defender's 400 error codes, 401, 403, 404, 5xx, or to answer slowly. Every call
it receives is recorded, so tests assert on the exact request the worker sent.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

from .loopback import LoopbackServer, QuietHandler

_OFFBOARD = re.compile(r"/api/machines/([^/]+)/offboard")
_MACHINE_ID = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class Reply:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_seconds: float = 0.0

    @classmethod
    def error(cls, status: int, code: str, message: str = "", **headers: str) -> Reply:
        return cls(
            status,
            {"error": {"code": code, "message": message or code, "target": str(uuid.uuid4())}},
            headers,
        )


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    def json(self) -> Any:
        return json.loads(self.body)


class DefenderSimulator(LoopbackServer):
    def __init__(self, port: int = 0, accept_token: Callable[[str], bool] | None = None) -> None:
        self.calls: list[Call] = []
        self.accept_token = accept_token or (lambda token: bool(token))
        self._scripts: dict[str, deque[Reply]] = defaultdict(deque)
        self._lock = threading.Lock()
        super().__init__(_Handler, port)

    def script(self, machine_id: str, *replies: Reply) -> None:
        """Answer the next calls for `machine_id` with `replies`, in order, then normally."""
        with self._lock:
            self._scripts[machine_id].extend(replies)

    def offboard_calls(self, machine_id: str | None = None) -> list[Call]:
        with self._lock:
            return [
                c
                for c in self.calls
                if (m := _OFFBOARD.fullmatch(c.path)) and (machine_id is None or m.group(1) == machine_id)
            ]

    def wait_for_calls(self, count: int, machine_id: str | None = None, timeout: float = 20.0) -> list[Call]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            calls = self.offboard_calls(machine_id)
            if len(calls) >= count:
                return calls
            time.sleep(0.05)
        raise TimeoutError(f"expected {count} offboard calls, saw {len(self.offboard_calls(machine_id))}")

    def record(self, call: Call) -> None:
        with self._lock:
            self.calls.append(call)

    def next_scripted(self, machine_id: str) -> Reply | None:
        with self._lock:
            queue = self._scripts.get(machine_id)
            return queue.popleft() if queue else None


def machine_action(machine_id: str, comment: str) -> dict[str, Any]:
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    return {
        "id": str(uuid.uuid4()),
        "type": "Offboard",
        "scope": None,
        "requestor": "offboard-app@contoso.example",
        "requestorComment": comment,
        "status": "Pending",
        "machineId": machine_id,
        "computerDnsName": f"host-{machine_id[:8]}.contoso.example",
        "creationDateTimeUtc": now,
        "lastUpdateDateTimeUtc": now,
        "cancellationRequestor": None,
        "cancellationComment": None,
        "cancellationDateTimeUtc": None,
        "errorHResult": 0,
        "title": None,
        "relatedFileInfo": None,
        "troubleshootInfo": None,
        "commands": [],
        "externalId": None,
        "requestSource": "PublicApi",
    }


class _Handler(QuietHandler):
    def do_POST(self) -> None:  # noqa: N802 - http.server naming
        sim = cast(DefenderSimulator, self.server.owner)  # type: ignore[attr-defined]
        body = self.read_body()
        sim.record(Call("POST", self.path, dict(self.headers.items()), body, time.time()))
        match = _OFFBOARD.fullmatch(self.path)
        if not match:
            return self._reply(Reply.error(404, "ResourceNotFound", f"no route {self.path}"))
        machine_id = match.group(1)
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or not sim.accept_token(auth.removeprefix("Bearer ")):
            return self._reply(Reply.error(401, "Unauthorized", "missing or invalid bearer token"))
        scripted = sim.next_scripted(machine_id)
        if scripted is not None:
            return self._reply(scripted)
        if self.headers.get_content_type() != "application/json":
            return self._reply(
                Reply.error(415, "UnsupportedMediaType", "Content-Type must be application/json")
            )
        try:
            comment = json.loads(body)["Comment"]
        except (ValueError, KeyError, TypeError):
            comment = None
        if not isinstance(comment, str):
            return self._reply(Reply.error(400, "InvalidRequestBody", "Comment is required"))
        if not _MACHINE_ID.fullmatch(machine_id):
            return self._reply(Reply.error(404, "NotFound", f"Machine {machine_id} was not found"))
        self._reply(Reply(201, machine_action(machine_id, comment)))

    def _reply(self, reply: Reply) -> None:
        if reply.delay_seconds:
            time.sleep(reply.delay_seconds)
        try:
            if reply.body is None:
                self.send(reply.status, b"", reply.headers)
            else:
                self.send_json(reply.status, reply.body, reply.headers)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up waiting, as a timing-out client does
