"""Intune device retirement: a `managedDevice` (posted by a Logic App or Power Automate flow,
alone, or as a Graph list `{"value": [...]}`), or one inside a Graph change notification.

Only a device that is really leaving is offboarded: its `managementState` says a retire, wipe
or delete is pending or issued. Any other device is acknowledged and ignored with the reason,
so a flow that posts every changed device does no harm. A managed device has no Defender
machine id: it is resolved by `azureADDeviceId`, else by `deviceName`.
"""

from __future__ import annotations

from typing import Any

from ...domain.devices import EMPTY_GUID
from ...domain.errors import InvalidInput
from ...domain.offboard import OffboardRequest
from .. import validate as intake
from .native import lookup_of
from .results import MAX_ITEMS, Accepted, Ignored, Item, Items, Rejected

LEAVING_STATES = frozenset({"retirepending", "retireissued", "wipepending", "wipeissued", "deletepending"})


def is_managed_device(value: Any) -> bool:
    if not isinstance(value, dict):
        return False
    odata_type = value.get("@odata.type")
    if isinstance(odata_type, str) and odata_type.lower().endswith("manageddevice"):
        return True
    return "managementState" in value and ("azureADDeviceId" in value or "deviceName" in value)


def is_device_list(payload: dict[str, Any]) -> bool:
    value = payload.get("value")
    return isinstance(value, list) and bool(value) and all(is_managed_device(v) for v in value)


def single(payload: dict[str, Any], default_comment: str) -> Items:
    return Items("intune", [device_item("managedDevice", payload, default_comment)])


def device_list(payload: dict[str, Any], default_comment: str) -> Items:
    devices = payload["value"]
    if len(devices) > MAX_ITEMS:
        raise InvalidInput("BatchTooLarge", f"{len(devices)} managed devices; at most {MAX_ITEMS} per call")
    return Items("intune", [device_item(f"value[{i}]", d, default_comment) for i, d in enumerate(devices)])


def device_item(label: str, device: dict[str, Any], default_comment: str, *, deleted: bool = False) -> Item:
    """One managed device. `deleted` says the device itself is gone (a Graph `deleted`
    change), which counts as leaving whatever state it last had."""
    name = device.get("deviceName")
    if isinstance(name, str) and name:
        label = f"{label} ({name[:64]})"
    state = device.get("managementState")
    if not deleted and (not isinstance(state, str) or state.lower() not in LEAVING_STATES):
        return Ignored(label, f"managementState {str(state)[:40]!r} is not a retire, wipe or delete")
    try:
        return Accepted(
            label, _request(device, state if isinstance(state, str) else "deleted", default_comment)
        )
    except InvalidInput as exc:
        return Rejected(label, exc.code, exc.message)


def _request(device: dict[str, Any], state: str, default_comment: str) -> OffboardRequest:
    name, intune_id = device.get("deviceName"), device.get("id")
    comment = intake.generated_comment(
        f"Intune {state} of {name or 'a device'} (managed device {intune_id or 'unknown'})", default_comment
    )
    aad = device.get("azureADDeviceId")
    if isinstance(aad, str) and aad and aad != EMPTY_GUID:
        return OffboardRequest(None, comment, lookup_of("aadDeviceId", aad))
    if isinstance(name, str) and name:
        return OffboardRequest(None, comment, lookup_of("deviceName", name))
    raise InvalidInput("NoDeviceIdentifier", "the managed device has no azureADDeviceId or deviceName")
