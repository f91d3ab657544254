"""CloudEvents 1.0 over HTTP webhooks: structured (`application/cloudevents+json`, or a JSON
object with `specversion`), batched (`application/cloudevents-batch+json`), or binary (the
attributes in `ce-*` headers and the request as the body).

Before delivering, a sender asks with `OPTIONS` and `WebHook-Request-Origin` whether it may
(the CloudEvents webhook abuse protection). We consent for any origin: the handshake proves
the endpoint wants events, it is not authentication; the function key in the URL is that.
"""

from __future__ import annotations

from typing import Any

from ...domain.errors import InvalidInput
from .native import item_of
from .results import MAX_ITEMS, OFFBOARD_EVENT_TYPE, Handshake, Ignored, Inbound, Item, Items, Rejected

SPEC_VERSION = "1.0"
_ORIGIN_LIMIT = 255


def handshake(inbound: Inbound) -> Handshake:
    origin = inbound.headers.get("webhook-request-origin", "").strip()
    if not origin:
        raise InvalidInput(
            "MissingWebHookRequestOrigin",
            "OPTIONS is only the CloudEvents webhook handshake; send WebHook-Request-Origin",
        )
    if len(origin) > _ORIGIN_LIMIT or not all(" " < ch <= "~" for ch in origin):
        raise InvalidInput("InvalidWebHookRequestOrigin", "WebHook-Request-Origin is not a host name")
    headers = {"WebHook-Allowed-Origin": origin, "WebHook-Allowed-Rate": "*", "Allow": "POST, OPTIONS"}
    return Handshake("cloudevents-validation", 200, "", "text/plain", headers)


def is_binary(inbound: Inbound) -> bool:
    return "ce-specversion" in inbound.headers


def is_structured(inbound: Inbound, payload: Any) -> bool:
    if inbound.headers.get("content-type", "").startswith("application/cloudevents"):
        return True
    events = payload if isinstance(payload, list) else [payload]
    return bool(events) and all(isinstance(e, dict) and "specversion" in e for e in events)


def binary(inbound: Inbound, payload: Any, default_comment: str) -> Items:
    attributes = {
        "specversion": inbound.headers.get("ce-specversion"),
        "type": inbound.headers.get("ce-type"),
        "id": inbound.headers.get("ce-id"),
        "data": payload,
    }
    return Items("cloudevents", [_event(0, attributes, default_comment)])


def structured(payload: Any, default_comment: str) -> Items:
    events = payload if isinstance(payload, list) else [payload]
    if not events:
        raise InvalidInput("InvalidBody", "the CloudEvents batch is empty")
    if len(events) > MAX_ITEMS:
        raise InvalidInput("BatchTooLarge", f"{len(events)} events in one delivery; at most {MAX_ITEMS}")
    return Items("cloudevents", [_event(i, e, default_comment) for i, e in enumerate(events)])


def _event(index: int, event: Any, default_comment: str) -> Item:
    if not isinstance(event, dict):
        return Rejected(f"events[{index}]", "InvalidBody", "an event must be a JSON object")
    event_id = event.get("id")
    label = f"event {event_id}" if isinstance(event_id, str) and event_id else f"events[{index}]"
    if event.get("specversion") != SPEC_VERSION:
        return Rejected(label, "InvalidCloudEvent", f"specversion must be {SPEC_VERSION!r}")
    if event.get("type") != OFFBOARD_EVENT_TYPE:
        return Ignored(label, f"event type {str(event.get('type'))[:100]!r} is not {OFFBOARD_EVENT_TYPE!r}")
    if "data_base64" in event:
        return Rejected(label, "InvalidCloudEvent", "send data as JSON, not data_base64")
    return item_of(label, event.get("data"), default_comment)
