"""Microsoft Sentinel playbooks: the incident trigger body, the alert trigger body, or a
plain `{"Entities": [...]}` (what a playbook's "for each host" loop posts).

Only `host` entities name devices. Each one is identified by, in order: `MdatpDeviceId` (the
Defender machine id), `AadDeviceId`, then `FQDN` or `HostName` + `DnsDomain` (a DNS name).
A bare host name is not used: without its domain it names too many machines to be safe.
Incident entities carry these as camelCase `properties` (some under `additionalData`), alert
entities as PascalCase fields; names are matched case-insensitively for that reason.
"""

from __future__ import annotations

import json
from typing import Any

from ...domain.devices import EMPTY_GUID
from ...domain.errors import InvalidInput
from ...domain.offboard import OffboardRequest
from .. import validate as intake
from .native import lookup_of
from .results import MAX_ITEMS, Accepted, Ignored, Item, Items, Rejected


def is_incident(payload: dict[str, Any]) -> bool:
    obj = payload.get("object")
    return (
        isinstance(obj, dict)
        and isinstance(obj.get("properties"), dict)
        and ("objectSchemaType" in payload or "relatedEntities" in obj["properties"])
    )


def is_alert(payload: dict[str, Any]) -> bool:
    return "SystemAlertId" in payload and "Entities" in payload


def is_entities(payload: dict[str, Any]) -> bool:
    return _get(payload, "entities") is not None


def incident(payload: dict[str, Any], default_comment: str) -> Items:
    props = payload["object"]["properties"]
    number, title, url = props.get("incidentNumber"), props.get("title"), props.get("incidentUrl")
    text = f"Sentinel incident {number}: {title or ''} {url or ''}" if number is not None else ""
    comment = intake.generated_comment(text, default_comment)
    entities = props.get("relatedEntities")
    if entities is None:
        entities = []
    return Items("sentinel-incident", _hosts(entities, comment, empty_is_error=False))


def alert(payload: dict[str, Any], default_comment: str) -> Items:
    name, alert_id = payload.get("AlertDisplayName"), payload.get("SystemAlertId")
    comment = intake.generated_comment(f"Sentinel alert {alert_id}: {name or ''}", default_comment)
    return Items("sentinel-alert", _hosts(_entity_list(payload["Entities"]), comment, empty_is_error=False))


def entities(payload: dict[str, Any], default_comment: str) -> Items:
    comment = intake.comment_of(payload.get("comment"), default_comment)
    return Items("sentinel-entities", _hosts(_entity_list(_get(payload, "entities")), comment, True))


def _entity_list(value: Any) -> list[Any]:
    # The alert trigger has carried Entities both as an array and as a JSON string of one.
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise InvalidInput("InvalidEntities", "Entities is a string but not a JSON array") from None
    if not isinstance(value, list):
        raise InvalidInput("InvalidEntities", "Entities must be an array of entities")
    return value


def _hosts(entities: list[Any], comment: str, empty_is_error: bool) -> list[Item]:
    if not isinstance(entities, list):
        raise InvalidInput("InvalidEntities", "relatedEntities must be an array of entities")
    if not entities and empty_is_error:
        raise InvalidInput("EmptyEntities", "the Entities list is empty; send at least one host entity")
    hosts = [(i, e) for i, e in enumerate(entities) if isinstance(e, dict) and _kind(e) == "host"]
    if not hosts:
        return [Ignored("entities", f"no host entities among {len(entities)} entities; nothing to offboard")]
    if len(hosts) > MAX_ITEMS:
        raise InvalidInput("BatchTooLarge", f"{len(hosts)} host entities; at most {MAX_ITEMS} per call")
    return [_host(i, e, comment) for i, e in hosts]


def _host(index: int, entity: dict[str, Any], comment: str) -> Item:
    name = _field(entity, "hostName") or _field(entity, "friendlyName")
    label = f"entities[{index}] (host {str(name)[:64]})" if name else f"entities[{index}] (host)"
    try:
        return Accepted(label, _request(entity, comment))
    except InvalidInput as exc:
        return Rejected(label, exc.code, exc.message)


def _request(entity: dict[str, Any], comment: str) -> OffboardRequest:
    machine_id = _field(entity, "mdatpDeviceId")
    if machine_id:
        return OffboardRequest(intake.machine_id_of(machine_id), comment)
    aad = _field(entity, "aadDeviceId")
    if aad and aad != EMPTY_GUID:
        return OffboardRequest(None, comment, lookup_of("aadDeviceId", aad))
    fqdn = _field(entity, "fqdn")
    host, domain = _field(entity, "hostName"), _field(entity, "dnsDomain")
    if not fqdn and host and domain:
        fqdn = f"{host}.{domain}"
    if fqdn:
        return OffboardRequest(None, comment, lookup_of("deviceName", fqdn))
    raise InvalidInput(
        "NoDeviceIdentifier",
        "the host entity has no MdatpDeviceId, AadDeviceId, FQDN or HostName with DnsDomain",
    )


def _kind(entity: dict[str, Any]) -> str:
    value = _get(entity, "type") if _get(entity, "kind") is None else _get(entity, "kind")
    return value.lower() if isinstance(value, str) else ""


def _field(entity: dict[str, Any], name: str) -> str | None:
    """A string field of the entity, its `properties`, or their `additionalData`."""
    places: list[Any] = [entity, _get(entity, "properties")]
    places += [_get(p, "additionalData") for p in places if isinstance(p, dict)]
    for place in places:
        if isinstance(place, dict):
            value = _get(place, name)
            if isinstance(value, str) and value.strip():
                return value.strip()
    return None


def _get(mapping: dict[str, Any], name: str) -> Any:
    lowered = name.lower()
    for key, value in mapping.items():
        if key.lower() == lowered:
            return value
    return None
