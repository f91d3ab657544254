"""Through the local host: real HTTP in, real queue, the queue trigger, the simulator."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from localdev.defender_sim import DefenderSimulator, Reply
from localdev.identity import IdentityEndpoint
from tests.conftest import MACHINE, Queues, RunningHost

HostFactory = Callable[..., RunningHost]


def test_post_answers_202_and_puts_one_message_on_the_queue(local_host: HostFactory, queues: Queues) -> None:
    host = local_host("--no-queues")
    response = host.post(
        "/api/offboard?code=local-function-key", {"machineId": MACHINE.upper(), "comment": "IR-42"}, key=False
    )

    assert response.status_code == 202
    body = response.json()
    assert body["machineId"] == MACHINE and body["status"] == "Queued"
    assert body["statusUrl"] == f"{host.url}/api/offboard/{body['requestId']}"
    # Logic Apps polls Location without other credentials, so it carries the caller's ?code=.
    assert response.headers["Location"] == f"{body['statusUrl']}?code=local-function-key"
    [message] = queues.peek()
    assert message["requestId"] == body["requestId"] and message["machineId"] == MACHINE
    assert message["comment"] == "IR-42" and message["attempt"] == 1 and message["v"] == 1


def test_location_never_invents_a_key(local_host: HostFactory) -> None:
    response = local_host("--no-queues").post("/api/offboard", {"machineId": MACHINE})
    assert "code=" not in response.headers["Location"]


def test_a_request_travels_to_defender(
    local_host: HostFactory, defender: DefenderSimulator, identity: IdentityEndpoint, queues: Queues
) -> None:
    host = local_host()
    assert host.post("/api/offboard", {"machineId": MACHINE}).status_code == 202
    [call] = defender.wait_for_calls(1)
    assert call.path == f"/api/machines/{MACHINE}/offboard"
    assert call.headers["Authorization"] == f"Bearer {identity.issued[0][0]}"
    assert call.json() == {"Comment": "Offboarded by automation (Defender offboarding service)"}


def test_throttled_request_comes_back_after_retry_after(
    local_host: HostFactory, defender: DefenderSimulator, queues: Queues
) -> None:
    defender.script(MACHINE, Reply.error(429, "TooManyRequests", **{"Retry-After": "7"}))
    host = local_host()
    host.post("/api/offboard", {"machineId": MACHINE})
    first, second = defender.wait_for_calls(2, timeout=30)
    assert 7.0 <= second.at - first.at < 11.0
    assert queues.count("-poison") == 0


def test_server_errors_twice_then_created_succeeds(
    local_host: HostFactory, defender: DefenderSimulator, queues: Queues
) -> None:
    defender.script(MACHINE, Reply.error(500, "InternalServerError"), Reply.error(503, "ServiceUnavailable"))
    local_host().post("/api/offboard", {"machineId": MACHINE})
    calls = defender.wait_for_calls(3, timeout=30)
    assert len(calls) == 3
    assert queues.count("-poison") == 0


def test_not_found_ends_in_poison_with_the_reason(
    local_host: HostFactory, defender: DefenderSimulator, queues: Queues
) -> None:
    defender.script(MACHINE, Reply.error(404, "NotFound", "Machine 1e5b... was not found"))
    response = local_host().post("/api/offboard", {"machineId": MACHINE})
    [record] = queues.wait_for("-poison")
    assert record["reason"]["code"] == "NotFound"
    assert record["message"]["requestId"] == response.json()["requestId"]
    assert len(defender.offboard_calls()) == 1


def test_token_endpoint_down_loses_nothing(
    local_host: HostFactory, defender: DefenderSimulator, identity: IdentityEndpoint, queues: Queues
) -> None:
    # 400: refused at once (a 500 is retried inside azure-identity for ~5 s each time; the
    # one-off outage below is the 500 case).
    identity.fail_with = 400
    host = local_host(OFFBOARD_MAX_ATTEMPTS="5")
    host.post("/api/offboard", {"machineId": MACHINE})
    deadline = time.monotonic() + 60
    while "configuration (TokenUnavailable" not in host.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    # A hiccup first (retried within seconds), a configuration problem once it persists, and
    # then the log says what to fix. (The precheck is the first call that needs the token.)
    assert "Precheck transient (TokenUnavailable" in host.log()
    assert "Precheck configuration (TokenUnavailable" in host.log()
    assert "MANAGED_IDENTITY_CLIENT_ID" in host.log()
    assert defender.offboard_calls() == []
    assert queues.count() == 1 and queues.count("-poison") == 0  # waiting to try again


def test_a_one_off_identity_outage_delays_the_offboard_by_seconds(
    local_host: HostFactory, defender: DefenderSimulator, identity: IdentityEndpoint
) -> None:
    identity.fail_with = 500
    host = local_host()
    started = time.time()
    request_id = host.post("/api/offboard", {"machineId": MACHINE}).json()["requestId"]
    while "TokenUnavailable" not in host.log() and time.time() - started < 30:
        time.sleep(0.1)
    identity.fail_with = None  # the endpoint is back
    [call] = defender.wait_for_calls(1, MACHINE, timeout=60)
    assert call.at - started < 60
    assert host.get(f"/api/offboard/{request_id}").json()["attempt"] >= 2


def test_host_moves_a_message_that_is_not_base64_to_poison(
    local_host: HostFactory, defender: DefenderSimulator, queues: Queues
) -> None:
    # Such a message fails before the function runs; the host parks it, unchanged.
    queues.client().create_queue()
    queues.client().send_message("%%% not base64 %%%")
    local_host()
    deadline = time.monotonic() + 15
    while queues.count("-poison") == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert queues.count("-poison") == 1 and defender.calls == []


def test_malformed_message_goes_to_poison_with_its_reason(
    local_host: HostFactory, defender: DefenderSimulator, queues: Queues
) -> None:
    queues.send_raw('{"v": 7, "requestId": "r", "machineId": "' + MACHINE + '"}')
    local_host()
    [record] = queues.wait_for("-poison")
    assert record["reason"]["code"] == "MalformedMessage" and "version 7" in record["reason"]["message"]
    assert defender.calls == []


def test_function_key_is_required(local_host: HostFactory, queues: Queues) -> None:
    response = local_host("--no-queues").post("/api/offboard", {"machineId": MACHINE}, key=False)
    assert response.status_code == 401 and queues.count() == 0


BAD_BODIES: list[tuple[bytes, str]] = [
    (b"", "EmptyBody"),
    (b"   ", "EmptyBody"),
    (b"{not json", "InvalidJson"),
    (b"\xff\xfe", "InvalidJson"),
    (b"[]", "InvalidBody"),
    (b'"1e5bc9d7e413ddd7902c2932e418702b84d0cc07"', "InvalidBody"),
    (b"{}", "MissingMachineId"),
    (b'{"machineId": null}', "MissingMachineId"),
    (b'{"machineId": 42}', "InvalidMachineId"),
    (b'{"machineId": ["1e5bc9d7e413ddd7902c2932e418702b84d0cc07"]}', "InvalidMachineId"),
    (b'{"machineId": "1e5bc9d7e413ddd7902c2932e418702b84d0cc0"}', "InvalidMachineId"),
    (b'{"machineId": "1e5bc9d7e413ddd7902c2932e418702b84d0cc07a"}', "InvalidMachineId"),
    (b'{"machineId": "../../machines/1e5bc9d7e413ddd7902c2932e41870"}', "InvalidMachineId"),
    (b'{"machineId": "1e5bc9d7e413ddd7902c2932e418702b84d0c/07"}', "InvalidMachineId"),
    (b'{"machineId": "1e5bc9d7e413ddd7902c2932e418702b84d0c?07"}', "InvalidMachineId"),
    (b'{"machineId": " 1e5bc9d7e413ddd7902c2932e418702b84d0cc07"}', "InvalidMachineId"),
    (b'{"machineId": "1e5bc9d7e413ddd7902c2932e418702b84d0cc07\\n"}', "InvalidMachineId"),
    # Fullwidth and Arabic-Indic digits look like hex to a person, not to Defender.
    ('{"machineId": "１e5bc9d7e413ddd7902c2932e418702b84d0cc07"}'.encode(), "InvalidMachineId"),  # noqa: RUF001
    ('{"machineId": "٣e5bc9d7e413ddd7902c2932e418702b84d0cc07"}'.encode(), "InvalidMachineId"),
    (b'{"machineId": "1e5bc9d7e413ddd7902c2932e418702b84d0cc07", "comment": 5}', "InvalidComment"),
    (
        b'{"machineId": "1e5bc9d7e413ddd7902c2932e418702b84d0cc07", "comment": "' + b"x" * 1001 + b'"}',
        "InvalidComment",
    ),
    (b'{"machineId": "1e5bc9d7e413ddd7902c2932e418702b84d0cc07", "comment": "a\\u0000b"}', "InvalidComment"),
]


@pytest.fixture
def intake_host(local_host: HostFactory) -> RunningHost:
    return local_host("--no-queues")


@pytest.mark.parametrize(("body", "code"), BAD_BODIES)
def test_bad_input_is_refused_and_enqueues_nothing(
    intake_host: RunningHost, queues: Queues, body: bytes, code: str
) -> None:
    response = intake_host.post("/api/offboard", data=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    assert queues.count() == 0


def test_oversized_body_is_refused(intake_host: RunningHost, queues: Queues) -> None:
    response = intake_host.post("/api/offboard", data=b"{" + b" " * 70_000 + b"}")
    assert response.status_code == 413 and response.json()["error"]["code"] == "PayloadTooLarge"
    assert queues.count() == 0


def test_unknown_fields_are_ignored(intake_host: RunningHost, queues: Queues) -> None:
    response = intake_host.post("/api/offboard", {"machineId": MACHINE, "severity": "High", "comment": "  "})
    assert response.status_code == 202
    assert queues.peek()[0]["comment"] == "Offboarded by automation (Defender offboarding service)"
