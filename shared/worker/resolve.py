"""Device resolution: turn a request's lookup (Entra ID device id, DNS name) into exactly one
Defender machine id, or a permanent failure that says why.

Exactly one match or nothing: zero machines is `DeviceNotFound`; several is
`AmbiguousDevice` with their ids, because offboarding "the first" of two machines with the
same name is how the wrong device gets offboarded. Each returned machine is checked again
against the lookup here (exact, case-insensitive), so a filter that matched more loosely
than `eq` could never widen the result.

The lookup costs a Defender API call (`Machine.Read.All`), so it runs in the worker, within
the same retry and outcome rules as the offboard itself.
"""

from __future__ import annotations

import logging
import random
from datetime import datetime
from typing import Any

import requests

from ..adapters.defender import DefenderClient
from ..domain.devices import FILTER_FIELD, Lookup
from ..domain.errors import DefenderCallError
from ..domain.messages import MACHINE_ID, OffboardMessage
from ..domain.outcome import Failed, Requeue, RetryPolicy, Succeeded, classify

log = logging.getLogger(__name__)
READ_PERMISSION = "Machine.Read.All"
_LISTED_CANDIDATES = 10


def find(defender: DefenderClient, lookup: Lookup) -> requests.Response | DefenderCallError:
    """The one place a lookup calls Defender (pace it here with the shared rate limiter's
    "machine-read" budget once that exists)."""
    try:
        return defender.find_machines(lookup.odata_filter())
    except DefenderCallError as exc:
        return exc


def resolve(
    defender: DefenderClient,
    message: OffboardMessage,
    *,
    policy: RetryPolicy,
    now: datetime,
    rng: random.Random,
) -> OffboardMessage | Requeue | Failed:
    """The message with its machine id resolved, or what to do with it instead."""
    assert message.lookup is not None, "only a message with a lookup is resolved"
    lookup = message.lookup
    outcome = classify(
        find(defender, lookup),
        failures=message.failures,
        policy=policy,
        now=now,
        rng=rng,
        permission=READ_PERMISSION,
    )
    if not isinstance(outcome, Succeeded):
        return outcome
    # For a GET, classify's "action" is simply the JSON body: {"value": [machines]}.
    chosen = choose(lookup, outcome.action)
    if isinstance(chosen, Failed):
        return chosen
    log.info(
        "Device resolved: request %s %s=%s is machine %s",
        message.request_id,
        lookup.by,
        lookup.value,
        chosen,
    )
    # Hook for request state (another branch): record `resolvedFrom` -> machine id here.
    return message.resolved(chosen)


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
