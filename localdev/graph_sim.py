"""A loopback Microsoft Graph for the Intune watcher: managed devices and Intune audit events.

It serves, behind a bearer token check (`accept_token`, like the Defender simulator's), the
two reads the watcher makes (shared/adapters/graph.py):
- `GET /v1.0/deviceManagement/managedDevices`: every device, `$select` honoured, `$filter`
  ignored (Graph may silently ignore a filter on a property that does not support one),
  `page_size` devices a page, with `@odata.nextLink` carrying a `$skiptoken`;
- `GET /v1.0/deviceManagement/auditEvents`: `$filter=activityDateTime gt|ge <time>` (any
  other filter is refused with 400, as Graph refuses one it cannot parse), newest first (the
  watcher must not rely on the order), `audit_page_size` events a page.
A page is cut from a snapshot taken at the first page, so paging is consistent while tests
change devices. Graph's own Intune limits are enforced as sliding windows per app and
tenant (devices: 2000 requests per 20 s; auditing: 1000 per 20 s): over them, 429 with
Retry-After. `script(route, ...)` scripts the next answers of a route: 429 with or without
Retry-After, 5xx, a slow answer, a body that is not JSON (`None` in the list answers that
call normally). Every call is recorded.

Test helpers do what an Intune administrator does, with the audit event each action
writes: `retire`, `wipe` (the device's managementState becomes retirePending/wipePending
and it stays listed), `delete` (the record disappears at once, as Intune's does) and
`check_in` (a retired or wiped device's record goes when it checks in). The activity types
are the ones public KQL and scripts show for IntuneAuditLogs (`retire ManagedDevice`,
`wipe ManagedDevice`, `Delete ManagedDevice`, capitalisation as seen); the delete event
carries no modifiedProperties by default, so only the watcher's inventory knows which
Entra device it was.

Seeded (`SEEDS`) with Intune devices matching machines of the Defender simulator's fleet
(localdev/fleet.py), by Entra device id or, for one not registered in Entra ID, by DNS name,
plus one Defender does not know and one with no usable identifier.

`python -m localdev.graph_sim --port 7072` serves it alone (any bearer token accepted),
with control routes for a person at a terminal (no token; loopback only):
`POST /sim/devices/{id}/retire|wipe|delete|check-in` and `GET /sim/devices`.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import json
import math
import re
import threading
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast
from urllib.parse import parse_qs, quote, urlsplit

from .defender_sim import SlidingWindows
from .fleet import FLEET
from .loopback import LoopbackServer, QuietHandler

DEVICES = "managedDevices"  # route keys for `script`
AUDIT = "auditEvents"
_PATHS = {
    "/v1.0/deviceManagement/managedDevices": DEVICES,
    "/v1.0/deviceManagement/auditEvents": AUDIT,
}
_CONTROL = re.compile(r"/sim/devices/([^/]+)/(retire|wipe|delete|check-in)")
_AUDIT_FILTER = re.compile(r"activityDateTime (gt|ge) (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,7})?Z)")
EMPTY_GUID = "00000000-0000-0000-0000-000000000000"
# Graph's documented Intune limits, per app and tenant: (requests, window in seconds).
GRAPH_RATE_LIMITS: dict[str, tuple[tuple[int, float], ...]] = {
    DEVICES: ((2000, 20.0),),
    AUDIT: ((1000, 20.0),),
}
ACTIVITY_TYPES = {
    "retire": "retire ManagedDevice",
    "wipe": "wipe ManagedDevice",
    "delete": "Delete ManagedDevice",
}
LEAVING_STATE = {"retire": "retirePending", "wipe": "wipePending"}
DEFAULT_ACTOR = "intune-admin@contoso.com"


@dataclass(frozen=True)
class IntuneSeed:
    """One Intune managed device the simulator starts with, and why it is there."""

    id: str
    device_name: str
    azure_ad_device_id: str
    operating_system: str
    purpose: str


def _fleet_aad(dns_name: str) -> str:
    [aad] = [m.aad_device_id for m in FLEET if m.computer_dns_name == dns_name and m.aad_device_id]
    return aad


SEEDS: tuple[IntuneSeed, ...] = (
    IntuneSeed(
        "5e3f9a2b-7c41-4d8e-9f60-1a2b3c4d5e6f",
        "WS-0042",
        _fleet_aad("ws-0042.contoso.com"),
        "Windows",
        "Windows 11 PC: resolved by Entra device id",
    ),
    IntuneSeed(
        "0c9d8e7f-6a5b-4c3d-8e2f-1a0b9c8d7e6f",
        "DESKTOP-7F3K2",
        _fleet_aad("desktop-7f3k2.contoso.com"),
        "Windows",
        "Windows 10 PC: resolved by Entra device id",
    ),
    IntuneSeed(
        "7a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d",
        "WS-0117",
        # The re-imaged PC's new record: its Entra id names one machine where its name names two.
        "af9242da-ca60-47ed-b0e7-cc2ab7c18228",
        "Windows",
        "re-imaged PC: by Entra device id exactly one machine, although its name has two",
    ),
    IntuneSeed(
        "b2c3d4e5-f6a7-4b8c-9d0e-1f2a3b4c5d6e",
        "mac-design-07",
        _fleet_aad("mac-design-07.contoso.com"),
        "macOS",
        "macOS 14: resolved by Entra device id, offboarded",
    ),
    IntuneSeed(
        "c3d4e5f6-a7b8-4c9d-8e1f-2a3b4c5d6e7f",
        "mac-finance-02",
        _fleet_aad("mac-finance-02.contoso.com"),
        "macOS",
        "macOS 13: resolved, then refused by the precheck (OsPlatformNotSupported)",
    ),
    IntuneSeed(
        "d4e5f6a7-b8c9-4d0e-9f2a-3b4c5d6e7f80",
        "lnx-build-11.corp.contoso.com",
        EMPTY_GUID,
        "Linux",
        "Linux, not registered in Entra ID (all-zero id): resolved by its exact DNS name",
    ),
    IntuneSeed(
        "e5f6a7b8-c9d0-4e1f-8a3b-4c5d6e7f8091",
        "WS-0999",
        "3f1d2c4b-5a6e-4f70-8b91-a2c3d4e5f607",
        "Windows",
        "never onboarded to Defender: the request fails DeviceNotFound",
    ),
    IntuneSeed(
        "f6a7b8c9-d0e1-4f2a-9b4c-5d6e7f8091a2",
        "Lobby kiosk #3",
        EMPTY_GUID,
        "Android",
        "no Entra id and a name that is not a DNS name: skipped, NoDeviceIdentifier",
    ),
)


def seed_named(name: str) -> IntuneSeed:
    [seed] = [s for s in SEEDS if s.device_name == name]
    return seed


def stamp(moment: datetime) -> str:
    """A Graph DateTimeOffset as Graph writes it: UTC, seven fractional digits, `Z`."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "0Z"


