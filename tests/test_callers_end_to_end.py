"""Every caller format through the local host: real HTTP in, the real queue out."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

from localdev.defender_sim import DefenderSimulator
from localdev.host import LOCAL_FUNCTION_KEY
from tests.conftest import MACHINE, Queues, RunningHost

HostFactory = Callable[..., RunningHost]
PAYLOADS = Path(__file__).parent / "payloads"
AAD_WS42 = "6d5c4b3a-2f1e-4d0c-9b8a-7f6e5d4c3b2a"


@pytest.fixture
def intake_host(local_host: HostFactory) -> RunningHost:
    return local_host("--no-queues")


def device(message: dict[str, Any]) -> Any:
    return message.get("machineId") or (message["lookup"]["by"], message["lookup"]["value"])


FORMATS: list[tuple[str, dict[str, str], list[Any], int]] = [
    (
        "native-batch.json",
        {},
        [
            MACHINE,
            ("aadDeviceId", "80fe8a4c-2b7e-4a6b-9d3c-2f1e0c5a7b61"),
            ("deviceName", "desktop-7f3k2.contoso.com"),
        ],
        1,
    ),
    ("sentinel-incident.json", {}, [MACHINE, ("deviceName", "srv-files-01.corp.contoso.com")], 1),
    ("sentinel-alert.json", {}, ["2a6cd9e3f1b04c7d8e9fa0b1c2d3e4f5a6b7c8d9"], 0),
    ("sentinel-entities.json", {}, [("aadDeviceId", AAD_WS42)], 0),
    ("eventgrid-events.json", {"aeg-event-type": "Notification"}, [MACHINE], 0),
    (
        "cloudevents-structured.json",
        {"Content-Type": "application/cloudevents+json; charset=utf-8"},
        [("deviceName", "desktop-7f3k2.contoso.com")],
        0,
    ),
    (
        "cloudevents-batch.json",
        {"Content-Type": "application/cloudevents-batch+json"},
        [("aadDeviceId", "80fe8a4c-2b7e-4a6b-9d3c-2f1e0c5a7b61")],
        0,
    ),
    ("graph-notifications.json", {}, [("aadDeviceId", AAD_WS42)], 0),
    ("intune-managed-device-retire.json", {}, [("aadDeviceId", AAD_WS42)], 0),
    ("intune-device-list.json", {}, [("deviceName", "kiosk-lobby")], 1),
    ("azuremonitor-intune-retire.json", {}, [("aadDeviceId", AAD_WS42)], 0),
]


@pytest.mark.parametrize(("name", "headers", "queued", "rejected"), FORMATS, ids=[f[0] for f in FORMATS])
def test_each_format_reaches_the_queue_as_the_right_requests(
    intake_host: RunningHost,
    queues: Queues,
    name: str,
    headers: dict[str, str],
    queued: list[Any],
    rejected: int,
) -> None:
    response = intake_host.post(
        "/api/offboard",
        data=(PAYLOADS / name).read_bytes(),
        headers={"Content-Type": "application/json", **headers},
    )
    assert response.status_code == 202, response.text
    results = response.json()["results"]
    messages = queues.wait_for("", len(queued))
    assert sorted(map(str, map(device, messages))) == sorted(map(str, queued))
    assert queues.count() == len(queued)
    queued_results = [r for r in results if r["status"] == "Queued"]
    assert {r["requestId"] for r in queued_results} == {m["requestId"] for m in messages}
    for result in queued_results:
        assert result["statusUrl"] == f"{intake_host.url}/api/offboard/{result['requestId']}"
        assert "code=" not in result["statusUrl"]
    assert sum(r["status"] == "Rejected" for r in results) == rejected


def test_native_single_keeps_its_original_answer(intake_host: RunningHost, queues: Queues) -> None:
    response = intake_host.post("/api/offboard", data=(PAYLOADS / "native-single.json").read_bytes())
    assert response.status_code == 202 and "Location" in response.headers
    body = response.json()
    assert set(body) == {"requestId", "machineId", "status", "statusUrl"} and body["machineId"] == MACHINE
    assert queues.peek()[0]["comment"] == "IR-1234: compromised"


def test_single_lookup_answers_with_the_lookup(intake_host: RunningHost, queues: Queues) -> None:
    response = intake_host.post("/api/offboard", {"deviceName": "PC-1.contoso.com"})
    assert response.status_code == 202
    body = response.json()
    assert body["machineId"] is None and body["lookup"] == {"by": "deviceName", "value": "pc-1.contoso.com"}
    [message] = queues.peek()
    assert message["lookup"] == body["lookup"] and "machineId" not in message


def test_batch_partial_success_answers_per_item(intake_host: RunningHost, queues: Queues) -> None:
    body = {"requests": [{"machineId": MACHINE}, {"deviceName": "x' or 1 eq 1 or '"}, {"nothing": 1}]}
    response = intake_host.post("/api/offboard", body)
    assert response.status_code == 202
    first, second, third = response.json()["results"]
    assert first["status"] == "Queued" and first["machineId"] == MACHINE and first["item"] == "requests[0]"
    assert second == {
        "item": "requests[1]",
        "status": "Rejected",
        "error": {"code": "InvalidDeviceName", "message": second["error"]["message"]},
    }
    assert third["error"]["code"] == "MissingMachineId"
    assert queues.count() == 1


def test_nothing_valid_is_one_clear_400(intake_host: RunningHost, queues: Queues) -> None:
    response = intake_host.post("/api/offboard", {"requests": [{"machineId": "x"}, {"aadDeviceId": "y"}]})
    assert response.status_code == 400
    body = response.json()
    assert body["error"]["code"] == "NoValidItems" and len(body["results"]) == 2
    assert queues.count() == 0


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"deviceName": "x' or 1 eq 1 or '"}, "InvalidDeviceName"),
        ({"requests": [{"machineId": MACHINE}] * 51}, "BatchTooLarge"),
        ({"Entities": []}, "EmptyEntities"),
        ([{"unknown": "shape"}], "InvalidBody"),
    ],
)
def test_bad_payloads_are_refused_and_queue_nothing(
    intake_host: RunningHost, queues: Queues, body: Any, code: str
) -> None:
    response = intake_host.post("/api/offboard", body)
    assert response.status_code == 400 and response.json()["error"]["code"] == code
    assert queues.count() == 0


def test_entity_with_no_usable_identifier_is_reported_per_item(
    intake_host: RunningHost, queues: Queues
) -> None:
    body = {"Entities": [{"Type": "host", "HostName": "kiosk-3"}, {"Type": "host", "MdatpDeviceId": MACHINE}]}
    response = intake_host.post("/api/offboard", body)
    assert response.status_code == 202
    first, second = response.json()["results"]
    assert first["status"] == "Rejected" and first["error"]["code"] == "NoDeviceIdentifier"
    assert second["status"] == "Queued" and queues.count() == 1


def test_eventgrid_validation_handshake(intake_host: RunningHost, queues: Queues) -> None:
    response = intake_host.post(
        f"/api/offboard?code={LOCAL_FUNCTION_KEY}",
        data=(PAYLOADS / "eventgrid-validation.json").read_bytes(),
        key=False,
        headers={"Content-Type": "application/json", "aeg-event-type": "SubscriptionValidation"},
    )
    assert response.status_code == 200
    assert response.json() == {"validationResponse": "512d38b6-c7b8-40c8-89fe-f46f9e9622b6"}
    assert queues.count() == 0


def test_eventgrid_event_of_another_type_is_acknowledged_and_logged(
    intake_host: RunningHost, queues: Queues
) -> None:
    events = json.loads((PAYLOADS / "eventgrid-events.json").read_text())[1:]
    response = intake_host.post("/api/offboard", events, headers={"aeg-event-type": "Notification"})
    assert response.status_code == 200  # not retried by Event Grid
    [result] = response.json()["results"]
    assert result["status"] == "Ignored" and "Microsoft.Storage.BlobCreated" in result["reason"]
    assert queues.count() == 0
    log = intake_host.log()
    assert "Offboard eventgrid payload: 0 accepted, 0 rejected, 1 ignored" in log
    assert "Microsoft.Storage.BlobCreated" in log


def test_cloudevents_options_handshake_with_the_key_in_the_url(intake_host: RunningHost) -> None:
    url = f"{intake_host.url}/api/offboard?code={LOCAL_FUNCTION_KEY}"
    response = requests.options(url, headers={"WebHook-Request-Origin": "eventgrid.azure.net"}, timeout=10)
    assert response.status_code == 200
    assert response.headers["WebHook-Allowed-Origin"] == "eventgrid.azure.net"
    assert "POST" in response.headers["Allow"]
    without_key = requests.options(
        f"{intake_host.url}/api/offboard",
        headers={"WebHook-Request-Origin": "eventgrid.azure.net"},
        timeout=10,
    )
    assert without_key.status_code == 401


def test_graph_validation_token_is_echoed_as_text(intake_host: RunningHost, queues: Queues) -> None:
    token = "Validation: Testing client application reachability for subscription Request-Id: 7d8c9b0a"
    response = intake_host.post(
        "/api/offboard",
        data=b"",
        params={"validationToken": token},
        headers={"Content-Type": "text/plain; charset=utf-8"},
    )
    assert response.status_code == 200 and response.text == token
    assert response.headers["Content-Type"].startswith("text/plain")
    assert queues.count() == 0


def test_a_sentinel_host_by_name_travels_to_defender(
    local_host: HostFactory, defender: DefenderSimulator, queues: Queues
) -> None:
    defender.add_machine(MACHINE, "WS-0042.contoso.com")
    body = {"Entities": [{"kind": "Host", "properties": {"hostName": "ws-0042", "dnsDomain": "contoso.com"}}]}
    host = local_host()
    assert host.post("/api/offboard", body).status_code == 202
    [call] = defender.wait_for_calls(1)
    assert call.path == f"/api/machines/{MACHINE}/offboard"
    assert len(defender.lookup_calls()) == 1 and queues.count("-poison") == 0
