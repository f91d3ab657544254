"""What the service gives the people who run it: batches to follow, lists, audit trails,
holds that say why, approvals, hold notifications. Through the local host, real HTTP."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
import requests

from localdev.defender_sim import DefenderSimulator
from localdev.host import LOCAL_MASTER_KEY
from localdev.loopback import LoopbackServer, QuietHandler
from tests.conftest import MACHINE, RunningHost

HostFactory = Callable[..., RunningHost]
OTHER = "2f6cd0e8f524eee8a13d3a43f529813c95e1dd18"
THIRD = "3a7de1f9a635fff9b24e4b54a63a924da6f2ee29"
ADMIN = {"x-functions-key": LOCAL_MASTER_KEY}


def batch(*machines: str, **fields: Any) -> dict[str, Any]:
    return {"requests": [{"machineId": m} for m in machines], **fields}


def until(check: Callable[[], Any], timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise TimeoutError("never happened")


def test_a_batch_answers_its_id_and_its_route_follows_every_item_to_the_end(
    local_host: HostFactory, defender: DefenderSimulator
) -> None:
    host = local_host()
    accepted = host.post("/api/offboard", batch(MACHINE, OTHER, "not-a-machine", comment="IR-9"))
    body = accepted.json()
    assert accepted.status_code == 202 and body["batchId"]
    assert (
        accepted.headers["Location"]
        == body["statusUrl"]
        == f"{host.url}/api/offboard/batches/{body['batchId']}"
    )
    first = host.get(f"/api/offboard/batches/{body['batchId']}")
    assert first.status_code == 202 and first.headers["Location"] and int(first.headers["Retry-After"]) > 0
    assert first.json()["total"] == 2 and sum(first.json()["counts"].values()) == 2
    final = until(
        lambda: (r := host.get(f"/api/offboard/batches/{body['batchId']}")).status_code == 200 and r
    )
    view = final.json()
    assert view["final"] is True and view["counts"] == {"Succeeded": 2}
    assert [i["item"] for i in view["items"]] == ["requests[0]", "requests[1]"]
    assert {i["machineId"] for i in view["items"]} == {MACHINE, OTHER}


def test_a_batch_follows_an_item_that_named_an_existing_request(local_host: HostFactory) -> None:
    host = local_host("--no-queues")
    single = host.post("/api/offboard", {"machineId": MACHINE}).json()
    view = host.post("/api/offboard", batch(MACHINE, OTHER)).json()
    items = host.get(f"/api/offboard/batches/{view['batchId']}").json()["items"]
    assert items[0]["requestId"] == single["requestId"] and items[0]["status"] == "Queued"


def test_the_list_pages_newest_first_with_filters(local_host: HostFactory) -> None:
    host = local_host("--no-queues", OFFBOARD_BREAKER_LIMIT="2")
    ids = [host.post("/api/offboard", {"machineId": m}).json()["requestId"] for m in (MACHINE, OTHER, THIRD)]
    listed = host.get("/api/offboard").json()
    assert [r["requestId"] for r in listed["requests"]] == ids[::-1] and listed["next"] is None
    held = host.get("/api/offboard", params={"status": "Held"}).json()["requests"]
    assert [r["requestId"] for r in held] == [ids[2]] and held[0]["heldReason"]["code"] == "BreakerTripped"
    by_machine = host.get("/api/offboard", params={"machineId": OTHER}).json()["requests"]
    assert [r["requestId"] for r in by_machine] == [ids[1]]
    since_later = host.get("/api/offboard", params={"since": "2099-01-01T00:00:00Z"}).json()["requests"]
    assert since_later == []


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"status": "Done"}, "InvalidStatus"),
        ({"since": "yesterday"}, "InvalidSince"),
        ({"since": "2026-12-01T09:00:00"}, "InvalidSince"),
        ({"machineId": "x"}, "InvalidMachineId"),
        ({"batchId": "6fa240ec-e2bc-4e35-a722-2edb01bb2028"}, "InvalidBatchId"),
        ({"colour": "red"}, "InvalidFilter"),
        ({"next": "not-a-cursor"}, "InvalidCursor"),
    ],
)
def test_bad_list_filters_are_refused(local_host: HostFactory, params: dict[str, str], code: str) -> None:
    response = local_host("--no-queues").get("/api/offboard", params=params)
    assert response.status_code == 400 and response.json()["error"]["code"] == code


def test_a_requests_audit_trail_and_every_event_since(local_host: HostFactory) -> None:
    host = local_host()
    request_id = host.post("/api/offboard", {"machineId": MACHINE}).json()["requestId"]
    until(lambda: host.get(f"/api/offboard/{request_id}").json()["status"] == "Succeeded")
    trail = host.get(f"/api/offboard/{request_id}/audit").json()
    assert trail["requestId"] == request_id
    assert [e["event"] for e in trail["events"]][:3] == ["Received", "Queued", "Submitted"]
    since = host.get("/api/offboard/audit", params={"since": trail["events"][0]["at"]}).json()["events"]
    assert [e["event"] for e in since] == [e["event"] for e in trail["events"]]
    assert host.get("/api/offboard/audit").json()["error"]["code"] == "MissingSince"
    # A call refused before it became a request is in the export too, under no request id.
    assert host.post("/api/offboard", {"machineId": "not-a-machine"}).status_code == 400
    since = host.get("/api/offboard/audit", params={"since": trail["events"][0]["at"]}).json()["events"]
    [refused] = [e for e in since if e["event"] == "Rejected"]
    assert "requestId" not in refused and refused["outcome"] == "InvalidMachineId"
    # So is a batch's item refused for what it said, beside the item that became a request.
    batch = host.post("/api/offboard", {"requests": [{"machineId": "bad"}, {"machineId": "b" * 40}]})
    assert [r["status"] for r in batch.json()["results"]] == ["Rejected", "Queued"]
    since = host.get("/api/offboard/audit", params={"since": trail["events"][0]["at"]}).json()["events"]
    assert [e["outcome"] for e in since if e["event"] == "Rejected"] == ["InvalidMachineId"] * 2


def test_approval_always_holds_everything_until_released_and_records_who(
    local_host: HostFactory, defender: DefenderSimulator
) -> None:
    host = local_host(OFFBOARD_APPROVAL="always")
    held = host.post("/api/offboard", {"machineId": MACHINE}).json()
    assert held["status"] == "Held" and held["heldReason"]["code"] == "ApprovalRequired"
    status = host.get(f"/api/offboard/{held['requestId']}").json()
    assert status["heldReason"]["message"].startswith("OFFBOARD_APPROVAL=always")
    time.sleep(1)
    assert defender.offboard_calls() == []
    assert host.post(f"/api/offboard/{held['requestId']}/release").status_code == 401  # a function key
    released = requests.post(
        f"{host.url}/api/offboard/{held['requestId']}/release",
        headers={**ADMIN, "User-Agent": "second-person/1"},
        timeout=10,
    )
    assert released.status_code == 200 and released.json()["releasedBy"] == "agent:second-person/1"
    defender.wait_for_calls(1, MACHINE)
    assert "Released" in [
        e["event"] for e in host.get(f"/api/offboard/{held['requestId']}/audit").json()["events"]
    ]


class _Hook(QuietHandler):
    def do_POST(self) -> None:  # noqa: N802 - http.server naming
        hook = cast(Receiver, self.server.owner)  # type: ignore[attr-defined]
        hook.received.append(json.loads(self.read_body()))
        hook.arrived.set()
        self.send(hook.answer)


class Receiver(LoopbackServer):
    """A loopback webhook, as a Logic App's or a Teams workflow's trigger would be."""

    def __init__(self) -> None:
        self.received: list[Any] = []
        self.arrived = threading.Event()
        self.answer = 202
        super().__init__(_Hook)


@pytest.fixture
def hook() -> Iterator[Receiver]:
    with Receiver() as receiver:
        yield receiver


def test_held_requests_are_announced_once_per_call_without_keys(
    local_host: HostFactory, hook: Receiver
) -> None:
    host = local_host(
        OFFBOARD_APPROVAL="always", OFFBOARD_HOLD_NOTIFY_URL=f"{hook.url}/hook?sig=secret-signature"
    )
    host.post("/api/offboard", batch(MACHINE, OTHER, comment="IR-12"))
    assert hook.arrived.wait(20)
    [note] = hook.received
    assert note["event"] == "OffboardRequestsHeld" and len(note["requests"]) == 2
    assert {r["reason"]["code"] for r in note["requests"]} == {"ApprovalRequired"}
    assert all(r["comment"] == "IR-12" and r["statusUrl"].startswith(host.url) for r in note["requests"])
    text = json.dumps(note) + host.log()
    assert "local-function-key" not in text and "local-master-key" not in text
    assert "secret-signature" not in host.log()  # the notify URL is a secret too


def test_a_failing_notification_never_blocks_the_request(local_host: HostFactory, hook: Receiver) -> None:
    hook.answer = 500
    host = local_host(OFFBOARD_APPROVAL="always", OFFBOARD_HOLD_NOTIFY_URL=f"{hook.url}/hook")
    answer = host.post("/api/offboard", {"machineId": MACHINE})
    assert answer.status_code == 202 and answer.json()["status"] == "Held"
    assert hook.arrived.wait(20)
    until(lambda: "hold notification answered 500" in host.log())
