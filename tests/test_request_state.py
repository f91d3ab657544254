"""Request state, idempotency, follow-up, cancel and audit: in-process and through the host."""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from localdev.defender_sim import DefenderSimulator, Reply
from shared.adapters.guards import machine_key
from shared.domain.offboard import Caller, OffboardRequest
from shared.runtime import Services
from tests.conftest import MACHINE, Queues, RunningHost, adopt, events, new_request_id

HostFactory = Callable[..., RunningHost]
OTHER = "2f6cd0e8f524eee8a13d3a43f529813c95e1dd18"


def wait_status(host: RunningHost, request_id: str, want: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        response = host.get(f"/api/offboard/{request_id}")
        if response.json().get("status") == want or time.monotonic() > deadline:
            return response
        time.sleep(0.2)


# ---- at-least-once delivery never means two calls ----------------------------------------


def test_the_same_message_delivered_twice_calls_defender_once(
    services: Services, defender: DefenderSimulator
) -> None:
    worker = services.worker()
    message = adopt(services)
    worker.process(message, "msg-1")
    worker.process(message, "msg-1")  # redelivered after the call, before completion
    assert len(defender.offboard_calls()) == 1
    record = services.store.get(message.request_id)
    assert record is not None and record.status == "Submitted" and record.action_id
    assert events(services, message.request_id) == ["Submitted", "Duplicate"]


def test_a_stale_copy_of_an_earlier_attempt_makes_no_call(
    services: Services, defender: DefenderSimulator
) -> None:
    defender.script(MACHINE, Reply.error(429, "TooManyRequests", **{"Retry-After": "60"}))
    worker = services.worker()
    message = adopt(services)
    worker.process(message, "msg-1")  # throttled: attempt 2 is queued
    worker.process(message, "msg-1-again")  # attempt 1 delivered once more
    assert len(defender.offboard_calls()) == 1
    record = services.store.get(message.request_id)
    assert record is not None and record.status == "Throttled" and record.attempt == 2


def test_two_workers_racing_on_one_request_make_one_call(
    make_services: Callable[..., Services], defender: DefenderSimulator
) -> None:
    defender.script(MACHINE, Reply(201, {"id": "a3f1e1c2-0000-4000-8000-000000000001"}, delay_seconds=0.5))
    first, second = make_services(), make_services()  # two instances, one table
    message = adopt(first)
    start = threading.Barrier(2)

    def work(services: Services, message_id: str) -> None:
        start.wait()
        services.worker().process(message, message_id)

    threads = [threading.Thread(target=work, args=(s, f"copy-{i}")) for i, s in enumerate((first, second))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(defender.offboard_calls()) == 1


def test_an_offboard_already_pending_in_defender_is_followed(
    services: Services, defender: DefenderSimulator, queues: Queues
) -> None:
    portal = defender.new_action(MACHINE, "started in the portal")  # Defender now refuses a second
    message = adopt(services)
    services.worker().process(message)
    assert len(defender.offboard_calls()) == 1  # answered ActiveRequestAlreadyExists
    record = services.store.get(message.request_id)
    assert record is not None and record.status == "Pending" and record.action_id == portal["id"]
    assert record.follow_up == "Scheduled" and queues.count() == 1  # its status check


def test_a_pending_offboard_whose_action_cannot_be_found_ends_with_a_note(
    services: Services, defender: DefenderSimulator
) -> None:
    defender.script(MACHINE, Reply.error(400, "ActiveRequestAlreadyExists"))
    message = adopt(services)
    services.worker().process(message)
    record = services.store.get(message.request_id)
    assert record is not None and record.status == "Pending" and record.action_id is None
    # Final, so the poll ends and the machine is free for a later request.
    assert record.final and "could not be found" in (record.note or "")
    submissions = services.submissions(lambda r: r)
    later = submissions.submit(OffboardRequest(MACHINE, "again"), Caller("agent:test"))
    assert later.body["requestId"] != record.request_id and "existingRequest" not in later.body


def test_cancel_a_held_request(local_host: HostFactory, services: Services) -> None:
    host = local_host("--no-queues", OFFBOARD_BREAKER_LIMIT="1")
    host.post("/api/offboard", {"machineId": MACHINE})
    held = host.post("/api/offboard", {"machineId": OTHER}).json()
    assert held["status"] == "Held"
    response = host.post(f"/api/offboard/{held['requestId']}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "Cancelled"
    assert list(services.holds().held()) == []


def test_permanent_failure_is_recorded_before_poisoning(
    services: Services, defender: DefenderSimulator, queues: Queues
) -> None:
    defender.script(MACHINE, Reply.error(400, "OsPlatformNotSupported", "macOS is not supported"))
    message = adopt(services)
    services.worker().process(message)
    record = services.store.get(message.request_id)
    assert record is not None and record.status == "Failed"
    assert record.public()["lastError"] == {
        "code": "OsPlatformNotSupported",
        "message": "macOS is not supported",
    }
    assert events(services, message.request_id) == ["Failed"]
    assert queues.peek("-poison")[0]["reason"]["code"] == "OsPlatformNotSupported"


# ---- follow-up ---------------------------------------------------------------------------


def test_follow_up_stops_at_the_horizon(
    make_services: Callable[..., Services], defender: DefenderSimulator, queues: Queues
) -> None:
    defender.action_progression = ["Pending"]  # an offline device
    services = make_services(OFFBOARD_CHECK_HORIZON_SECONDS="3")
    worker = services.worker()
    message = adopt(services)
    worker.process(message)
    for _ in range(10):  # play the check messages as the host would, as they come due
        queues.wait_for("", timeout=5)
        received = queues.client().receive_message()
        assert received is not None
        queues.client().delete_message(received)
        worker.handle(base64.b64decode(received.content), received.id)
        record = services.store.get(message.request_id)
        if record is not None and record.follow_up == "Stopped":
            break
    assert record is not None and record.status == "Pending" and record.final
    assert 1 <= len(defender.action_calls()) <= 3
    assert events(services, message.request_id)[-1] == "FollowUpStopped"
    assert queues.count() == 0


# ---- through the local host --------------------------------------------------------------


def test_status_goes_from_queued_to_succeeded_and_the_poll_ends_with_200(
    local_host: HostFactory, defender: DefenderSimulator, services: Services
) -> None:
    host = local_host()
    accepted = host.post("/api/offboard", {"machineId": MACHINE}).json()
    request_id = accepted["requestId"]
    seen: list[str] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        response = host.get(f"/api/offboard/{request_id}")
        status = response.json()["status"]
        if not seen or seen[-1] != status:
            seen.append(status)
        if status == "Succeeded":
            break
        assert response.status_code == 202
        assert response.headers["Location"] == f"{host.url}/api/offboard/{request_id}"
        assert int(response.headers["Retry-After"]) > 0
        time.sleep(0.1)
    assert response.status_code == 200 and "Location" not in response.headers
    assert seen[-1] == "Succeeded" and "Submitted" in seen
    assert response.json()["actionId"]
    assert events(services, request_id) == [
        "Received",
        "Queued",
        "Submitted",
        "StatusChanged",
        "StatusChanged",
        "StatusChanged",
    ]
    assert [r["outcome"] for r in services.store.events(request_id)[3:]] == [
        "Pending",
        "InProgress",
        "Succeeded",
    ]


def test_two_identical_posts_make_one_request_and_one_call(
    local_host: HostFactory, defender: DefenderSimulator, queues: Queues
) -> None:
    host = local_host("--no-queues")
    first = host.post("/api/offboard", {"machineId": MACHINE}).json()
    second = host.post("/api/offboard", {"machineId": MACHINE}).json()
    assert second["requestId"] == first["requestId"] and second["existingRequest"] is True
    assert queues.count() == 1
    local_host()  # now a worker
    defender.wait_for_calls(1)
    time.sleep(1)
    assert len(defender.offboard_calls()) == 1


def test_idempotency_key_replays_the_first_answer(local_host: HostFactory, queues: Queues) -> None:
    host = local_host("--no-queues")
    first = host.post("/api/offboard", {"machineId": MACHINE}, headers={"Idempotency-Key": "run-42"})
    again = host.post("/api/offboard", {"machineId": MACHINE}, headers={"Idempotency-Key": "run-42"})
    assert again.status_code == 202 and again.json() == {**first.json(), "replayed": True}
    by_body = host.post("/api/offboard", {"machineId": OTHER, "clientRequestId": "run-43"})
    assert (
        host.post("/api/offboard", {"machineId": OTHER, "clientRequestId": "run-43"}).json()["requestId"]
        == (by_body.json()["requestId"])
    )
    assert queues.count() == 2


@pytest.mark.parametrize(
    ("body", "headers", "status", "code"),
    [
        ({"machineId": OTHER}, {"Idempotency-Key": "run-42"}, 422, "IdempotencyKeyReused"),
        ({"machineId": MACHINE}, {"Idempotency-Key": "k" * 201}, 400, "InvalidIdempotencyKey"),
        ({"machineId": MACHINE, "clientRequestId": 7}, {}, 400, "InvalidIdempotencyKey"),
        (
            {"machineId": MACHINE, "clientRequestId": "a"},
            {"Idempotency-Key": "b"},
            400,
            "InvalidIdempotencyKey",
        ),
    ],
)
def test_bad_idempotency_keys_are_refused(
    local_host: HostFactory, queues: Queues, body: Any, headers: dict[str, str], status: int, code: str
) -> None:
    host = local_host("--no-queues")
    host.post("/api/offboard", {"machineId": MACHINE}, headers={"Idempotency-Key": "run-42"})
    response = host.post("/api/offboard", body, headers=headers)
    assert response.status_code == status and response.json()["error"]["code"] == code
    assert queues.count() == 1


def test_not_found_shows_failed_with_the_reason(local_host: HostFactory, defender: DefenderSimulator) -> None:
    defender.script(MACHINE, Reply.error(404, "NotFound", "Machine was not found"))
    host = local_host()
    request_id = host.post("/api/offboard", {"machineId": MACHINE}).json()["requestId"]
    response = wait_status(host, request_id, "Failed")
    assert response.status_code == 200
    assert response.json()["lastError"] == {"code": "NotFound", "message": "Machine was not found"}


def test_cancel_before_sending_means_no_call(
    local_host: HostFactory, defender: DefenderSimulator, services: Services
) -> None:
    intake = local_host("--no-queues")
    request_id = intake.post("/api/offboard", {"machineId": MACHINE}).json()["requestId"]
    cancelled = intake.post(f"/api/offboard/{request_id}/cancel", {"comment": "wrong device"})
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "Cancelled"
    local_host()  # a worker now picks the message up, and must leave it alone
    deadline = time.monotonic() + 5
    while "Duplicate" not in events(services, request_id) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert defender.offboard_calls() == []
    assert events(services, request_id) == ["Received", "Queued", "Cancelled", "Duplicate"]
    again = intake.post(f"/api/offboard/{request_id}/cancel")
    assert again.status_code == 409 and again.json()["error"]["code"] == "RequestFinished"


def test_cancel_once_in_defender_cancels_the_action(
    local_host: HostFactory, defender: DefenderSimulator
) -> None:
    defender.action_progression = ["Pending"]
    host = local_host()
    request_id = host.post("/api/offboard", {"machineId": MACHINE}).json()["requestId"]
    action_id = wait_status(host, request_id, "Pending").json()["actionId"]
    response = host.post(f"/api/offboard/{request_id}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "Cancelled"
    [cancel] = [c for c in defender.action_calls(action_id) if c.method == "POST"]
    assert cancel.path == f"/api/machineactions/{action_id}/cancel" and "Comment" in cancel.json()
    assert host.get(f"/api/offboard/{request_id}").status_code == 200


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/api/offboard/6fa240ec-e2bc-4e35-a722-2edb01bb2028", 404, "RequestNotFound"),
        ("/api/offboard/not-a-guid", 400, "InvalidRequestId"),
        ("/api/offboard/6fa240ec-e2bc-4e35-a722-2edb01bb202%27", 400, "InvalidRequestId"),
    ],
)
def test_unknown_or_malformed_ids(local_host: HostFactory, path: str, status: int, code: str) -> None:
    host = local_host("--no-queues")
    for response in (host.get(path), host.post(path + "/cancel")):
        assert response.status_code == status and response.json()["error"]["code"] == code


def test_a_key_racing_with_itself_accepts_one_request(services: Services) -> None:
    from shared.adapters.guards import key_key
    from shared.domain.errors import Refusal
    from shared.http.errors import status_of

    # The first arrival with the key holds it and has not written its request yet.
    first = new_request_id()
    fingerprint = OffboardRequest(MACHINE, "c").fingerprint
    services.guards.take(key_key("", "race"), first, "first-attempt", fingerprint)
    # The second arrival, before the first has its answer: never a second request.
    submissions = services.submissions(lambda r: r)
    with pytest.raises(Refusal) as caught:
        submissions.submit(OffboardRequest(MACHINE, "c"), Caller("agent:test"), "race")
    assert status_of(caught.value) == 409 and caught.value.code == "IdempotentRequestInProgress"
    with pytest.raises(Refusal) as different:
        submissions.submit(OffboardRequest(OTHER, "c"), Caller("agent:test"), "race")
    assert status_of(different.value) == 422
    assert services.guards.read(machine_key(MACHINE)) is None  # nothing else was taken


def test_a_throttled_pending_action_lookup_backs_off_the_action_budget(
    services: Services, defender: DefenderSimulator
) -> None:
    from localdev.defender_sim import ACTION_LOOKUP

    defender.script(MACHINE, Reply.error(400, "ActiveRequestAlreadyExists"))
    defender.script(ACTION_LOOKUP, Reply.error(429, "TooManyRequests", **{"Retry-After": "30"}))
    services.worker().process(adopt(services))
    assert services.limiter.reserve("action-read") >= 25  # every instance waits for Defender
    assert services.limiter.reserve("offboard") < 1  # the other budgets are untouched
