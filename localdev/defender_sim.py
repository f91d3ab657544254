"""A loopback Defender for Endpoint API that speaks the real protocol.

It checks what the real service checks (bearer token, JSON content type, a `Comment`),
answers with a MachineAction, and can be scripted per machine to answer 429 with
Retry-After, Defender's 400 error codes, 401, 403, 404, 5xx, or to answer slowly. Every call
it receives is recorded, so tests assert on the exact request the worker sent.

It also serves `GET /api/machines?$filter=...` for device resolution: an exact `eq` on
`aadDeviceId` or `computerDnsName` (case-insensitive, as Defender compares them) over the
machines a test added with `add_machine` (duplicates allowed, for ambiguity). Any other
filter is refused with 400 as Defender refuses a malformed OData filter. `script(LOOKUP, ...)`
scripts the lookup's answers.
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
from urllib.parse import parse_qs, urlsplit

from .loopback import LoopbackServer, QuietHandler

_OFFBOARD = re.compile(r"/api/machines/([^/]+)/offboard")
_MACHINE_ID = re.compile(r"[0-9a-f]{40}")
# One comparison of a supported field with one OData string literal ('' is a quote inside).
_FILTER = re.compile(r"(aadDeviceId|computerDnsName) eq '((?:[^']|'')*)'")
LOOKUP = "GET /api/machines"  # the script key for device lookups


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
        self.machines: list[dict[str, Any]] = []
        super().__init__(_Handler, port)

    def add_machine(
        self, machine_id: str, computer_dns_name: str, aad_device_id: str | None = None, **fields: Any
    ) -> dict[str, Any]:
        """A machine `GET /api/machines` can find; the same name or AAD id twice is allowed."""
        machine = {
            "id": machine_id,
            "computerDnsName": computer_dns_name,
            "aadDeviceId": aad_device_id,
            "osPlatform": "Windows11",
            "healthStatus": "Active",
            "onboardingStatus": "Onboarded",
            **fields,
        }
        with self._lock:
            self.machines.append(machine)
        return machine

    def find(self, field: str, value: str) -> list[dict[str, Any]]:
        with self._lock:
            return [
                m
                for m in self.machines
                if isinstance(m.get(field), str) and m[field].lower() == value.lower()
            ]

    def lookup_calls(self) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.method == "GET" and urlsplit(c.path).path == "/api/machines"]

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
    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        sim = cast(DefenderSimulator, self.server.owner)  # type: ignore[attr-defined]
        sim.record(Call("GET", self.path, dict(self.headers.items()), b"", time.time()))
        parts = urlsplit(self.path)
        if parts.path != "/api/machines":
            return self._reply(Reply.error(404, "ResourceNotFound", f"no route {parts.path}"))
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or not sim.accept_token(auth.removeprefix("Bearer ")):
            return self._reply(Reply.error(401, "Unauthorized", "missing or invalid bearer token"))
        scripted = sim.next_scripted(LOOKUP)
        if scripted is not None:
            return self._reply(scripted)
        filters = parse_qs(parts.query).get("$filter", [])
        match = _FILTER.fullmatch(filters[0]) if len(filters) == 1 else None
        if not match:
            return self._reply(Reply.error(400, "InvalidInput", f"unsupported $filter {filters!r}"))
        field, literal = match.group(1), match.group(2).replace("''", "'")
        self._reply(Reply(200, {"@odata.context": "machines", "value": sim.find(field, literal)}))

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
