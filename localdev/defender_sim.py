"""A loopback Defender for Endpoint API that speaks the real protocol.

It checks what the real service checks (bearer token, JSON content type, a `Comment`),
answers with a MachineAction, and can be scripted per machine to answer 429 with
Retry-After, Defender's 400 error codes, 401, 403, 404, 5xx, or to answer slowly. Every call
it receives is recorded, so tests assert on the exact request the worker sent.

Machines: it starts with the fleet in `localdev.fleet.FLEET` (one machine per path of the
app: supported and unsupported platforms, a protected device, two records sharing a name),
and `add_machine` describes more or changes one. As Defender does, an id it does not know
answers 404 `NotFound` (reading the machine, offboarding it, tagging it). With
`accept_any=True`, any other well-formed id is an onboarded Windows 11 PC instead, for load
tests and benchmarks that post random ids; the fleet and `add_machine` still apply.

It also serves `GET /api/machines?$filter=...` for device resolution: an exact `eq` on
`aadDeviceId` or `computerDnsName` (case-insensitive, as Defender compares them) over the
fleet and the machines added with `add_machine` (duplicates allowed, for ambiguity). Any
other filter is refused with 400 as Defender refuses a malformed OData filter.
`script(LOOKUP, ...)` scripts the lookup's answers. Tags: `POST /api/machines/{id}/tags` and
`POST /api/machines/AddOrRemoveTagForMultipleMachines` (at most 500 ids; ids it does not
know are left out of the answer).

It also enforces Defender's rate limits as sliding windows per operation (by default 100
calls a minute and 1,500 an hour each for offboard, machine reads, action reads and tags):
a call that would make any window hold more than its limit is answered 429 with Retry-After
(whole seconds until a call would be admitted). Every authenticated call counts, the refused
ones too. `time_scale` shrinks the windows (60 makes an hour pass in a minute) for
benchmarks. Defender's limits are per application and tenant: with `tenant_of` (bearer token
-> tenant id) each tenant has its own budgets, and each recorded call carries its tenant.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

from .fleet import FLEET as FLEET  # re-exported: the machines every simulator starts with
from .loopback import LoopbackServer, QuietHandler

_OFFBOARD = re.compile(r"/api/machines/([^/]+)/offboard")
_ACTION = re.compile(r"/api/machineactions/([^/]+)(/cancel)?")
_MACHINE = re.compile(r"/api/machines/([^/?]+)")
_TAGS = re.compile(r"/api/machines/([^/]+)/tags")
_BULK_TAGS = "/api/machines/AddOrRemoveTagForMultipleMachines"
MAX_BULK_TAG_MACHINES = 500  # Defender's documented limit per call
_MACHINE_ID = re.compile(r"[0-9a-f]{40}")
# One comparison of a supported field with one OData string literal ('' is a quote inside).
_FILTER = re.compile(r"(aadDeviceId|computerDnsName) eq '((?:[^']|'')*)'")
LOOKUP = "GET /api/machines"  # the script key for device lookups
ACTION_LOOKUP = "GET /api/machineactions"  # the script key for finding a machine's actions
BULK_TAGS = f"POST {_BULK_TAGS}"  # the script key for bulk tagging
_ACTION_FILTER = re.compile(r"machineId eq '([0-9a-f]{40})' and type eq 'Offboard'")
# Defender's documented limits, per application and tenant: (calls, window in seconds).
DEFENDER_RATE_LIMITS: dict[str, tuple[tuple[int, float], ...]] = {
    "offboard": ((100, 60.0), (1500, 3600.0)),
    "machine-read": ((100, 60.0), (1500, 3600.0)),
    "action-read": ((100, 60.0), (1500, 3600.0)),
    "machine-tag": ((100, 60.0), (1500, 3600.0)),
}


def operation_of(method: str, path: str) -> str | None:
    """Which rate-limit budget a call spends, keyed like the app's `RateLimiter`."""
    route = path.split("?", 1)[0]
    if method == "POST" and _OFFBOARD.fullmatch(route):
        return "offboard"
    if method == "POST" and (route == _BULK_TAGS or _TAGS.fullmatch(route)):
        return "machine-tag"
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
    tenant: str | None = None  # from `tenant_of`, when the simulator was given one

    def json(self) -> Any:
        return json.loads(self.body)


