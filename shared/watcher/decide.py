"""The Intune watcher's decisions, pure: no network, storage or clock (time and randomness
come in as arguments), so each rule is a unit test of milliseconds.

**What is a retirement.** Two signs, from Microsoft Graph v1.0 (adapters/graph.py):
- a `managedDevice` whose `managementState` is retirePending, retireIssued, wipePending,
  wipeIssued or deletePending (the v1.0 enum is managed, retirePending, retireFailed,
  wipePending, wipeFailed, unhealthy, deletePending, retireIssued, wipeIssued, wipeCanceled,
  retireCanceled, discovered, unknownFutureValue), compared case-insensitively; a retired
  or wiped device stays listed until it checks in;
- an Intune `auditEvent` whose `activityType` is `retire ManagedDevice`, `wipe ManagedDevice`
  or `Delete ManagedDevice` and whose `activityResult` is Success. These activity names come
  from public KQL queries and scripts over IntuneAuditLogs, not from Microsoft's
  documentation, and their capitalisation varies: they are compared ignoring case and
  spaces. Each `resources[].resourceId` is an Intune managed device id; `modifiedProperties`
  may carry `AzureADDeviceId` and `DeviceName`. A device deleted outright disappears from
  managedDevices at once, so for a delete the audit event is the only sign, and often the
  inventory (Intune id -> Entra device id, name), kept from earlier listings, is the only
  place that still knows which device it was.

**Which device.** By Entra device id (`azureADDeviceId`; the all-zero GUID means none), from
the audit event, the current listing or the inventory, in that order; else by the exact DNS
name (`deviceName`, when it is one); else it is skipped as `NoDeviceIdentifier`, recorded.

**One request per leaving.** The watcher keeps a ledger row per device (store.py): the first
sign opens it, and every later sign of the same device (the listing every five minutes while
a retired device stays offline, the audit event, a delete after a retire) belongs to it. The
row holds the request's comment and idempotency key, `intune-watcher:<intune id>:<first
action>:<when the row was opened>` (`:report` in report mode), so a crash, a retry, a second
run or a second instance submits the same request again and gets the same answer. A row is
pruned once its device is no longer leaving and the checkpoint has long passed it, so a
device retired again months later (a retire that was cancelled, say) opens a new row, a new
key, and is offboarded again, which is what a second real retirement asks for.

**The checkpoint** (`next_checkpoint`): the newest audit time up to which every retirement
event read is settled (accepted, or skipped for a recorded reason). It moves only after a
complete read, never backwards, and never past an event whose request could not be
accepted yet; events are read from `checkpoint - LOOKBACK`, so ones Graph shows late are
still seen, and the ledger makes reading an event twice harmless.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

import requests

from ..domain.devices import EMPTY_GUID, GUID, InvalidLookup, Lookup
from ..domain.errors import DefenderCallError, Refusal, RequestConflict, ServiceUnavailable, TokenUnavailable
from ..domain.offboard import OffboardRequest
from ..domain.outcome import error_of, parse_retry_after
from ..http.validate import generated_comment

if TYPE_CHECKING:
    from ..intake.submission import Answer

Action = Literal["retire", "wipe", "delete"]
Mode = Literal["report", "offboard"]
CALLER = "intune-watcher"
LEAVING_STATES: dict[str, Action] = {
    "retirepending": "retire",
    "retireissued": "retire",
    "wipepending": "wipe",
    "wipeissued": "wipe",
    "deletepending": "delete",
}
# activityType with case and spaces removed -> the action.
AUDIT_ACTIVITIES: dict[str, Action] = {
    "retiremanageddevice": "retire",
    "wipemanageddevice": "wipe",
    "deletemanageddevice": "delete",
}
# Audit events are read from this long before the checkpoint: Graph may show an event some
# time after its activityDateTime. The ledger makes the overlap harmless.
LOOKBACK = timedelta(hours=1)
# A settled ledger row is kept at least this long after the checkpoint has passed it (and
# for as long as its device is still leaving).
LEDGER_MARGIN = timedelta(days=1)
# A device gone from the listing stays in the inventory this long, for a late audit event.
INVENTORY_GRACE = timedelta(days=7)
# Runs in which a retirement may fail to be accepted (storage aside) before it is recorded
# as skipped with the last reason: never retried forever.
MAX_ATTEMPTS = 6
_TEXT = 256  # a DNS name is at most 253 characters


# ---- what Graph said ------------------------------------------------------------------


@dataclass(frozen=True)
class Device:
    """A managed device as the watcher uses it (and as the inventory keeps it)."""

    intune_id: str
    name: str | None = None
    aad_device_id: str | None = None  # None: absent, or the all-zero GUID
    operating_system: str | None = None
    state: str | None = None


@dataclass(frozen=True)
class Sighting:
    """One sign that a device is leaving Intune: its managementState, or an audit event."""

    intune_id: str
    action: Action
    source: Literal["audit", "device"]
    at: datetime  # the event's activityDateTime, or when the listing was read
    actor: str | None = None
    event_id: str | None = None
    state: str | None = None
    aad_device_id: str | None = None
    name: str | None = None


@dataclass(frozen=True)
class Skip:
    """Something read that cannot be used, and why: recorded (audit, log), never retried."""

    item: str
    code: str
    message: str
    fingerprint: str = ""  # what makes it the same skip on the next run (recorded once)


@dataclass(frozen=True)
class Event:
    """An audit event as read: its time (for the checkpoint), and what it says."""

    id: str
    at: datetime
    sightings: tuple[Sighting, ...] = ()
    skips: tuple[Skip, ...] = ()


def parse_device(raw: Any, index: int) -> Device | Skip:
    if not isinstance(raw, dict):
        return _skip(f"managedDevices item {index}", "InvalidManagedDevice", "not a JSON object", raw)
    intune_id = raw.get("id")
    if not isinstance(intune_id, str) or not GUID.fullmatch(intune_id):
        return _skip(
            f"managedDevices item {index}", "InvalidManagedDevice", "no Intune device id (a GUID)", raw
        )
    return Device(
        intune_id.lower(),
        _text(raw.get("deviceName")),
        _aad(raw.get("azureADDeviceId")),
        _text(raw.get("operatingSystem")),
        _text(raw.get("managementState")),
    )


def device_sighting(device: Device, seen_at: datetime) -> Sighting | None:
    action = LEAVING_STATES.get((device.state or "").lower())
    if action is None:
        return None
    return Sighting(
        device.intune_id,
        action,
        "device",
        seen_at,
        state=device.state,
        aad_device_id=device.aad_device_id,
        name=device.name,
    )


def parse_event(raw: Any, index: int) -> Event | Skip:
    """An audit event: a Skip when it cannot even be placed in time; else its sightings (none
    for anything but a successful retire, wipe or delete of a managed device)."""
    item = f"auditEvents item {index}"
    if not isinstance(raw, dict):
        return _skip(item, "InvalidAuditEvent", "not a JSON object", raw)
    event_id = _text(raw.get("id")) or ""
    at = parse_time(raw.get("activityDateTime"))
    if at is None:
        return _skip(
            f"auditEvent {event_id or index}", "InvalidAuditEvent", "no readable activityDateTime", raw
        )
    kind = raw.get("activityType") if isinstance(raw.get("activityType"), str) else raw.get("displayName")
    action = AUDIT_ACTIVITIES.get("".join(str(kind or "").split()).lower())
    result = raw.get("activityResult")
    if action is None or not isinstance(result, str) or result.lower() != "success":
        return Event(event_id, at)
    resources = raw.get("resources")
    devices = [r for r in resources if isinstance(r, dict)] if isinstance(resources, list) else []
    typed = [r for r in devices if "manageddevice" in str(r.get("auditResourceType") or "").lower()]
    sightings: list[Sighting] = []
    for resource in typed or devices:
        intune_id = resource.get("resourceId")
        if not isinstance(intune_id, str) or not GUID.fullmatch(intune_id):
            continue
        properties = _properties(resource.get("modifiedProperties"))
        sightings.append(
            Sighting(
                intune_id.lower(),
                action,
                "audit",
                at,
                actor=actor_of(raw.get("actor")),
                event_id=event_id or None,
                aad_device_id=_aad(properties.get("azureaddeviceid")),
                name=_text(properties.get("devicename")) or _text(resource.get("displayName")),
            )
        )
    if not sightings:
        skip = _skip(
            f"auditEvent {event_id or index} ({action})",
            "NoDeviceIdentifier",
            "the event names no managed device (no resource with an Intune device id)",
            raw,
        )
        return Event(event_id, at, skips=(skip,))
    return Event(event_id, at, tuple(dict.fromkeys(sightings)))


def actor_of(actor: Any) -> str | None:
    """Who did it: the user, else the service principal or application that acted."""
    if not isinstance(actor, dict):
        return None
    for name in ("userPrincipalName", "servicePrincipalName", "applicationDisplayName", "userId"):
        value = _text(actor.get(name))
        if value:
            return value
    return None


def parse_time(value: Any) -> datetime | None:
    """A Graph DateTimeOffset (`2026-12-01T09:00:00.1234567Z`), in UTC; None if unreadable."""
    if not isinstance(value, str) or not value:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment.astimezone(UTC) if moment.tzinfo else None


# ---- one retirement per device ---------------------------------------------------------


def merge(sightings: Iterable[Sighting]) -> dict[str, Sighting]:
    """One sighting per device: its earliest audit event (who and when), else its listing;
    identifiers the chosen one lacks are taken from the others."""
    by_device: dict[str, list[Sighting]] = {}
    for s in sightings:
        by_device.setdefault(s.intune_id, []).append(s)
    merged: dict[str, Sighting] = {}
    for intune_id, found in by_device.items():
        best = min(found, key=lambda s: (s.source != "audit", s.at, s.event_id or ""))
        aad = best.aad_device_id or next((s.aad_device_id for s in found if s.aad_device_id), None)
        name = best.name or next((s.name for s in found if s.name), None)
        state = best.state or next((s.state for s in found if s.state), None)
        merged[intune_id] = Sighting(
            best.intune_id, best.action, best.source, best.at, best.actor, best.event_id, state, aad, name
        )
    return merged


def enrich(sighting: Sighting, listed: Device | None, known: Device | None) -> Sighting:
    """The sighting with the identifiers it lacks taken from the current listing, else the
    inventory (a deleted device's audit event often names it only by its Intune id)."""
    sources = [s for s in (listed, known) if s is not None]
    aad = sighting.aad_device_id or next((s.aad_device_id for s in sources if s.aad_device_id), None)
    name = sighting.name or next((s.name for s in sources if s.name), None)
    return replace(sighting, aad_device_id=aad, name=name)


def identify(sighting: Sighting) -> Lookup | Skip:
    """How the worker will find the device in Defender: Entra device id, else exact DNS name."""
    if sighting.aad_device_id:
        try:
            return Lookup.of("aadDeviceId", sighting.aad_device_id)
        except InvalidLookup:
            pass
    if sighting.name:
        try:
            return Lookup.of("deviceName", sighting.name)
        except InvalidLookup:
            pass
    named = f"deviceName {sighting.name[:64]!r} is not a DNS name" if sighting.name else "no deviceName"
    return Skip(
        label(sighting),
        "NoDeviceIdentifier",
        f"no usable identifier: azureADDeviceId is absent or all-zero, and {named}",
    )


def comment(sighting: Sighting, name: str | None, default: str) -> str:
    """What Defender records on the machine action: the Intune action, who did it and when."""
    what = f"Intune {sighting.action} of {name or 'a device'} (managed device {sighting.intune_id})"
    if sighting.source == "audit":
        who = sighting.actor or "an unknown actor"
        text = f"{what} by {who} at {iso(sighting.at)}; seen in the Intune audit log by {CALLER}"
    else:
        text = (
            f"{what}: managementState {sighting.state} at {iso(sighting.at)} (who and when: no audit "
            f"event read yet); seen by {CALLER}"
        )
    return generated_comment(text, default)


def idempotency_key(intune_id: str, action: Action, opened_at: datetime, mode: Mode) -> str:
    """The retirement itself: the device, its first action, and when the watcher first saw it."""
    key = f"{CALLER}:{intune_id}:{action}:{opened_at.astimezone(UTC):%Y%m%dT%H%M%SZ}"
    return key + (":report" if mode == "report" else "")


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def label(sighting: Sighting) -> str:
    shown = f" ({sighting.name[:64]})" if sighting.name else ""
    return f"Intune {sighting.action} of managed device {sighting.intune_id}{shown}"


@dataclass(frozen=True)
class Retirement:
    """A ledger row: one device's leaving, and what the watcher did about it."""

    intune_id: str
    action: Action  # the first action seen; `actions` has every one since
    source: str  # "audit" or "device": where the first sign came from
    at: datetime  # when it happened (audit) or was first seen (listing)
    opened_at: datetime
    comment: str
    key: str
    lookup: Lookup | None  # None: skipped, see `outcome`
    name: str | None = None
    actor: str | None = None
    actions: tuple[str, ...] = ()
    request_id: str | None = None
    outcome: str | None = None
    settled: bool = False
    attempts: int = 0
    error: str | None = None
    etag: str | None = None


def open_retirement(sighting: Sighting, now: datetime, mode: Mode, default_comment: str) -> Retirement:
    """The ledger row a device's first sign opens: settled at once when it cannot be used."""
    found = identify(sighting)
    row = Retirement(
        intune_id=sighting.intune_id,
        action=sighting.action,
        source=sighting.source,
        at=sighting.at,
        opened_at=now,
        comment=comment(sighting, sighting.name, default_comment),
        key=idempotency_key(sighting.intune_id, sighting.action, now, mode),
        lookup=found if isinstance(found, Lookup) else None,
        name=sighting.name,
        actor=sighting.actor,
        actions=(sighting.action,),
    )
    if isinstance(found, Skip):
        return replace(row, outcome=found.code, settled=True, error=found.message)
    return row


def offboard_request(row: Retirement, mode: Mode) -> OffboardRequest:
    """The request every caller's payload becomes; report mode makes it a dry run."""
    assert row.lookup is not None
    return OffboardRequest(None, row.comment, row.lookup, dry_run=mode == "report")


# ---- what an answer from the intake means ----------------------------------------------


@dataclass(frozen=True)
class Settlement:
    """What became of one retirement's submission."""

    settled: bool  # final: accepted, or skipped for a recorded reason
    outcome: str  # Queued, Held, Existing, Replayed; or the refusal's code
    request_id: str | None = None
    error: str | None = None
    storage_failed: bool = False  # stop submitting: storage is down, nothing else would pass


def settlement(answer: Answer | Refusal, attempts: int) -> Settlement:
    """`attempts` counts this one."""
    if isinstance(answer, ServiceUnavailable):
        return Settlement(False, answer.code, error=answer.message, storage_failed=True)
    if isinstance(answer, RequestConflict):
        # Another run, or another caller, is accepting this device right now: next run.
        settled = attempts >= MAX_ATTEMPTS
        return Settlement(settled, answer.code, error=answer.message)
    if isinstance(answer, Refusal):
        return Settlement(True, answer.code, error=answer.message)
    body = answer.body
    request_id = body.get("requestId")
    if body.get("status") == "Held":
        outcome = "Held"
    elif body.get("replayed"):
        outcome = "Replayed"
    elif body.get("existingRequest"):
        outcome = "Existing"
    else:
        outcome = "Queued"
    return Settlement(True, outcome, request_id if isinstance(request_id, str) else None)


# ---- the checkpoint and the ledger -----------------------------------------------------


def audit_since(checkpoint: datetime | None, started: datetime, lookback: timedelta = LOOKBACK) -> datetime:
    """Where this run reads audit events from."""
    return (checkpoint or started) - lookback


def next_checkpoint(
    old: datetime | None,
    *,
    complete: bool,
    newest: datetime | None,
    unsettled: Iterable[datetime],
    started: datetime,
    lookback: timedelta = LOOKBACK,
) -> datetime | None:
    """Every retirement event at or before the result is settled.

    Only a complete read moves it (pages are not assumed to be in time order); it stops
    just before the earliest event whose retirement is not settled; with nothing newer it
    still reaches `started - lookback` (anything Graph shows that late is read again from
    there); and it never goes back."""
    if not complete:
        return old
    candidate = max(t for t in (newest, started - lookback) if t is not None)
    pending = min(unsettled, default=None)
    if pending is not None:
        candidate = min(candidate, pending - timedelta(microseconds=1))
    return candidate if old is None or candidate > old else old


def prunable(
    opened_at: datetime,
    settled: bool,
    leaving_now: bool,
    checkpoint: datetime | None,
    *,
    listing_complete: bool,
    lookback: timedelta = LOOKBACK,
    margin: timedelta = LEDGER_MARGIN,
) -> bool:
    """A ledger row may go once no run can see its leaving again: settled, its device not
    leaving in a complete listing, and opened long before anything the audit read re-reads."""
    if not settled or leaving_now or not listing_complete or checkpoint is None:
        return False
    return opened_at < checkpoint - lookback - margin


# ---- the inventory ---------------------------------------------------------------------


@dataclass(frozen=True)
class Known:
    """An inventory row as read."""

    device: Device
    gone_at: datetime | None = None
    etag: str = ""


@dataclass(frozen=True)
class InventoryChanges:
    upserts: tuple[Device, ...] = ()  # new, changed, or back after being gone
    gone: tuple[str, ...] = ()  # no longer listed: marked with when
    removed: tuple[str, ...] = ()  # gone for longer than the grace period

    def __len__(self) -> int:
        return len(self.upserts) + len(self.gone) + len(self.removed)


def inventory_changes(
    known: Mapping[str, Known],
    listed: Mapping[str, Device],
    *,
    complete: bool,
    now: datetime,
    grace: timedelta = INVENTORY_GRACE,
) -> InventoryChanges:
    """Only what changed. A device missing from an incomplete listing may just be on a page
    not read: only a complete listing marks devices gone, and removes them after `grace`."""
    upserts = tuple(
        device
        for intune_id, device in listed.items()
        if intune_id not in known or known[intune_id].device != device or known[intune_id].gone_at
    )
    if not complete:
        return InventoryChanges(upserts)
    missing = [k for k in known.values() if k.device.intune_id not in listed]
    gone = tuple(k.device.intune_id for k in missing if k.gone_at is None)
    removed = tuple(k.device.intune_id for k in missing if k.gone_at is not None and now - k.gone_at > grace)
    return InventoryChanges(upserts, gone, removed)


# ---- Graph's answers -------------------------------------------------------------------


@dataclass(frozen=True)
class PageRead:
    items: list[Any]
    next_link: str | None
    skip: Skip | None = None  # the page's content was unusable (its link was still followed)


@dataclass(frozen=True)
class Wait:
    """Ask again, for the same page, after `seconds`."""

    seconds: float
    code: str
    message: str
    throttled: bool = False


@dataclass(frozen=True)
class Stop:
    """This read ends here; the run goes on without the rest of it, and the next run reads it."""

    code: str
    message: str
    retry_after: float | None = None  # Graph asked for a longer wait than a run can spend
    configuration: bool = False


@dataclass(frozen=True)
class GraphPolicy:
    max_tries: int = 5  # per page
    base_seconds: float = 1.0  # backoff without Retry-After: 1, 2, 4, 8 s (equal jitter)
    max_backoff_seconds: float = 30.0
    max_inline_wait: float = 30.0  # a longer Retry-After ends the read and is kept for the next run


TRANSIENT = frozenset({408, 500, 502, 503, 504})


def read_answer(
    result: requests.Response | DefenderCallError,
    *,
    tries: int,
    now: datetime,
    rng: random.Random,
    permission: str,
    same_origin: Callable[[str], bool],
    policy: GraphPolicy = GraphPolicy(),
) -> PageRead | Wait | Stop:
    """What one Graph answer means for the read. `tries` counts the failed tries of this
    page before this answer."""
    if isinstance(result, TokenUnavailable):
        if tries + 1 < min(3, policy.max_tries):
            return _backoff("TokenUnavailable", str(result), tries, rng, policy)
        return Stop(
            "TokenUnavailable",
            f"the managed identity gave no token for Graph ({result}); check the app's identity, "
            "MANAGED_IDENTITY_CLIENT_ID and GRAPH_API_SCOPE",
            configuration=True,
        )
    if isinstance(result, DefenderCallError):
        return _transient(type(result).__name__, str(result), tries, rng, policy)
    status = result.status_code
    if status == 200:
        return _page(result, tries, rng, policy, same_origin)
    code, detail = error_of(result)
    if status == 429 or (status in TRANSIENT and result.headers.get("Retry-After")):
        asked = parse_retry_after(result.headers.get("Retry-After"), now)
        if asked is None:  # Graph: without Retry-After, back off exponentially
            return _transient(code or f"Http{status}", detail, tries, rng, policy, throttled=status == 429)
        if asked > policy.max_inline_wait or tries + 1 >= policy.max_tries:
            return Stop(
                code or "TooManyRequests", f"Graph asked to wait {asked:g}s: {detail}", retry_after=asked
            )
        return Wait(asked, code or "TooManyRequests", detail, throttled=status == 429)
    if status in TRANSIENT or status >= 500:
        return _transient(code or f"Http{status}", detail, tries, rng, policy)
    if status == 401:
        return Stop(
            code or "Unauthorized",
            f"Graph refused the token ({detail or 'no detail'}); check GRAPH_API_SCOPE matches "
            "GRAPH_API_BASE_URL's cloud",
            configuration=True,
        )
    if status == 403:
        return Stop(
            code or "Forbidden",
            f"Graph denied the read ({detail or 'no detail'}); grant the managed identity the "
            f"Microsoft Graph application permission {permission} (infra/grant-permissions.sh "
            "--with-intune)",
            configuration=True,
        )
    if 300 <= status < 400:
        return Stop("Redirect", f"Graph answered {status}; redirects are not followed")
    return Stop(code or f"Http{status}", detail or f"Graph answered {status}")


def _page(
    result: requests.Response,
    tries: int,
    rng: random.Random,
    policy: GraphPolicy,
    same_origin: Callable[[str], bool],
) -> PageRead | Wait | Stop:
    try:
        body = result.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        # A cut-off body or a proxy's page is worth another try; then the read stops.
        what = "not JSON" if body is None else "not a JSON object"
        outcome = _transient("InvalidGraphPage", f"a Graph page was {what}", tries, rng, policy)
        return outcome if isinstance(outcome, Wait) else Stop("InvalidGraphPage", f"a Graph page was {what}")
    link = body.get("@odata.nextLink")
    if link is not None and (not isinstance(link, str) or not same_origin(link)):
        return Stop(
            "InvalidGraphPage", "the page's @odata.nextLink is not a link on GRAPH_API_BASE_URL's host"
        )
    value = body.get("value")
    if not isinstance(value, list):
        skip = Skip(
            "a Graph page", "InvalidGraphPage", "the page has no 'value' list; its items were skipped"
        )
        return PageRead([], link, skip)
    return PageRead(value, link)


def _transient(
    code: str, detail: str, tries: int, rng: random.Random, policy: GraphPolicy, *, throttled: bool = False
) -> Wait | Stop:
    if tries + 1 >= policy.max_tries:
        return Stop(code, f"{detail or code} ({tries + 1} tries)")
    return _backoff(code, detail, tries, rng, policy, throttled=throttled)


def _backoff(
    code: str, detail: str, tries: int, rng: random.Random, policy: GraphPolicy, *, throttled: bool = False
) -> Wait:
    ceiling = min(policy.max_backoff_seconds, policy.base_seconds * 2.0 ** min(tries, 30))
    return Wait(ceiling / 2 + rng.uniform(0, ceiling / 2), code, detail, throttled)


# ---- small helpers ---------------------------------------------------------------------


def _text(value: Any) -> str | None:
    return value.strip()[:_TEXT] or None if isinstance(value, str) else None


def _aad(value: Any) -> str | None:
    text = value.strip().strip('"') if isinstance(value, str) else ""
    if not GUID.fullmatch(text) or text == EMPTY_GUID:
        return None
    return text.lower()


def _properties(value: Any) -> dict[str, str]:
    """modifiedProperties by lower-cased name: the new value, else the old one."""
    found: dict[str, str] = {}
    for prop in value if isinstance(value, list) else []:
        if not isinstance(prop, dict) or not isinstance(prop.get("displayName"), str):
            continue
        for side in ("newValue", "oldValue"):
            text = prop.get(side)
            if isinstance(text, str) and text.strip().strip('"'):
                found.setdefault(prop["displayName"].lower(), text.strip().strip('"'))
                break
    return found


def _skip(item: str, code: str, message: str, raw: Any) -> Skip:
    return Skip(item, code, message, fingerprint(code, raw))


def fingerprint(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20]
