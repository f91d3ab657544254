"""Event Grid webhooks (Event Grid event schema): one event or an array of them.

A new subscription first sends `Microsoft.EventGrid.SubscriptionValidationEvent` (header
`aeg-event-type: SubscriptionValidation`); answering `{"validationResponse": code}` proves we
own the endpoint. After that, events of type `Defender.Offboard.Requested` carry a native
request in `data`; any other event type is acknowledged and ignored, never retried.
"""

from __future__ import annotations

import json
from typing import Any

from ...domain.errors import InvalidInput
from .native import item_of
from .results import MAX_ITEMS, OFFBOARD_EVENT_TYPE, Handshake, Ignored, Inbound, Item, Items, Rejected

VALIDATION_EVENT = "Microsoft.EventGrid.SubscriptionValidationEvent"


def is_eventgrid(inbound: Inbound, payload: Any) -> bool:
    if "aeg-event-type" in inbound.headers:
        return True
    events = payload if isinstance(payload, list) else [payload]
    return bool(events) and all(isinstance(e, dict) and "eventType" in e for e in events)


def recognise(inbound: Inbound, payload: Any, default_comment: str) -> Handshake | Items:
    events = payload if isinstance(payload, list) else [payload]
    if not events:
        raise InvalidInput("InvalidBody", "the Event Grid delivery has no events")
    for event in events:
        if isinstance(event, dict) and event.get("eventType") == VALIDATION_EVENT:
            return _validation(event)
    if inbound.headers.get("aeg-event-type", "").lower() == "subscriptionvalidation":
        raise InvalidInput("InvalidBody", f"a SubscriptionValidation delivery without a {VALIDATION_EVENT}")
    if len(events) > MAX_ITEMS:
        raise InvalidInput(
            "BatchTooLarge",
            f"{len(events)} events in one delivery; at most {MAX_ITEMS} (set maxEventsPerBatch)",
        )
    return Items("eventgrid", [_event(i, e, default_comment) for i, e in enumerate(events)])


def _validation(event: dict[str, Any]) -> Handshake:
    data = event.get("data")
    code = data.get("validationCode") if isinstance(data, dict) else None
    if not isinstance(code, str) or not code:
        raise InvalidInput("InvalidBody", "the subscription validation event has no validationCode")
    return Handshake(
        "eventgrid-validation", 200, json.dumps({"validationResponse": code}), "application/json"
    )


def _event(index: int, event: Any, default_comment: str) -> Item:
    if not isinstance(event, dict):
        return Rejected(f"events[{index}]", "InvalidBody", "an event must be a JSON object")
    event_id = event.get("id")
    label = f"event {event_id}" if isinstance(event_id, str) and event_id else f"events[{index}]"
    event_type = event.get("eventType")
    if event_type != OFFBOARD_EVENT_TYPE:
        return Ignored(label, f"event type {str(event_type)[:100]!r} is not {OFFBOARD_EVENT_TYPE!r}")
    return item_of(label, event.get("data"), default_comment)
