"""A loopback Defender for Endpoint API that speaks the real protocol.

It checks what the real service checks (bearer token, JSON content type, a `Comment`),
answers with a MachineAction, and can be scripted per machine to answer 429 with
Retry-After, Defender's 400 error codes, 401, 403, 404, 5xx, or to answer slowly. Every call
it receives is recorded, so tests assert on the exact request the worker sent.

It also enforces Defender's rate limits as sliding windows per operation (by default 100
calls a minute and 1,500 an hour each for offboard, machine reads and action reads): a call
that would make any window hold more than its limit is answered 429 with Retry-After (whole
seconds until a call would be admitted). Every authenticated call counts, the refused ones
too. `time_scale` shrinks the windows (60 makes an hour pass in a minute) for benchmarks.
"""

from __future__ import annotations

import json
import math
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
# Defender's documented limits, per application and tenant: (calls, window in seconds).
DEFENDER_RATE_LIMITS: dict[str, tuple[tuple[int, float], ...]] = {
    "offboard": ((100, 60.0), (1500, 3600.0)),
    "machine-read": ((100, 60.0), (1500, 3600.0)),
    "action-read": ((100, 60.0), (1500, 3600.0)),
}


def operation_of(method: str, path: str) -> str | None:
    """Which rate-limit budget a call spends, keyed like the app's `RateLimiter`."""
    route = path.split("?", 1)[0]
    if method == "POST" and _OFFBOARD.fullmatch(route):
        return "offboard"
    if method == "GET" and route.startswith("/api/machineactions"):
        return "action-read"
    if method == "GET" and route.startswith("/api/machines"):
        return "machine-read"
    return None


class SlidingWindows:
    """Counts calls in sliding windows `(t - seconds, t]`, as a per-operation budget."""

    def __init__(self, limits: tuple[tuple[int, float], ...], time_scale: float = 1.0) -> None:
        self.limits = tuple((calls, seconds / time_scale) for calls, seconds in limits)
        self._times: deque[float] = deque()
        self._longest = max((seconds for _, seconds in self.limits), default=0.0)

    def admit(self, now: float) -> float | None:
        """Counts a call at `now`; None if admitted, else seconds until one would be."""
        while self._times and self._times[0] <= now - self._longest:
            self._times.popleft()
        over = any(
            sum(1 for t in self._times if t > now - seconds) >= calls for calls, seconds in self.limits
        )
        self._times.append(now)
        if not over:
            return None
        # A call at t is admitted once the `calls`-th most recent one is at least a window old.
        return max(
            self._times[-calls] + seconds - now for calls, seconds in self.limits if len(self._times) >= calls
        )


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
    def __init__(
        self,
        port: int = 0,
        accept_token: Callable[[str], bool] | None = None,
        *,
        rate_limits: dict[str, tuple[tuple[int, float], ...]] | None = None,
        time_scale: float = 1.0,
    ) -> None:
        self.calls: list[Call] = []
        self.throttled: list[Call] = []  # calls answered 429 by the rate limits
        self.accept_token = accept_token or (lambda token: bool(token))
        self._scripts: dict[str, deque[Reply]] = defaultdict(deque)
        self._lock = threading.Lock()
        limits = DEFENDER_RATE_LIMITS if rate_limits is None else rate_limits
        self._budgets = {op: SlidingWindows(windows, time_scale) for op, windows in limits.items()}
        super().__init__(_Handler, port)

    def throttle(self, call: Call) -> Reply | None:
        """A 429 if `call` exceeds its operation's limits, else None. Counts the call."""
        budget = self._budgets.get(operation_of(call.method, call.path) or "")
        if budget is None:
            return None
        with self._lock:
            wait = budget.admit(call.at)
            if wait is None:
                return None
            self.throttled.append(call)
        return Reply.error(
            429,
            "TooManyRequests",
            "Rate limit is exceeded. Try again later.",
            **{"Retry-After": str(max(1, math.ceil(wait)))},
        )

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
        call = Call("POST", self.path, dict(self.headers.items()), body, time.time())
        sim.record(call)
        match = _OFFBOARD.fullmatch(self.path)
        if not match:
            return self._reply(Reply.error(404, "ResourceNotFound", f"no route {self.path}"))
        machine_id = match.group(1)
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or not sim.accept_token(auth.removeprefix("Bearer ")):
            return self._reply(Reply.error(401, "Unauthorized", "missing or invalid bearer token"))
        throttled = sim.throttle(call)
        if throttled is not None:
            return self._reply(throttled)
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
