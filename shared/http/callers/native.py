"""The app's own format: one request, or a batch of them under "requests".

A device is named by `machineId` (the Defender id), else `aadDeviceId`, else `deviceName`;
the first present wins, in that order, so a caller that also sends the others (they were
ignored unknown fields before) keeps the behaviour it had.
"""

from __future__ import annotations

from typing import Any

from ...domain.devices import InvalidLookup, Lookup
from ...domain.errors import InvalidInput
from ...domain.offboard import OffboardRequest
from .. import validate as intake
from .results import FORMATS_UNDERSTOOD, MAX_ITEMS, Accepted, Item, Items, Rejected

_LOOKUP_ERRORS = {"aadDeviceId": "InvalidAadDeviceId", "deviceName": "InvalidDeviceName"}


def is_batch(payload: dict[str, Any]) -> bool:
    return "requests" in payload


def single(payload: dict[str, Any], default_comment: str) -> Items:
    return Items("native", [Accepted("request", request_of(payload, default_comment))], single=True)


def batch(payload: dict[str, Any], default_comment: str) -> Items:
    requests = payload["requests"]
    if not isinstance(requests, list):
        raise InvalidInput("InvalidBody", '"requests" must be a list of requests')
    if not requests:
        raise InvalidInput("EmptyBatch", '"requests" is empty; send at least one request')
    if len(requests) > MAX_ITEMS:
        raise InvalidInput(
            "BatchTooLarge", f'"requests" has {len(requests)} items; at most {MAX_ITEMS} per call'
        )
    # A batch-level comment is the default for its items: one incident, many devices.
    default = intake.comment_of(payload.get("comment"), default_comment)
    return Items("native-batch", [item_of(f"requests[{i}]", r, default) for i, r in enumerate(requests)])


def item_of(label: str, value: Any, default_comment: str) -> Item:
    """One request inside a larger payload: an error is that item's, not the whole call's."""
    try:
        return Accepted(label, request_of(value, default_comment))
    except InvalidInput as exc:
        return Rejected(label, exc.code, exc.message)


def request_of(value: Any, default_comment: str) -> OffboardRequest:
    if not isinstance(value, dict):
        raise InvalidInput("InvalidBody", "a request must be a JSON object")
    comment = intake.comment_of(value.get("comment"), default_comment)
    key = intake.idempotency_key_of(value.get("clientRequestId"))
    dry_run = intake.dry_run_of(value.get("dryRun", False))
    tenant = intake.tenant_id_of(value.get("tenantId"))
    if value.get("machineId") is not None:
        machine_id = intake.machine_id_of(value["machineId"])
        return OffboardRequest(machine_id, comment, client_request_id=key, dry_run=dry_run, tenant_id=tenant)
    for by in ("aadDeviceId", "deviceName"):
        if value.get(by) is not None:
            lookup = lookup_of(by, value[by])
            return OffboardRequest(
                None, comment, lookup, client_request_id=key, dry_run=dry_run, tenant_id=tenant
            )
    raise InvalidInput(
        "MissingMachineId",
        "machineId is required (or aadDeviceId, or deviceName); formats understood: " + FORMATS_UNDERSTOOD,
    )


def lookup_of(by: str, value: Any) -> Lookup:
    try:
        return Lookup.of(by, value)
    except InvalidLookup as exc:
        raise InvalidInput(_LOOKUP_ERRORS.get(by, "InvalidBody"), str(exc)) from None