def parse_stamp(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def managed_device(
    device_id: str,
    device_name: str,
    azure_ad_device_id: str = EMPTY_GUID,
    operating_system: str = "Windows",
    management_state: str = "managed",
    **fields: Any,
) -> dict[str, Any]:
    """A managedDevice with the properties the watcher selects and a few it does not."""
    now = datetime.now(UTC)
    return {
        "id": device_id,
        "deviceName": device_name,
        "azureADDeviceId": azure_ad_device_id,
        "managementState": management_state,
        "operatingSystem": operating_system,
        "osVersion": "10.0.22631.4460" if operating_system == "Windows" else "14.6.1",
        "lastSyncDateTime": stamp(now - timedelta(hours=2)),
        "enrolledDateTime": stamp(now - timedelta(days=300)),
        "userPrincipalName": "someone@contoso.com",
        "serialNumber": device_id[:8].upper(),
        "complianceState": "compliant",
        **fields,
    }


@dataclass(frozen=True)
class Reply:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_seconds: float = 0.0
    raw: bytes | None = None  # sent as is instead of `body` (a page that is not JSON)

    @classmethod
    def error(cls, status: int, code: str, message: str = "", **headers: str) -> Reply:
        """Graph's error body: `{"error": {"code", "message", "innerError"}}`."""
        inner = {"date": stamp(datetime.now(UTC)), "request-id": str(uuid.uuid4())}
        return cls(
            status, {"error": {"code": code, "message": message or code, "innerError": inner}}, headers
        )

    @classmethod
    def throttled(cls, retry_after: str | None = "1") -> Reply:
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        return cls.error(429, "TooManyRequests", "Too many requests", **headers)

    @classmethod
    def not_json(cls, text: str = "<html><body>Service Unavailable</body></html>") -> Reply:
        return cls(200, raw=text.encode(), headers={"Content-Type": "text/html"})

    @classmethod
    def slow(cls, seconds: float) -> Reply:
        """Answers normally, `seconds` late."""
        return cls(0, delay_seconds=seconds)


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    headers: dict[str, str]
    at: float

    @property
    def route(self) -> str | None:
        return _PATHS.get(urlsplit(self.path).path)

    @property
    def query(self) -> dict[str, str]:
        return {k: v[0] for k, v in parse_qs(urlsplit(self.path).query).items()}


class GraphSimulator(LoopbackServer):
    def __init__(
        self,
        port: int = 0,
        accept_token: Callable[[str], bool] | None = None,
        *,
        page_size: int = 1000,
        audit_page_size: int = 50,
        seeds: Iterable[IntuneSeed] = SEEDS,
        rate_limits: Mapping[str, tuple[tuple[int, float], ...]] | None = None,
    ) -> None:
        self.accept_token = accept_token or (lambda token: bool(token))
        self.page_size = page_size
        self.audit_page_size = audit_page_size
        self.calls: list[Call] = []
        self.throttled: list[Call] = []  # calls answered 429 by the rate limits
        self.devices: dict[str, dict[str, Any]] = {
            s.id: managed_device(s.id, s.device_name, s.azure_ad_device_id, s.operating_system) for s in seeds
        }
        self.events: list[Any] = []  # audit events (tests may add ones that are not)
        self._scripts: dict[str, deque[Reply | None]] = defaultdict(deque)
        self._snapshots: dict[str, list[dict[str, Any]]] = {}
        limits = GRAPH_RATE_LIMITS if rate_limits is None else rate_limits
        self._budgets = {route: SlidingWindows(windows) for route, windows in limits.items()}
        self._lock = threading.Lock()
        super().__init__(_Handler, port)

    # ---- what an Intune administrator does ----------------------------------------------

    def add_device(
        self, device_id: str, device_name: str, azure_ad_device_id: str = EMPTY_GUID, **fields: Any
    ) -> dict[str, Any]:
        device = managed_device(device_id, device_name, azure_ad_device_id, **fields)
        with self._lock:
            self.devices[device_id] = device
        return dict(device)

    def retire(self, device_id: str, **event: Any) -> dict[str, Any]:
        return self._act("retire", device_id, **event)

    def wipe(self, device_id: str, **event: Any) -> dict[str, Any]:
        return self._act("wipe", device_id, **event)

    def delete(self, device_id: str, **event: Any) -> dict[str, Any]:
        """The record disappears at once; the audit event names the device only by its
        Intune id and display name (no modifiedProperties unless `with_properties=True`)."""
        event.setdefault("with_properties", False)
        return self._act("delete", device_id, **event)

    def check_in(self, device_id: str) -> None:
        """A retired or wiped device checks in: Intune removes its record (no audit event)."""
        with self._lock:
            self.devices.pop(device_id, None)

    def device_list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(d) for d in self.devices.values()]

    def set_state(self, device_id: str, state: str) -> None:
        with self._lock:
            self.devices[device_id]["managementState"] = state

    def _act(
        self,
        action: str,
        device_id: str,
        *,
        actor: str = DEFAULT_ACTOR,
        at: datetime | None = None,
        result: str = "Success",
        with_properties: bool = True,
        log_event: bool = True,
    ) -> dict[str, Any]:
        with self._lock:
            device = self.devices[device_id]
            if result == "Success":
                if action == "delete":
                    del self.devices[device_id]
                else:
                    device["managementState"] = LEAVING_STATE[action]
            device = dict(device)
        if not log_event:
            return {}
        event = audit_event(
            action, device, actor=actor, at=at, result=result, with_properties=with_properties
        )
        self.add_event(event)
        return event

    def add_event(self, event: Any) -> Any:
        with self._lock:
            self.events.append(event)
        return event

    # ---- scripting and inspection -------------------------------------------------------

    def script(self, route: str, *replies: Reply | None) -> None:
        """Answer the next calls of `route` (DEVICES or AUDIT) with `replies`, in order,
        then normally; `None` answers that call normally."""
        with self._lock:
            self._scripts[route].extend(replies)

    def next_scripted(self, route: str) -> Reply | None:
        with self._lock:
            queue = self._scripts.get(route)
            return queue.popleft() if queue else None

    def record(self, call: Call) -> None:
        with self._lock:
            self.calls.append(call)

    def route_calls(self, route: str) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.route == route]

    def throttle(self, call: Call) -> Reply | None:
        budget = self._budgets.get(call.route or "")
        if budget is None:
            return None
        with self._lock:
            wait = budget.admit(call.at)
            if wait is None:
                return None
            self.throttled.append(call)
        return Reply.throttled(str(max(1, math.ceil(wait))))

    # ---- pages --------------------------------------------------------------------------

    def page(self, route: str, query: dict[str, str], base: str) -> Reply:
        token = query.get("$skiptoken")
        if token is None:
            items = self._first(route, query)
            if isinstance(items, Reply):
                return items
            snapshot = uuid.uuid4().hex
            with self._lock:
                self._snapshots[snapshot] = items
            offset = 0
        else:
            try:
                snapshot, offset = _read_token(token)
                with self._lock:
                    items = self._snapshots[snapshot]
            except (KeyError, ValueError):
                return Reply.error(400, "BadRequest", "the $skiptoken is invalid or has expired")
        size = self.page_size if route == DEVICES else self.audit_page_size
        top = query.get("$top")
        if top is not None and top.isdigit() and int(top) > 0:
            size = min(size, int(top))
        chunk = items[offset : offset + size]
        select = query.get("$select")
        if select:
            wanted = {"id", *(name.strip() for name in select.split(","))}
            chunk = [{k: v for k, v in item.items() if k in wanted} for item in chunk]
        body: dict[str, Any] = {
            "@odata.context": f"{base}/v1.0/$metadata#deviceManagement/{route}",
            "value": chunk,
        }
        if offset + size < len(items):
            kept = {k: v for k, v in query.items() if k not in ("$skiptoken",)}
            link_query = "&".join(f"{k}={quote(v, safe=',')}" for k, v in kept.items())
            link_query += ("&" if link_query else "") + f"$skiptoken={_token(snapshot, offset + size)}"
            path = "/v1.0/deviceManagement/" + route
            body["@odata.nextLink"] = f"{base}{path}?{link_query}"
        return Reply(200, body)

    def _first(self, route: str, query: dict[str, str]) -> list[dict[str, Any]] | Reply:
        with self._lock:
            if route == DEVICES:
                return [dict(d) for d in self.devices.values()]  # $filter ignored, as Graph may
            events = [dict(e) if isinstance(e, dict) else e for e in self.events]
        raw = query.get("$filter")
        if raw is not None:
            match = _AUDIT_FILTER.fullmatch(raw)
            if not match:
                return Reply.error(400, "BadRequest", f"Invalid filter clause: {raw[:100]}")
            op, since = match.group(1), parse_stamp(match.group(2))
            events = [
                e
                for e in events
                if (at := _event_time(e)) is None or at > since or (op == "ge" and at == since)
            ]
        # Newest first: the watcher has to sort what it reads. An event a test made unreadable
        # on purpose (no time) is always served, last.
        oldest = datetime.min.replace(tzinfo=UTC)
        return sorted(events, key=lambda e: _event_time(e) or oldest, reverse=True)


