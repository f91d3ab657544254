"""Which Defender record a request means: exactly one machine for a lookup, and the offboard
action to follow when Defender says one is already pending. Pure: each rule is a unit test.

Exactly one match or nothing: zero machines is `DeviceNotFound`; several is
`AmbiguousDevice` with their ids, because offboarding "the first" of two machines with the
same name is how the wrong device gets offboarded. Each returned machine is checked again
against the lookup here (exact, case-insensitive), so a filter that matched more loosely
than `eq` could never widen the result.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from .devices import FILTER_FIELD, Lookup
from .messages import ACTION_ID, MACHINE_ID
from .outcome import Failed

log = logging.getLogger(__name__)
_LISTED_CANDIDATES = 10
OPEN_ACTION_STATUSES = ("Pending", "InProgress")


def choose(lookup: Lookup, body: dict[str, Any]) -> str | Failed:
    """Exactly one machine id from a `GET /api/machines` answer, or why not."""
    machines = body.get("value")
    if not isinstance(machines, list):
        return Failed("InvalidLookupResponse", "Defender's machine list had no 'value' array")
    field = FILTER_FIELD[lookup.by]
    candidates: list[str] = []
    for machine in machines:
        if not isinstance(machine, dict):
            continue
        machine_id, value = machine.get("id"), machine.get(field)
        if not isinstance(machine_id, str) or not MACHINE_ID.fullmatch(machine_id.lower()):
            continue
        if not isinstance(value, str) or value.lower() != lookup.value.lower():
            log.warning("Device lookup %s=%s: ignored a non-exact match", lookup.by, lookup.value)
            continue
        if machine_id.lower() not in candidates:
            candidates.append(machine_id.lower())
    described = f"{field} {lookup.value!r}"
    if body.get("@odata.nextLink"):
        # More than a page matched an exact comparison: whatever it is, it is not one device.
        return Failed("AmbiguousDevice", f"more than one page of Defender machines have {described}")
    if not candidates:
        return Failed("DeviceNotFound", f"no Defender machine has {described}")
    if len(candidates) > 1:
        listed = ", ".join(candidates[:_LISTED_CANDIDATES])
        more = (
            f" and {len(candidates) - _LISTED_CANDIDATES} more"
            if len(candidates) > _LISTED_CANDIDATES
            else ""
        )
        return Failed(
            "AmbiguousDevice",
            f"{len(candidates)} Defender machines have {described}: {listed}{more}; "
            "offboard the right one by machineId",
        )
    return candidates[0]


def pending_action(body: Any, since: datetime | None = None) -> str | None:
    """The offboard action to follow from a `GET /api/machineactions` answer: the newest one
    still open, or, when `since` is given (an earlier delivery of this request may already
    have called), the newest one created since then, whatever its status. None if none."""
    actions = body.get("value") if isinstance(body, dict) else None
    found: list[tuple[str, str]] = []  # (creationDateTimeUtc as sent, id): ISO 8601 sorts as text
    for action in actions if isinstance(actions, list) else []:
        if not isinstance(action, dict) or not isinstance(action.get("id"), str):
            continue
        if not ACTION_ID.fullmatch(action["id"]) or action.get("type", "Offboard") != "Offboard":
            continue
        created = str(action.get("creationDateTimeUtc") or "")
        if since is None:
            wanted = action.get("status") in OPEN_ACTION_STATUSES
        else:
            at = _time(created)
            wanted = at is not None and at >= since
        if wanted:
            found.append((created, action["id"]))
    return max(found)[1] if found else None


def _time(value: str) -> datetime | None:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
