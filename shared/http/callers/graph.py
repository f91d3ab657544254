"""Microsoft Graph change notifications.

Creating a subscription makes Graph POST to the notification URL with `?validationToken=`;
the token must come back as `text/plain` within 10 seconds. Notifications then arrive as
`{"value": [...]}`. Graph has no subscriptions on Intune `managedDevices`, so only a
notification whose (rich) `resourceData` is a managedDevice names a device here; lifecycle
notifications and anything else are acknowledged and ignored with the reason.
"""

from __future__ import annotations

from typing import Any

from ...domain.errors import InvalidInput
from . import intune
from .results import MAX_ITEMS, Handshake, Ignored, Item, Items, Rejected

_TOKEN_LIMIT = 4096


def is_validation(params: dict[str, str] | Any) -> bool:
    return "validationToken" in params


def handshake(token: str) -> Handshake:
    # Echoed verbatim, so it is held to what a Graph token can be: printable, bounded.
    if not token or len(token) > _TOKEN_LIMIT or not all(" " <= ch <= "~" for ch in token):
        raise InvalidInput("InvalidValidationToken", "validationToken must be printable ASCII, 1-4096 chars")
    return Handshake("graph-validation", 200, token, "text/plain")


def is_notification(payload: dict[str, Any]) -> bool:
    value = payload.get("value")
    return isinstance(value, list) and any(
        isinstance(n, dict) and ("changeType" in n or "lifecycleEvent" in n or "subscriptionId" in n)
        for n in value
    )


def notifications(payload: dict[str, Any], default_comment: str) -> Items:
    value = payload["value"]
    if len(value) > MAX_ITEMS:
        raise InvalidInput("BatchTooLarge", f"{len(value)} notifications; at most {MAX_ITEMS} per call")
    return Items("graph", [_notification(i, n, default_comment) for i, n in enumerate(value)])


def _notification(index: int, notification: Any, default_comment: str) -> Item:
    label = f"value[{index}]"
    if not isinstance(notification, dict):
        return Rejected(label, "InvalidBody", "a notification must be a JSON object")
    if "lifecycleEvent" in notification:
        return Ignored(label, f"lifecycle notification {str(notification['lifecycleEvent'])[:40]!r}")
    data = notification.get("resourceData")
    if not intune.is_managed_device(data):
        resource = str(notification.get("resource"))[:100]
        return Ignored(label, f"resource {resource!r} is not an Intune managedDevice")
    assert isinstance(data, dict)
    deleted = notification.get("changeType") == "deleted"
    return intune.device_item(label, data, default_comment, deleted=deleted)