def _event_time(event: Any) -> datetime | None:
    value = event.get("activityDateTime") if isinstance(event, dict) else None
    try:
        return parse_stamp(value) if isinstance(value, str) else None
    except ValueError:
        return None


def audit_event(
    action: str,
    device: Mapping[str, Any],
    *,
    actor: str = DEFAULT_ACTOR,
    at: datetime | None = None,
    result: str = "Success",
    with_properties: bool = True,
) -> dict[str, Any]:
    """An Intune auditEvent (Graph v1.0 shape) for a device action."""
    properties = (
        [
            {"displayName": "AzureADDeviceId", "oldValue": None, "newValue": device.get("azureADDeviceId")},
            {"displayName": "DeviceName", "oldValue": None, "newValue": device.get("deviceName")},
        ]
        if with_properties
        else []
    )
    activity_type = ACTIVITY_TYPES[action]
    return {
        "id": str(uuid.uuid4()),
        "displayName": activity_type,
        "componentName": "DeviceIntent" if action != "delete" else "Devices",
        "actor": {
            "applicationDisplayName": "Microsoft Intune portal extension",
            "applicationId": "5926fc8e-304e-4f59-8bed-58ca97cc39a4",
            "auditActorType": "ItPro",
            "ipAddress": None,
            "servicePrincipalName": None,
            "userId": "9a8b7c6d-5e4f-4a3b-2c1d-0e9f8a7b6c5d",
            "userPermissions": ["*"],
            "userPrincipalName": actor,
        },
        "activity": activity_type,
        "activityDateTime": stamp(at or datetime.now(UTC)),
        "activityType": activity_type,
        "activityOperationType": "Delete" if action == "delete" else "Action",
        "activityResult": result,
        "correlationId": str(uuid.uuid4()),
        "resources": [
            {
                "displayName": device.get("deviceName"),
                "modifiedProperties": properties,
                "auditResourceType": "ManagedDevice",
                "resourceId": device["id"],
            }
        ],
        "category": "Device",
    }


