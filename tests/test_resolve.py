"""Device resolution in the worker: real Azurite, the real credential, the simulator's
`GET /api/machines`. Exactly one match or nothing."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from localdev.defender_sim import LOOKUP, DefenderSimulator, Reply
from shared.domain.devices import Lookup
from shared.worker.worker import Worker
from tests.conftest import MACHINE, Queues, offboard_message

OTHER = "2a6cd9e3f1b04c7d8e9fa0b1c2d3e4f5a6b7c8d9"
AAD = "80fe8a4c-2b7e-4a6b-9d3c-2f1e0c5a7b61"


def by_name(name: str) -> Any:
    return offboard_message(machine_id=None, lookup=Lookup.of("deviceName", name))


def sent_filter(defender: DefenderSimulator) -> list[str]:
    return [parse_qs(urlsplit(c.path).query)["$filter"][0] for c in defender.lookup_calls()]


def test_exact_name_match_is_offboarded(
    make_worker: Callable[..., Worker], defender: DefenderSimulator, queues: Queues, caplog: Any
) -> None:
    defender.add_machine(MACHINE, "PC-1.Contoso.com")  # Defender compares names case-insensitively
    defender.add_machine(OTHER, "pc-10.contoso.com")  # a longer name is never a match
    message = by_name("pc-1.contoso.com")
    make_worker().process(message)

    assert sent_filter(defender) == ["computerDnsName eq 'pc-1.contoso.com'"]
    [call] = defender.offboard_calls()
    assert call.path == f"/api/machines/{MACHINE}/offboard"
    assert call.headers["Authorization"].startswith("Bearer ")
    # Left on the queue: only the delayed status check of the action.
    assert queues.count() == 1 and queues.peek() == [] and queues.count("-poison") == 0
    assert f"request {message.request_id} deviceName=pc-1.contoso.com is machine {MACHINE}" in caplog.text


def test_exact_aad_device_id_match_is_offboarded(
    make_worker: Callable[..., Worker], defender: DefenderSimulator
) -> None:
    defender.add_machine(OTHER, "laptop-q9.contoso.com", AAD.upper())
    make_worker().process(offboard_message(machine_id=None, lookup=Lookup.of("aadDeviceId", AAD)))
    assert sent_filter(defender) == [f"aadDeviceId eq '{AAD}'"]
    assert [c.path for c in defender.offboard_calls()] == [f"/api/machines/{OTHER}/offboard"]


def test_no_match_fails_with_device_not_found(
    make_worker: Callable[..., Worker], defender: DefenderSimulator, queues: Queues
) -> None:
    defender.add_machine(OTHER, "pc-10.contoso.com")
    message = by_name("pc-1.contoso.com")
    make_worker().process(message)
    [record] = queues.peek("-poison")
    assert record["reason"]["code"] == "DeviceNotFound"
    assert "pc-1.contoso.com" in record["reason"]["message"]
    assert record["message"]["lookup"] == {"by": "deviceName", "value": "pc-1.contoso.com"}
    assert defender.offboard_calls() == [] and queues.count() == 0


def test_several_matches_fail_as_ambiguous_listing_every_candidate(
    make_worker: Callable[..., Worker], defender: DefenderSimulator, queues: Queues
) -> None:
    defender.add_machine(MACHINE, "pc-1.contoso.com")
    defender.add_machine(OTHER, "PC-1.contoso.com")
    make_worker().process(by_name("pc-1.contoso.com"))
    [record] = queues.peek("-poison")
    assert record["reason"]["code"] == "AmbiguousDevice"
    assert MACHINE in record["reason"]["message"] and OTHER in record["reason"]["message"]
    assert defender.offboard_calls() == []


def test_a_looser_answer_than_asked_for_is_never_taken(
    make_worker: Callable[..., Worker], defender: DefenderSimulator, queues: Queues
) -> None:
    # Even if the service matched by substring, only an exact name counts.
    loose = {"value": [{"id": OTHER, "computerDnsName": "pc-10.contoso.com"}]}
    defender.script(LOOKUP, Reply(200, loose))
    make_worker().process(by_name("pc-1.contoso.com"))
    [record] = queues.peek("-poison")
    assert record["reason"]["code"] == "DeviceNotFound" and defender.offboard_calls() == []


def test_an_injection_in_a_queued_lookup_never_reaches_defender(
    make_worker: Callable[..., Worker], defender: DefenderSimulator, queues: Queues
) -> None:
    body = json.loads(offboard_message().to_json())
    body.pop("machineId")
    body["lookup"] = {"by": "deviceName", "value": "x' or 1 eq 1 or '"}
    make_worker().handle(json.dumps(body).encode(), "m1")
    [record] = queues.peek("-poison")
    assert record["reason"]["code"] == "MalformedMessage" and defender.calls == []


def test_throttled_lookup_is_requeued_with_its_lookup(
    make_worker: Callable[..., Worker], defender: DefenderSimulator, queues: Queues
) -> None:
    defender.script(LOOKUP, Reply.error(429, "TooManyRequests", **{"Retry-After": "2"}))
    message = by_name("pc-1.contoso.com")
    make_worker().process(message)
    assert defender.offboard_calls() == [] and queues.peek() == []  # waiting, invisible
    time.sleep(2.2)
    [requeued] = queues.peek()
    assert requeued["lookup"] == {"by": "deviceName", "value": "pc-1.contoso.com"}
    assert requeued["attempt"] == 2 and requeued["failures"] == 0 and "machineId" not in requeued


def test_forbidden_lookup_names_the_read_permission(
    make_worker: Callable[..., Worker], defender: DefenderSimulator, queues: Queues, caplog: Any
) -> None:
    defender.script(LOOKUP, Reply.error(403, "Forbidden"))
    make_worker().process(by_name("pc-1.contoso.com"))
    assert "Machine.Read.All" in caplog.text and "Device lookup configuration" in caplog.text
    assert queues.count() == 1 and defender.offboard_calls() == []


@pytest.mark.parametrize("status", [500, 503])
def test_lookup_server_errors_are_transient(
    make_worker: Callable[..., Worker], defender: DefenderSimulator, queues: Queues, status: int
) -> None:
    defender.script(LOOKUP, Reply.error(status, "ServiceUnavailable"))
    make_worker().process(by_name("pc-1.contoso.com"))
    [requeued] = queues.wait_for("", timeout=5)
    assert requeued["failures"] == 1 and "lookup" in requeued


def test_throttled_offboard_after_resolution_does_not_resolve_again(
    make_worker: Callable[..., Worker], defender: DefenderSimulator, queues: Queues
) -> None:
    defender.add_machine(MACHINE, "pc-1.contoso.com")
    defender.script(MACHINE, Reply.error(429, "TooManyRequests", **{"Retry-After": "1"}))
    worker = make_worker()
    worker.process(by_name("pc-1.contoso.com"))
    time.sleep(1.2)
    [requeued] = queues.peek()
    assert requeued["machineId"] == MACHINE and "lookup" not in requeued
    assert requeued["resolvedFrom"] == {"by": "deviceName", "value": "pc-1.contoso.com"}
    worker.handle(json.dumps(requeued).encode(), "m2")
    assert len(defender.lookup_calls()) == 1 and len(defender.offboard_calls()) == 2


def test_more_than_one_page_of_matches_is_ambiguous(
    make_worker: Callable[..., Worker], defender: DefenderSimulator, queues: Queues
) -> None:
    page = {
        "value": [{"id": MACHINE, "computerDnsName": "pc-1.contoso.com"}],
        "@odata.nextLink": "https://x/next",
    }
    defender.script(LOOKUP, Reply(200, page))
    make_worker().process(by_name("pc-1.contoso.com"))
    [record] = queues.peek("-poison")
    assert record["reason"]["code"] == "AmbiguousDevice" and defender.offboard_calls() == []
