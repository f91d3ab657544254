"""Each caller format, from a realistic sample payload, to the internal requests it becomes.

These run `recognise()` in-process (no host, no queue): the end-to-end tests post the same
payloads through the local host to the queue."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from shared.domain.devices import Lookup
from shared.domain.errors import InvalidInput
from shared.domain.offboard import OffboardRequest
from shared.http.access import caller_of
from shared.http.callers import (
    MAX_ITEMS,
    Accepted,
    Handshake,
    Ignored,
    Inbound,
    Items,
    Rejected,
    recognise,
)
from tests.conftest import MACHINE

PAYLOADS = Path(__file__).parent / "payloads"
DEFAULT = "default comment"


def payload(name: str) -> bytes:
    return (PAYLOADS / name).read_bytes()


def items_of(
    body: bytes | Any, headers: dict[str, str] | None = None, params: dict[str, str] | None = None
) -> Items:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    result = recognise(Inbound.of("POST", data, headers or {}, params or {}), DEFAULT)
    assert isinstance(result, Items)
    return result


def bad(body: bytes | Any, headers: dict[str, str] | None = None) -> InvalidInput:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(InvalidInput) as caught:
        recognise(Inbound.of("POST", data, headers or {}, {}), DEFAULT)
    return caught.value


def summary(items: Items) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for item in items.items:
        if isinstance(item, Accepted):
            req = item.request
            out.append(("queued", (req.lookup.by, req.lookup.value) if req.lookup else req.machine_id))
        elif isinstance(item, Rejected):
            out.append(("rejected", item.code))
        else:
            out.append(("ignored", None))
    return out


def test_native_single_is_the_original_request() -> None:
    items = items_of(payload("native-single.json"))
    assert items.single and items.format == "native"
    [item] = items.items
    assert isinstance(item, Accepted)
    assert item.request == OffboardRequest(MACHINE, "IR-1234: compromised")


@pytest.mark.parametrize(
    ("body", "lookup"),
    [
        (
            {"aadDeviceId": "80FE8A4C-2B7E-4A6B-9D3C-2F1E0C5A7B61"},
            Lookup("aadDeviceId", "80fe8a4c-2b7e-4a6b-9d3c-2f1e0c5a7b61"),
        ),
        ({"deviceName": "Desktop-7F3K2.contoso.com"}, Lookup("deviceName", "desktop-7f3k2.contoso.com")),
    ],
)
def test_native_by_other_identifiers(body: dict[str, str], lookup: Lookup) -> None:
    [item] = items_of(body).items
    assert isinstance(item, Accepted)
    assert item.request == OffboardRequest(None, DEFAULT, lookup)


def test_machine_id_wins_over_other_identifiers() -> None:
    [item] = items_of({"machineId": MACHINE, "deviceName": "other"}).items
    assert isinstance(item, Accepted) and item.request.machine_id == MACHINE and item.request.lookup is None


def test_native_batch_is_per_item() -> None:
    items = items_of(payload("native-batch.json"))
    assert not items.single
    assert summary(items) == [
        ("queued", MACHINE),
        ("queued", ("aadDeviceId", "80fe8a4c-2b7e-4a6b-9d3c-2f1e0c5a7b61")),
        ("queued", ("deviceName", "desktop-7f3k2.contoso.com")),
        ("rejected", "InvalidMachineId"),
    ]
    comments = [i.request.comment for i in items.items if isinstance(i, Accepted)]
    assert comments == ["IR-2001: lost laptops", "IR-2001: laptop 2", "IR-2001: lost laptops"]


def test_batch_limits() -> None:
    assert bad({"requests": []}).code == "EmptyBatch"
    assert bad({"requests": {"machineId": MACHINE}}).code == "InvalidBody"
    over = bad({"requests": [{"machineId": MACHINE}] * (MAX_ITEMS + 1)})
    assert over.code == "BatchTooLarge" and str(MAX_ITEMS) in over.message
    assert len(items_of({"requests": [{"machineId": MACHINE}] * MAX_ITEMS}).items) == MAX_ITEMS


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"deviceName": "x' or 1 eq 1 or '"}, "InvalidDeviceName"),
        ({"deviceName": "desktop 1"}, "InvalidDeviceName"),
        ({"deviceName": "a" * 64}, "InvalidDeviceName"),
        ({"deviceName": "-leading.contoso.com"}, "InvalidDeviceName"),
        ({"deviceName": "host.contoso.com."}, "InvalidDeviceName"),
        ({"deviceName": ""}, "InvalidDeviceName"),
        ({"deviceName": 7}, "InvalidDeviceName"),
        ({"aadDeviceId": "not-a-guid"}, "InvalidAadDeviceId"),
        ({"aadDeviceId": "00000000-0000-0000-0000-000000000000"}, "InvalidAadDeviceId"),
        ({"aadDeviceId": "80fe8a4c-2b7e-4a6b-9d3c-2f1e0c5a7b61' or '1"}, "InvalidAadDeviceId"),
    ],
)
def test_bad_identifiers_are_refused(body: dict[str, Any], code: str) -> None:
    assert bad(body).code == code


def test_unknown_shapes_name_the_formats_understood() -> None:
    for body in ({}, {"hostname": "x"}):
        error = bad(body)
        assert error.code == "MissingMachineId"
        assert (
            "Sentinel" in error.message and "Event Grid" in error.message and "CloudEvents" in error.message
        )
    error = bad([1, 2])
    assert error.code == "InvalidBody" and "Intune" in error.message


def test_sentinel_incident_hosts() -> None:
    items = items_of(payload("sentinel-incident.json"))
    assert items.format == "sentinel-incident"
    assert summary(items) == [
        ("queued", MACHINE),  # MdatpDeviceId wins
        ("queued", ("deviceName", "srv-files-01.corp.contoso.com")),  # HostName + DnsDomain
        ("rejected", "NoDeviceIdentifier"),  # a bare host name is not enough
    ]
    first = items.items[0]
    assert isinstance(first, Accepted)
    assert first.request.comment.startswith("Sentinel incident 4711: Multi-stage incident")
    assert "https://portal.azure.com/#asset/" in first.request.comment


def test_sentinel_alert_entities() -> None:
    items = items_of(payload("sentinel-alert.json"))
    assert items.format == "sentinel-alert"
    assert summary(items) == [("queued", "2a6cd9e3f1b04c7d8e9fa0b1c2d3e4f5a6b7c8d9")]
    [item] = items.items
    assert isinstance(item, Accepted) and "c7a6e5d4-b3a2-4f1e-9d0c-8b7a6f5e4d3c" in item.request.comment


def test_sentinel_alert_entities_as_a_json_string() -> None:
    body = json.loads(payload("sentinel-alert.json"))
    body["Entities"] = json.dumps(body["Entities"])
    assert summary(items_of(body)) == [("queued", "2a6cd9e3f1b04c7d8e9fa0b1c2d3e4f5a6b7c8d9")]


def test_sentinel_entities_wrapper_uses_aad_then_name() -> None:
    items = items_of(payload("sentinel-entities.json"))
    assert summary(items) == [("queued", ("aadDeviceId", "6d5c4b3a-2f1e-4d0c-9b8a-7f6e5d4c3b2a"))]
    item = items.items[0]
    assert isinstance(item, Accepted) and item.request.comment.startswith("Sentinel incident 4711")


def test_sentinel_bad_input() -> None:
    assert bad({"Entities": []}).code == "EmptyEntities"
    assert bad({"Entities": "not json"}).code == "InvalidEntities"
    no_host = items_of({"Entities": [{"Type": "account", "Name": "jdoe"}]})
    assert [type(i) for i in no_host.items] == [Ignored]
    injected = items_of({"Entities": [{"Type": "host", "FQDN": "x' or 1 eq 1 or '"}]})
    assert summary(injected) == [("rejected", "InvalidDeviceName")]
    bad_id = items_of({"Entities": [{"Type": "host", "MdatpDeviceId": "1234"}]})
    assert summary(bad_id) == [("rejected", "InvalidMachineId")]


def test_eventgrid_validation_handshake() -> None:
    result = recognise(
        Inbound.of(
            "POST", payload("eventgrid-validation.json"), {"aeg-event-type": "SubscriptionValidation"}, {}
        ),
        DEFAULT,
    )
    assert isinstance(result, Handshake) and result.status == 200
    assert json.loads(result.body) == {"validationResponse": "512d38b6-c7b8-40c8-89fe-f46f9e9622b6"}


def test_eventgrid_events_of_other_types_are_ignored() -> None:
    items = items_of(payload("eventgrid-events.json"), {"aeg-event-type": "Notification"})
    assert items.format == "eventgrid"
    assert summary(items) == [("queued", MACHINE), ("ignored", None)]
    ignored = items.items[1]
    assert isinstance(ignored, Ignored) and "Microsoft.Storage.BlobCreated" in ignored.reason
    accepted = items.items[0]
    assert isinstance(accepted, Accepted) and accepted.request.comment == "CMDB: device decommissioned"


def test_cloudevents_structured_and_batch() -> None:
    single = items_of(
        payload("cloudevents-structured.json"), {"content-type": "application/cloudevents+json"}
    )
    assert summary(single) == [("queued", ("deviceName", "desktop-7f3k2.contoso.com"))]
    batch = items_of(
        payload("cloudevents-batch.json"), {"content-type": "application/cloudevents-batch+json"}
    )
    assert summary(batch) == [
        ("queued", ("aadDeviceId", "80fe8a4c-2b7e-4a6b-9d3c-2f1e0c5a7b61")),
        ("ignored", None),
    ]
    # Without the content type, the shape alone is recognised.
    assert summary(items_of(payload("cloudevents-structured.json"))) == summary(single)


def test_cloudevents_binary_mode() -> None:
    headers = {
        "ce-specversion": "1.0",
        "ce-type": "Defender.Offboard.Requested",
        "ce-id": "42",
        "ce-source": "/x",
    }
    items = items_of({"machineId": MACHINE}, headers)
    assert items.format == "cloudevents" and summary(items) == [("queued", MACHINE)]
    wrong = items_of({"machineId": MACHINE}, {**headers, "ce-specversion": "0.3"})
    assert summary(wrong) == [("rejected", "InvalidCloudEvent")]


def test_cloudevents_options_handshake() -> None:
    result = recognise(
        Inbound.of("OPTIONS", b"", {"WebHook-Request-Origin": "eventgrid.azure.net"}, {}), DEFAULT
    )
    assert isinstance(result, Handshake) and result.status == 200
    assert result.headers["WebHook-Allowed-Origin"] == "eventgrid.azure.net"
    with pytest.raises(InvalidInput) as caught:
        recognise(Inbound.of("OPTIONS", b"", {}, {}), DEFAULT)
    assert caught.value.code == "MissingWebHookRequestOrigin"


def test_graph_validation_token_is_echoed() -> None:
    token = "Validation: Testing client application reachability for subscription Request-Id: 9a8b7c6d"
    result = recognise(
        Inbound.of("POST", b"", {"content-type": "text/plain"}, {"validationToken": token}), DEFAULT
    )
    assert isinstance(result, Handshake) and result.body == token and result.mimetype == "text/plain"
    with pytest.raises(InvalidInput):
        recognise(Inbound.of("POST", b"", {}, {"validationToken": "a\nb<script>"}), DEFAULT)


def test_graph_notifications() -> None:
    items = items_of(payload("graph-notifications.json"))
    assert items.format == "graph"
    assert summary(items) == [
        ("queued", ("aadDeviceId", "6d5c4b3a-2f1e-4d0c-9b8a-7f6e5d4c3b2a")),
        ("ignored", None),  # lifecycle notification
        ("ignored", None),  # a user, not a managed device
    ]


def test_intune_retirement_acts_only_on_devices_leaving() -> None:
    retire = items_of(payload("intune-managed-device-retire.json"))
    assert summary(retire) == [("queued", ("aadDeviceId", "6d5c4b3a-2f1e-4d0c-9b8a-7f6e5d4c3b2a"))]
    item = retire.items[0]
    assert isinstance(item, Accepted) and "retirePending of WS-0042" in item.request.comment
    managed = items_of(payload("intune-managed-device-managed.json"))
    [ignored] = managed.items
    assert isinstance(ignored, Ignored) and "'managed'" in ignored.reason
    listing = items_of(payload("intune-device-list.json"))
    assert summary(listing) == [
        ("queued", ("deviceName", "kiosk-lobby")),  # all-zero AAD id: falls back to the name
        ("rejected", "InvalidDeviceName"),  # "Reception's PC" is not a DNS name
        ("ignored", None),
    ]


def test_azure_monitor_common_alert_schema() -> None:
    items = items_of(payload("azuremonitor-intune-retire.json"))
    assert items.format == "azuremonitor"
    assert summary(items) == [("queued", ("aadDeviceId", "6d5c4b3a-2f1e-4d0c-9b8a-7f6e5d4c3b2a"))]
    resolved = json.loads(payload("azuremonitor-intune-retire.json"))
    resolved["data"]["essentials"]["monitorCondition"] = "Resolved"
    assert [type(i) for i in items_of(resolved).items] == [Ignored]
    no_dimension = json.loads(payload("azuremonitor-intune-retire.json"))
    no_dimension["data"]["alertContext"]["condition"]["allOf"][0]["dimensions"] = []
    assert summary(items_of(no_dimension)) == [("rejected", "NoDeviceIdentifier")]


def test_generated_comments_fit_the_comment_rules() -> None:
    body = json.loads(payload("sentinel-incident.json"))
    body["object"]["properties"]["title"] = "T\x00" + "x" * 2000
    item = items_of(body).items[0]
    assert isinstance(item, Accepted)
    assert len(item.request.comment) <= 1000 and "\x00" not in item.request.comment


def test_principal_headers_are_believed_only_with_app_service_authentication() -> None:
    headers = {"x-ms-client-principal-name": "alice@contoso.com", "user-agent": "curl/8"}
    assert caller_of(headers, "Offboard.Operator", {"WEBSITE_AUTH_ENABLED": "True"}).label == (
        "principal:alice@contoso.com"
    )
    assert caller_of(headers, "Offboard.Operator", {}).label == "agent:curl/8"