def _token(snapshot: str, offset: int) -> str:
    return base64.urlsafe_b64encode(f"{snapshot}.{offset}".encode()).decode().rstrip("=")


def _read_token(token: str) -> tuple[str, int]:
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise ValueError(token) from None
    snapshot, _, offset = text.partition(".")
    return snapshot, int(offset)


class _Handler(QuietHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        sim = cast(GraphSimulator, self.server.owner)  # type: ignore[attr-defined]
        if self.path.startswith("/sim/"):
            return self._control(sim)
        call = Call("GET", self.path, dict(self.headers.items()), time.time())
        sim.record(call)
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or not sim.accept_token(auth.removeprefix("Bearer ")):
            return self._reply(
                Reply.error(401, "InvalidAuthenticationToken", "Access token is empty or invalid.")
            )
        route = call.route
        if route is None:
            return self._reply(Reply.error(404, "ResourceNotFound", f"no route {urlsplit(self.path).path}"))
        throttled = sim.throttle(call)
        if throttled is not None:
            return self._reply(throttled)
        scripted = sim.next_scripted(route)
        if scripted is not None and scripted.status != 0:
            return self._reply(scripted)
        page = sim.page(route, call.query, sim.url)
        delay = scripted.delay_seconds if scripted is not None else 0.0
        return self._reply(Reply(page.status, page.body, page.headers, delay))

    def do_POST(self) -> None:  # noqa: N802 - http.server naming
        sim = cast(GraphSimulator, self.server.owner)  # type: ignore[attr-defined]
        self.read_body()
        if self.path.startswith("/sim/"):
            return self._control(sim)
        return self._reply(Reply.error(405, "MethodNotAllowed", "the simulator serves reads only"))

    def _control(self, sim: GraphSimulator) -> None:
        """The terminal's routes: list the devices, or act on one."""
        if self.command == "GET" and self.path == "/sim/devices":
            return self._reply(Reply(200, {"value": sim.device_list()}))
        match = _CONTROL.fullmatch(self.path)
        if self.command != "POST" or not match:
            return self._reply(
                Reply.error(404, "NotFound", "POST /sim/devices/{id}/retire|wipe|delete|check-in")
            )
        device_id, action = match.groups()
        if device_id not in sim.devices:
            return self._reply(Reply.error(404, "NotFound", f"no managed device {device_id}"))
        if action == "check-in":
            sim.check_in(device_id)
            return self._reply(Reply(200, {"checkedIn": device_id}))
        event = getattr(sim, action)(device_id)
        return self._reply(Reply(200, event))

    def _reply(self, reply: Reply) -> None:
        if reply.delay_seconds:
            time.sleep(reply.delay_seconds)
        try:
            if reply.raw is not None:
                self.send(reply.status, reply.raw, reply.headers)
            elif reply.body is None:
                self.send(reply.status, b"", reply.headers)
            else:
                self.send_json(reply.status, reply.body, reply.headers)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up waiting, as a timing-out client does


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, default=7072, help="port on 127.0.0.1 (0 picks a free one)")
    args = parser.parse_args(argv)
    with GraphSimulator(args.port) as sim:
        print(json.dumps({"ready": True, "url": sim.url}), flush=True)
        for seed in SEEDS:
            print(f"{seed.id}  {seed.device_name:30}  {seed.purpose}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main()
