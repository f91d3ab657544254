"""Azure Monitor alerts in the common alert schema (an action group's webhook).

The route for Intune retirements that no flow posts: a log search alert on `IntuneAuditLogs`
(retire/wipe/delete operations) split by a dimension that names the device. Each `allOf`
condition with such a dimension is one device; dimension names are matched
case-insensitively: `MdatpDeviceId`/`machineId`, `AzureADDeviceId`/`aadDeviceId`, or
`DeviceName`/`computerDnsName`. Only a `Fired` alert acts; `Resolved` is acknowledged.
"""

from __future__ import annotations

from typing import Any

from ...domain.errors import InvalidInput
from ...domain.offboard import OffboardRequest
from .. import validate as intake
from .native import lookup_of
from .results import MAX_ITEMS, Accepted, Ignored, Item, Items, Rejected

SCHEMA_ID = "azureMonitorCommonAlertSchema"
_MACHINE = {"mdatpdeviceid", "machineid"}
_AAD = {"azureaddeviceid", "aaddeviceid"}
_NAME = {"devicename", "computerdnsname"}


def is_alert(payload: dict[str, Any]) -> bool:
    return payload.get("schemaId") == SCHEMA_ID


def alert(payload: dict[str, Any], default_comment: str) -> Items:
    data = payload.get("data")
    essentials = data.get("essentials") if isinstance(data, dict) else None
    if not isinstance(data, dict) or not isinstance(essentials, dict):
        raise InvalidInput("InvalidBody", "a common alert schema alert needs data.essentials")
    rule, alert_id = essentials.get("alertRule"), essentials.get("alertId")
    if essentials.get("monitorCondition") != "Fired":
        reason = f"monitorCondition is {str(essentials.get('monitorCondition'))[:20]!r}, not 'Fired'"
        return Items("azuremonitor", [Ignored("alert", reason)])
    comment = intake.generated_comment(f"Azure Monitor alert {rule}: {alert_id}", default_comment)
    context = data.get("alertContext")
    condition = context.get("condition") if isinstance(context, dict) else None
    all_of = condition.get("allOf") if isinstance(condition, dict) else None
    if not isinstance(all_of, list) or not all_of:
        return Items("azuremonitor", [_no_dimension("alert")])
    if len(all_of) > MAX_ITEMS:
        raise InvalidInput("BatchTooLarge", f"{len(all_of)} conditions; at most {MAX_ITEMS} per call")
    return Items("azuremonitor", [_condition(f"allOf[{i}]", c, comment) for i, c in enumerate(all_of)])


def _condition(label: str, condition: Any, comment: str) -> Item:
    dimensions = condition.get("dimensions") if isinstance(condition, dict) else None
    found: dict[str, str] = {}
    for dimension in dimensions if isinstance(dimensions, list) else []:
        if isinstance(dimension, dict) and isinstance(dimension.get("name"), str):
            value = dimension.get("value")
            if isinstance(value, str) and value.strip():
                found[dimension["name"].lower()] = value.strip()
    try:
        if value := _first(found, _MACHINE):
            return Accepted(label, OffboardRequest(intake.machine_id_of(value), comment))
        if value := _first(found, _AAD):
            return Accepted(label, OffboardRequest(None, comment, lookup_of("aadDeviceId", value)))
        if value := _first(found, _NAME):
            return Accepted(label, OffboardRequest(None, comment, lookup_of("deviceName", value)))
    except InvalidInput as exc:
        return Rejected(label, exc.code, exc.message)
    return _no_dimension(label)


def _no_dimension(label: str) -> Rejected:
    return Rejected(
        label,
        "NoDeviceIdentifier",
        "split the alert rule by a dimension named AzureADDeviceId, DeviceName or MdatpDeviceId",
    )


def _first(found: dict[str, str], names: set[str]) -> str | None:
    return next((found[name] for name in sorted(names) if name in found), None)