class DefenderSimulator(LoopbackServer):
    def __init__(
        self,
        port: int = 0,
        accept_token: Callable[[str], bool] | None = None,
        *,
        rate_limits: Mapping[str, tuple[tuple[int, float], ...]] | None = None,
        time_scale: float = 1.0,
        accept_any: bool = False,
        tenant_of: Callable[[str], str | None] | None = None,
    ) -> None:
        self.calls: list[Call] = []
        self.throttled: list[Call] = []  # calls answered 429 by the rate limits
        self.accept_token = accept_token or (lambda token: bool(token))
        self.accept_any = accept_any
        self.tenant_of = tenant_of
        self._scripts: dict[str, deque[Reply]] = defaultdict(deque)
        self._lock = threading.Lock()
        # Statuses successive reads of a MachineAction return; the last one repeats.
        self.action_progression: list[str] = ["Pending", "InProgress", "Succeeded"]
        self.actions: dict[str, dict[str, Any]] = {}
        self.machines: dict[str, dict[str, Any]] = {m.id: m.entity() for m in FLEET}
        # The offboard API's standing refusal of a machine (OsPlatformNotSupported), by id.
        self.refusals: dict[str, str] = {m.id: m.refusal for m in FLEET if m.refusal}
        self._action_reads: dict[str, int] = defaultdict(int)
        self._limits = DEFENDER_RATE_LIMITS if rate_limits is None else rate_limits
        self._time_scale = time_scale
        # Keyed by (tenant, operation); the tenant is None without `tenant_of`: one budget
        # per operation, as for a single application in a single tenant.
        self._budgets: dict[tuple[str | None, str], SlidingWindows] = {}
        super().__init__(_Handler, port)

    def tenant_for(self, authorization: str) -> str | None:
        """The tenant a call's `Authorization` header belongs to (None without `tenant_of`)."""
        token = authorization.removeprefix("Bearer ") if authorization.startswith("Bearer ") else ""
        return self.tenant_of(token) if self.tenant_of is not None and token else None

    def throttle(self, call: Call) -> Reply | None:
        """A 429 if `call` exceeds its operation's limits, else None. Counts the call."""
        operation = operation_of(call.method, call.path) or ""
        if operation not in self._limits:
            return None
        with self._lock:
            key = (call.tenant, operation)
            budget = self._budgets.get(key)
            if budget is None:
                budget = self._budgets[key] = SlidingWindows(self._limits[operation], self._time_scale)
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

    def find(self, field: str, value: str) -> list[dict[str, Any]]:
        with self._lock:
            return [
                m
                for m in self.machines.values()
                if isinstance(m.get(field), str) and m[field].lower() == value.lower()
            ]

    def lookup_calls(self) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.method == "GET" and urlsplit(c.path).path == "/api/machines"]

    def script(self, key: str, *replies: Reply) -> None:
        """Answer the next calls for `key` with `replies`, in order, then normally. Keys: a
        machine id (its offboard), `machine:<id>` (reading the machine), `tags:<id>` (tagging
        it), an action id (reading or cancelling that action), LOOKUP (device lookups),
        ACTION_LOOKUP (finding a machine's actions), BULK_TAGS (bulk tagging)."""
        with self._lock:
            self._scripts[key].extend(replies)

    def add_machine(
        self,
        machine_id: str,
        computer_dns_name: str | None = None,
        aad_device_id: str | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """Describe a machine (osPlatform, version, osBuild, machineTags, rbacGroupId,
        onboardingStatus, ...) over the defaults (an onboarded Windows 11 PC), replacing any
        machine with this id, a fleet machine included. Several machines may share a name or
        an AAD device id, as in real tenants (re-imaged devices), for ambiguity tests."""
        machine = {**default_machine(machine_id), **fields}
        if computer_dns_name is not None:
            machine["computerDnsName"] = computer_dns_name
        if aad_device_id is not None:
            machine["aadDeviceId"] = aad_device_id
        with self._lock:
            self.machines[machine_id] = machine
            self.refusals.pop(machine_id, None)  # a described machine is what the test says
        return dict(machine)

    def machine(self, machine_id: str) -> dict[str, Any] | None:
        """The machine with this id as Defender would return it; None when Defender would
        answer 404 (unknown, unless `accept_any` and the id is well-formed)."""
        with self._lock:
            return self._machine(machine_id)

    def _machine(self, machine_id: str) -> dict[str, Any] | None:  # with the lock held
        if machine_id in self.machines:
            return dict(self.machines[machine_id])
        if self.accept_any and _MACHINE_ID.fullmatch(machine_id):
            return default_machine(machine_id)
        return None

    def retag(self, machine_id: str, value: str, action: str) -> dict[str, Any] | None:
        """Adds (`Add`) or removes (`Remove`) one tag; the updated machine, or None for a
        machine Defender would not know."""
        with self._lock:
            machine = self._machine(machine_id)
            if machine is None:
                return None
            kept = [t for t in machine["machineTags"] if t != value]
            machine["machineTags"] = [*kept, value] if action == "Add" else kept
            self.machines[machine_id] = machine  # an accept_any machine is remembered from now on
            return dict(machine)

    def tag_calls(self) -> list[Call]:
        """Single and bulk tag calls, in the order received."""
        with self._lock:
            return [c for c in self.calls if operation_of(c.method, c.path) == "machine-tag"]

    def machine_calls(self, machine_id: str | None = None) -> list[Call]:
        with self._lock:
            return [
                c
                for c in self.calls
                if c.method == "GET"
                and (m := _MACHINE.fullmatch(c.path))
                and (machine_id is None or m.group(1) == machine_id)
            ]

    def action_calls(self, action_id: str | None = None) -> list[Call]:
        with self._lock:
            return [
                c
                for c in self.calls
                if (m := _ACTION.fullmatch(c.path)) and (action_id is None or m.group(1) == action_id)
            ]

    def offboard_actions(self, machine_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(a) for a in self.actions.values() if a["machineId"] == machine_id]

    def pending_offboard(self, machine_id: str) -> bool:
        return any(a["status"] in ("Pending", "InProgress") for a in self.offboard_actions(machine_id))

    def new_action(self, machine_id: str, comment: str) -> dict[str, Any]:
        machine = self.machine(machine_id)
        name = machine["computerDnsName"] if machine else f"host-{machine_id[:8]}.contoso.example"
        action = machine_action(machine_id, comment, name)
        with self._lock:
            self.actions[action["id"]] = action
        return action

    def read_action(self, action_id: str) -> dict[str, Any] | None:
        with self._lock:
            action = self.actions.get(action_id)
            if action is None:
                return None
            if action["status"] not in ("Cancelled",):
                reads = self._action_reads[action_id] = self._action_reads[action_id] + 1
                action["status"] = self.action_progression[min(reads, len(self.action_progression)) - 1]
            return dict(action)

    def cancel_action(self, action_id: str, comment: str) -> dict[str, Any] | None:
        """Cancels a Pending/InProgress action; None if it can't be (unknown or finished)."""
        with self._lock:
            action = self.actions.get(action_id)
            if action is None or action["status"] not in ("Pending", "InProgress"):
                return None
            action.update(status="Cancelled", cancellationComment=comment)
            return dict(action)

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


def default_machine(machine_id: str) -> dict[str, Any]:
    return {
        "id": machine_id,
        "computerDnsName": f"host-{machine_id[:8]}.contoso.example",
        "aadDeviceId": None,
        "osPlatform": "Windows11",
        "version": "23H2",
        "osBuild": 22631,
        "healthStatus": "Active",
        "onboardingStatus": "Onboarded",
        "machineTags": [],
        "rbacGroupId": 0,
        "lastSeen": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
    }


def machine_action(machine_id: str, comment: str, computer_dns_name: str) -> dict[str, Any]:
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    return {
        "id": str(uuid.uuid4()),
        "type": "Offboard",
        "scope": None,
        "requestor": "offboard-app@contoso.example",
        "requestorComment": comment,
        "status": "Pending",
        "machineId": machine_id,
        "computerDnsName": computer_dns_name,
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


def _tag_request(body: bytes, *, bulk: bool = False) -> tuple[str, str, list[str]] | Reply:
    """(Value, Action, MachineIds) of a tag request body, or the 400 Defender answers."""
    try:
        request = json.loads(body)
    except ValueError:
        request = None
    if not isinstance(request, dict):
        return Reply.error(400, "InvalidRequestBody", "the body must be a JSON object")
    value, action, ids = request.get("Value"), request.get("Action"), request.get("MachineIds")
    if not isinstance(value, str) or not value.strip():
        return Reply.error(400, "InvalidRequestBody", "Value (the tag) is required")
    if action not in ("Add", "Remove"):
        return Reply.error(400, "InvalidRequestBody", "Action must be 'Add' or 'Remove'")
    if not bulk:
        return value, action, []
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        return Reply.error(400, "InvalidRequestBody", "MachineIds must be a non-empty list of machine ids")
    if len(ids) > MAX_BULK_TAG_MACHINES:
        return Reply.error(
            400, "InvalidRequestBody", f"at most {MAX_BULK_TAG_MACHINES} machines per call, got {len(ids)}"
        )
    return value, action, ids


class _Handler(QuietHandler):
    def _filtered(
        self, sim: DefenderSimulator, script_key: str, pattern: re.Pattern[str], query: str
    ) -> re.Match[str] | None:
        """The one `$filter` this route understands, or None once a scripted reply or a 400
        (as Defender refuses a filter it cannot parse) has been sent."""
        scripted = sim.next_scripted(script_key)
        if scripted is not None:
            self._reply(scripted)
            return None
        filters = parse_qs(query).get("$filter", [])
        match = pattern.fullmatch(filters[0]) if len(filters) == 1 else None
        if not match:
            self._reply(Reply.error(400, "InvalidInput", f"unsupported $filter {filters!r}"))
        return match

    def _find_actions(self, sim: DefenderSimulator, query: str) -> None:
        match = self._filtered(sim, ACTION_LOOKUP, _ACTION_FILTER, query)
        if match:
            self._reply(Reply(200, {"value": sim.offboard_actions(match.group(1))}))

    def _find_machines(self, sim: DefenderSimulator, query: str) -> None:
        match = self._filtered(sim, LOOKUP, _FILTER, query)
        if match:
            field, literal = match.group(1), match.group(2).replace("''", "'")
            self._reply(Reply(200, {"@odata.context": "machines", "value": sim.find(field, literal)}))

    def do_POST(self) -> None:  # noqa: N802 - http.server naming
        sim = cast(DefenderSimulator, self.server.owner)  # type: ignore[attr-defined]
        body = self.read_body()
        call = self._call(sim, body)
        if not self._admitted(sim, call):
            return None
        if self.path == _BULK_TAGS:
            return self._tag_many(sim, body)
        action = _ACTION.fullmatch(self.path)
        if action and action.group(2):
            return self._cancel_action(sim, action.group(1), body)
        tags = _TAGS.fullmatch(self.path)
        if tags:
            return self._tag(sim, tags.group(1), body)
        match = _OFFBOARD.fullmatch(self.path)
        if not match:
            return self._reply(Reply.error(404, "ResourceNotFound", f"no route {self.path}"))
        machine_id = match.group(1)
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
        if sim.machine(machine_id) is None:
            return self._reply(Reply.error(404, "NotFound", f"Machine {machine_id} was not found"))
        refusal = sim.refusals.get(machine_id)
        if refusal is not None:
            return self._reply(Reply.error(400, "OsPlatformNotSupported", refusal))
        if sim.pending_offboard(machine_id):
            # As Defender does: one offboard per machine at a time.
            return self._reply(
                Reply.error(
                    400, "ActiveRequestAlreadyExists", f"an offboard of {machine_id} is already pending"
                )
            )
        self._reply(Reply(201, sim.new_action(machine_id, comment)))

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        sim = cast(DefenderSimulator, self.server.owner)  # type: ignore[attr-defined]
        call = self._call(sim, b"")
        if not self._admitted(sim, call):
            return None
        parts = urlsplit(self.path)
        if parts.path == "/api/machines":
            return self._find_machines(sim, parts.query)
        if parts.path == "/api/machineactions":
            return self._find_actions(sim, parts.query)
        machine = _MACHINE.fullmatch(self.path)
        if machine:
            return self._get_machine(sim, machine.group(1))
        match = _ACTION.fullmatch(self.path)
        if not match or match.group(2):
            return self._reply(Reply.error(404, "ResourceNotFound", f"no route {self.path}"))
        scripted = sim.next_scripted(match.group(1))
        if scripted is not None:
            return self._reply(scripted)
        action = sim.read_action(match.group(1))
        if action is None:
            return self._reply(Reply.error(404, "NotFound", f"MachineAction {match.group(1)} was not found"))
        return self._reply(Reply(200, action))

    def _get_machine(self, sim: DefenderSimulator, machine_id: str) -> None:
        scripted = sim.next_scripted(f"machine:{machine_id}")
        if scripted is not None:
            return self._reply(scripted)
        machine = sim.machine(machine_id)
        if machine is None:
            return self._reply(Reply.error(404, "NotFound", f"Machine {machine_id} was not found"))
        return self._reply(Reply(200, machine))

    def _tag(self, sim: DefenderSimulator, machine_id: str, body: bytes) -> None:
        scripted = sim.next_scripted(f"tags:{machine_id}")
        if scripted is not None:
            return self._reply(scripted)
        request = _tag_request(body)
        if isinstance(request, Reply):
            return self._reply(request)
        value, action, _ = request
        machine = sim.retag(machine_id, value, action)
        if machine is None:
            return self._reply(Reply.error(404, "NotFound", f"Machine {machine_id} was not found"))
        return self._reply(Reply(200, machine))

    def _tag_many(self, sim: DefenderSimulator, body: bytes) -> None:
        scripted = sim.next_scripted(BULK_TAGS)
        if scripted is not None:
            return self._reply(scripted)
        request = _tag_request(body, bulk=True)
        if isinstance(request, Reply):
            return self._reply(request)
        value, action, machine_ids = request
        # Machines Defender does not know are left out of the answer rather than failing it.
        tagged = [m for m in (sim.retag(i, value, action) for i in dict.fromkeys(machine_ids)) if m]
        return self._reply(Reply(200, {"value": tagged}))

    def _cancel_action(self, sim: DefenderSimulator, action_id: str, body: bytes) -> None:
        scripted = sim.next_scripted(action_id)
        if scripted is not None:
            return self._reply(scripted)
        try:
            comment = json.loads(body)["Comment"]
        except (ValueError, KeyError, TypeError):
            return self._reply(Reply.error(400, "InvalidRequestBody", "Comment is required"))
        action = sim.cancel_action(action_id, str(comment))
        if action is None:
            return self._reply(Reply.error(400, "InvalidRequest", f"action {action_id} cannot be cancelled"))
        return self._reply(Reply(200, action))

    def _call(self, sim: DefenderSimulator, body: bytes) -> Call:
        """Records the call being handled, with its tenant."""
        tenant = sim.tenant_for(self.headers.get("Authorization", ""))
        call = Call(self.command, self.path, dict(self.headers.items()), body, time.time(), tenant)
        sim.record(call)
        return call

    def _admitted(self, sim: DefenderSimulator, call: Call) -> bool:
        """Authenticated, then within the rate limits (every authenticated call counts)."""
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or not sim.accept_token(auth.removeprefix("Bearer ")):
            self._reply(Reply.error(401, "Unauthorized", "missing or invalid bearer token"))
            return False
        throttled = sim.throttle(call)
        if throttled is not None:
            self._reply(throttled)
            return False
        return True

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
