"""Caller payloads: recognise which caller sent a request and turn it into offboard requests.

Every caller posts to the one `POST /api/offboard` route (plus `OPTIONS` there for the
CloudEvents handshake). `recognise()` picks the adapter from the method, headers, query and
the payload's shape, and returns either a handshake to answer as is, or per-item results.
A payload error that concerns the whole call raises `InvalidInput`. A payload-level
`tenantId` (a customer tenant, see OFFBOARD_TENANTS) applies to every item that names none.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ...domain.errors import InvalidInput
from .. import validate as intake
from . import azuremonitor, cloudevents, eventgrid, graph, intune, native, sentinel
from .results import (
    FORMATS_UNDERSTOOD,
    MAX_ITEMS,
    OFFBOARD_EVENT_TYPE,
    Accepted,
    Handshake,
    Ignored,
    Inbound,
    Item,
    Items,
    Rejected,
)

__all__ = [
    "FORMATS_UNDERSTOOD",
    "MAX_ITEMS",
    "OFFBOARD_EVENT_TYPE",
    "Accepted",
    "Handshake",
    "Ignored",
    "Inbound",
    "Item",
    "Items",
    "Rejected",
    "recognise",
]


def recognise(inbound: Inbound, default_comment: str) -> Handshake | Items:
    if inbound.method == "OPTIONS":
        return cloudevents.handshake(inbound)
    if graph.is_validation(inbound.params):
        return graph.handshake(inbound.params["validationToken"])
    payload = intake.read_json(inbound.body)
    # Binary CloudEvents and Event Grid are told apart by headers before the body's shape.
    if cloudevents.is_binary(inbound):
        return cloudevents.binary(inbound, payload, default_comment)
    if eventgrid.is_eventgrid(inbound, payload):
        return eventgrid.recognise(inbound, payload, default_comment)
    if cloudevents.is_structured(inbound, payload):
        return cloudevents.structured(payload, default_comment)
    if not isinstance(payload, dict):
        raise InvalidInput(
            "InvalidBody", "the body must be a JSON object; formats understood: " + FORMATS_UNDERSTOOD
        )
    return _with_tenant(_object(payload, default_comment), intake.tenant_id_of(payload.get("tenantId")))


def _with_tenant(items: Items, tenant: str | None) -> Items:
    if tenant is None:
        return items
    return replace(
        items,
        items=[
            replace(item, request=replace(item.request, tenant_id=tenant))
            if isinstance(item, Accepted) and item.request.tenant_id is None
            else item
            for item in items.items
        ],
    )


def _object(payload: dict[str, Any], default_comment: str) -> Items:
    if azuremonitor.is_alert(payload):
        return azuremonitor.alert(payload, default_comment)
    if graph.is_notification(payload):
        return graph.notifications(payload, default_comment)
    if intune.is_device_list(payload):
        return intune.device_list(payload, default_comment)
    if intune.is_managed_device(payload):
        return intune.single(payload, default_comment)
    if sentinel.is_incident(payload):
        return sentinel.incident(payload, default_comment)
    if sentinel.is_alert(payload):
        return sentinel.alert(payload, default_comment)
    if sentinel.is_entities(payload):
        return sentinel.entities(payload, default_comment)
    if native.is_batch(payload):
        return native.batch(payload, default_comment)
    # Anything else is read as the original single request: `{}` is still "MissingMachineId",
    # whose message lists every format understood.
    return native.single(payload, default_comment)
