"""The OpenAPI document says what the app answers: schemathesis against the local host.

1. Schemathesis generates requests for every operation from the stored document, with a fixed
   seed and derandomized (the same requests on every run), its coverage cases plus at most
   MAX_EXAMPLES generated ones per operation, and checks every answer: no server error, and a
   status, content type, body and headers that the document gives for that operation. The key
   goes in the `x-functions-key` header: the master key where the operation's security says
   so (the ADMIN routes), the function key elsewhere. Everything it calls is on loopback.
2. The answers random requests seldom or never reach (every status a request can have, batches,
   held requests and their release, handshakes, idempotency, refusals, the errors of a broken
   deployment) are made on purpose and held to the same checks.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
import schemathesis
from hypothesis.configuration import set_hypothesis_home_dir
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.openapi.checks import JsonSchemaError, UndefinedContentType, UndefinedStatusCode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from localdev.azurite import Azurite, free_port
from localdev.defender_sim import DefenderSimulator
from localdev.host import LOCAL_FUNCTION_KEY, LOCAL_MASTER_KEY, launch
from localdev.identity import IdentityEndpoint
from shared.domain.records import AuditEvent
from shared.domain.statuses import TERMINAL, Status
from shared.http.openapi import DOCUMENT
from shared.runtime import Services
from tests.conftest import MACHINE, RunningHost, adopt

# Hypothesis keeps caches (constants, unicode data) in `.hypothesis` under the working
# directory, which is the repository: the deployment zip would take them (test_package).
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "defender-offboard-hypothesis")
HostFactory = Callable[..., RunningHost]
SEED = 20261201
# Per operation, on top of the coverage phase's cases (about 450 for POST /offboard, a few
# dozen elsewhere): the generated requests take about half a minute on two cores.
MAX_EXAMPLES = 25
CONFIG = schemathesis.Config.from_dict(
    {
        "seed": SEED,
        "generation": {
            "max-examples": MAX_EXAMPLES,
            "deterministic": True,
            "database": "none",
            # The key is not a parameter to fuzz: it goes in the header (see `key_for`).
            "with-security-parameters": False,
        },
        "phases": {
            "stateful": {"enabled": False},
            # TRACE and QUERY never reach the app: the local stand-in's HTTP server answers them
            # itself (501); the methods it passes on are probed.
            "coverage": {"unexpected-methods": ["get", "put", "post", "delete", "options", "patch"]},
        },
    }
)
schema = schemathesis.openapi.from_path(DOCUMENT, config=CONFIG)
CONFORMANCE = [
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
CHECKS = [not_a_server_error, *CONFORMANCE]


def key_for(operation: Any) -> str:
    """The master key where the operation's security names it (ADMIN), else the function key."""
    security = operation.definition.raw.get("security") or []
    return LOCAL_MASTER_KEY if any("masterKey" in scheme for scheme in security) else LOCAL_FUNCTION_KEY


@pytest.fixture(scope="module")
def api(azurite: Azurite) -> Iterator[str]:
    """One local host for every generated request (on each xdist worker that runs them):
    real Azurite, the loopback identity endpoint and Defender simulator, as the `local_host`
    fixture starts it; no queue listeners, so what is accepted stays as it was answered."""
    with (
        IdentityEndpoint() as identity,
        DefenderSimulator(accept_token=lambda token: token in identity.tokens, accept_any=True) as defender,
    ):
        name = f"s{uuid.uuid4().hex[:12]}"
        env = {
            **azurite.app_storage(name),
            "DEFENDER_API_BASE_URL": defender.url,
            "INTUNE_WATCH_SCHEDULE": "0 */5 * * * *",
            **identity.env,
        }
        process, port, log = launch({**os.environ, **env}, "--no-queues", "--no-timers")
        try:
            yield f"http://127.0.0.1:{port}/api"
        finally:
            process.terminate()
            process.wait(10)
            if os.environ.get("SHOW_HOST_LOGS"):
                print(log.read_text(errors="replace"))
            log.unlink(missing_ok=True)


@schema.parametrize()
def test_every_generated_request_is_answered_as_documented(case: Any, api: str) -> None:
    assert urlsplit(api).hostname == "127.0.0.1"  # nothing generated leaves the machine
    key = {"x-functions-key": key_for(case.operation)}
    case.call_and_validate(base_url=api, headers=key, checks=CHECKS, timeout=15, allow_redirects=False)


# ---- 2. the answers made on purpose ------------------------------------------------------


def conforms(
    response: requests.Response, path: str, method: str, checks: list[Any] = CHECKS
) -> requests.Response:
    """The response is one the document gives for that operation: its status, content type,
    body and headers (not a server error either, unless `checks` leaves that out)."""
    names = re.findall(r"\{(\w+)\}", path)
    sent = re.fullmatch(
        re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path), urlsplit(response.url).path[len("/api") :]
    )
    parameters = sent.groupdict() if sent else dict.fromkeys(names, "x")  # e.g. `.` removed by the client
    schema[path][method.upper()].Case(path_parameters=parameters).validate_response(response, checks=checks)
    return response


def fails(kind: type[Exception], response: requests.Response, path: str, method: str) -> None:
    with pytest.raises(FailureGroup) as caught:
        conforms(response, path, method)
    assert {type(e) for e in caught.value.exceptions} == {kind}


def test_the_checks_do_catch_an_answer_the_document_does_not_give(local_host: HostFactory) -> None:
    host = local_host("--no-queues")
    answer = host.post("/api/offboard", {"machineId": MACHINE})
    conforms(answer, "/offboard", "POST")
    fails(UndefinedStatusCode, answer, "/offboard/{requestId}/cancel", "POST")  # it documents no 202
    fails(JsonSchemaError, host.get("/api/offboard"), "/offboard/{requestId}", "GET")  # a list, not a request
    graph = host.post("/api/offboard?validationToken=abc", data=b"")
    conforms(graph, "/offboard", "POST")
    fails(UndefinedContentType, graph, "/openapi.json", "GET")  # text/plain is POST /offboard's only


def status_changes(status: Status) -> dict[str, Any]:
    """What a request in `status` carries besides it, as the worker and intake leave it."""
    action: dict[str, Any] = {"action_id": f"{uuid.uuid4()}", "follow_up": "Scheduled"}
    error = {"last_error_code": "DefenderError", "last_error_message": "it failed"}
    changes: dict[Status, dict[str, Any]] = {
        Status.QUEUED: {"next_attempt_at": "2026-12-01T09:00:00+00:00"},
        Status.THROTTLED: {"next_attempt_at": "2026-12-01T09:01:00+00:00", "attempt": 2, **error},
        Status.HELD: {"held_code": "BreakerTripped", "held_message": "the breaker holds it"},
        Status.SUBMITTED: action,
        Status.PENDING: action,
        Status.IN_PROGRESS: action,
        Status.SUCCEEDED: {**action, "follow_up": None, "note": "done", "released_by": "principal:op"},
        Status.FAILED: {**action, "follow_up": None, **error},
        Status.CANCELLED: {"duplicate_of": "6fa240ec-e2bc-4e35-a722-2edb01bb2028"},
        Status.TIME_OUT: {**action, "follow_up": None},
        Status.REJECTED: {"last_error_code": "ProtectedDevice", "last_error_message": "protected"},
        Status.EXPIRED: {"held_code": "BreakerTripped", "held_message": "held too long"},
        Status.DRY_RUN: {
            "would_send": json.dumps({"method": "POST", "path": "/api/machines/x/offboard", "body": {}})
        },
    }
    return changes[status]


def test_every_status_is_answered_as_documented(
    local_host: HostFactory, make_services: Callable[..., Services]
) -> None:
    host = local_host("--no-queues")
    services = make_services()
    tenant = "72f988bf-86f1-41af-91ab-2d7cd011db47"
    seen = {}
    for status in Status:
        record = services.store.get(
            adopt(services, dry_run=status == Status.DRY_RUN, tenant_id=tenant).request_id
        )
        assert record is not None
        record = services.store.update(
            record, AuditEvent("StatusChanged"), status=status, **status_changes(status)
        )
        answer = conforms(host.get(f"/api/offboard/{record.request_id}"), "/offboard/{requestId}", "GET")
        assert answer.status_code == (200 if status in TERMINAL else 202)
        assert answer.json()["status"] == status
        seen[status] = record.request_id
    # Checks stopped (an offline device): final, whatever Defender's status.
    stopped = services.store.update(
        services.store.get(seen[Status.PENDING]),  # type: ignore[arg-type]
        follow_up="Stopped",
    )
    assert (
        conforms(host.get(f"/api/offboard/{stopped.request_id}"), "/offboard/{requestId}", "GET").status_code
        == 200
    )
    listed = conforms(host.get("/api/offboard", params={"since": "2000-01-01T00:00:00Z"}), "/offboard", "GET")
    assert {r["status"] for r in listed.json()["requests"]} == set(Status)
    assert listed.json()["next"] is None
    trail = conforms(
        host.get(f"/api/offboard/{seen[Status.HELD]}/audit"), "/offboard/{requestId}/audit", "GET"
    )
    assert [e["event"] for e in trail.json()["events"]][-1] == "StatusChanged"
    since = conforms(
        host.get("/api/offboard/audit", params={"since": "2000-01-01T00:00:00Z"}), "/offboard/audit", "GET"
    )
    assert len(since.json()["events"]) >= len(Status)


def test_a_list_page_links_the_next_one(local_host: HostFactory) -> None:
    host = local_host("--no-queues")
    for _ in range(3):  # 102 requests: more than a page of 100
        batch = {"requests": [{"machineId": uuid.uuid4().hex + "0" * 8} for _ in range(34)]}
        assert host.post("/api/offboard", batch).status_code == 202
    first = conforms(host.get("/api/offboard"), "/offboard", "GET").json()
    assert len(first["requests"]) == 100 and first["next"].startswith(f"{host.url}/api/offboard?next=")
    following = conforms(host.get(first["next"].removeprefix(host.url)), "/offboard", "GET").json()
    assert len(following["requests"]) == 2 and following["next"] is None


def test_every_answer_of_the_offboard_route_is_documented(local_host: HostFactory) -> None:
    host = local_host("--no-queues")
    post = "/offboard"
    single = conforms(host.post("/api/offboard", {"machineId": MACHINE}), post, "POST")
    assert single.status_code == 202 and single.json()["status"] == "Queued"
    again = conforms(host.post("/api/offboard", {"machineId": MACHINE}), post, "POST")
    assert again.json()["existingRequest"] is True
    named = conforms(host.post("/api/offboard", {"deviceName": "desktop-7f3k2.contoso.com"}), post, "POST")
    assert named.json()["machineId"] is None and named.json()["lookup"]["by"] == "deviceName"
    other = "2f6cd0e8f524eee8a13d3a43f529813c95e1dd18"
    keyed = {"Idempotency-Key": "IR-7"}
    rehearsal = conforms(
        host.post("/api/offboard", {"machineId": other, "dryRun": True}, headers=keyed), post, "POST"
    )
    replay = conforms(
        host.post("/api/offboard", {"machineId": other, "dryRun": True}, headers=keyed), post, "POST"
    )
    assert rehearsal.json()["dryRun"] is True and replay.json()["replayed"] is True
    reused = conforms(host.post("/api/offboard", {"machineId": MACHINE}, headers=keyed), post, "POST")
    assert reused.status_code == 422 and reused.json()["error"]["code"] == "IdempotencyKeyReused"

    batch = conforms(
        host.post("/api/offboard", {"requests": [{"machineId": f"{7:040x}"}, {"machineId": "nope"}]}),
        post,
        "POST",
    )
    assert batch.status_code == 202 and [r["status"] for r in batch.json()["results"]] == [
        "Queued",
        "Rejected",
    ]
    batch_path = urlsplit(batch.headers["Location"]).path
    waiting = conforms(host.get(batch_path), "/offboard/batches/{batchId}", "GET")
    assert waiting.status_code == 202 and waiting.json()["counts"] == {"Queued": 1}
    [queued] = [r for r in batch.json()["results"] if r["status"] == "Queued"]
    cancelled = conforms(
        host.post(f"/api/offboard/{queued['requestId']}/cancel", {"comment": "wrong one"}),
        "/offboard/{requestId}/cancel",
        "POST",
    )
    assert cancelled.json()["status"] == "Cancelled"
    finished = conforms(
        host.post(f"/api/offboard/{queued['requestId']}/cancel"), "/offboard/{requestId}/cancel", "POST"
    )
    assert finished.status_code == 409 and finished.json()["error"]["code"] == "RequestFinished"
    done = conforms(host.get(batch_path), "/offboard/batches/{batchId}", "GET")
    assert done.status_code == 200 and done.json()["final"] is True
    none_valid = conforms(host.post("/api/offboard", {"requests": [{"machineId": "nope"}]}), post, "POST")
    assert none_valid.status_code == 400 and none_valid.json()["error"]["code"] == "NoValidItems"
    assert none_valid.json()["results"][0]["error"]["code"] == "InvalidMachineId"

    # Webhook senders: handshakes and payloads with nothing to do answer 200.
    event_grid = [
        {
            "id": "1",
            "eventType": "Microsoft.EventGrid.SubscriptionValidationEvent",
            "data": {"validationCode": "512d38b6-c7b8-40c8-89fe-f46f9e9622b6"},
        }
    ]
    validated = conforms(
        host.post("/api/offboard", event_grid, headers={"aeg-event-type": "SubscriptionValidation"}),
        post,
        "POST",
    )
    assert validated.json() == {"validationResponse": "512d38b6-c7b8-40c8-89fe-f46f9e9622b6"}
    ignored = conforms(
        host.post("/api/offboard", [{"id": "2", "eventType": "Other", "data": {}}]), post, "POST"
    )
    assert ignored.status_code == 200 and ignored.json()["results"][0]["status"] == "Ignored"
    graph = conforms(host.post("/api/offboard?validationToken=Validation%3A%20token", data=b""), post, "POST")
    assert graph.status_code == 200 and graph.text == "Validation: token"
    assert graph.headers["Content-Type"].startswith("text/plain")
    options = requests.options(
        f"{host.url}/api/offboard",
        headers={"x-functions-key": LOCAL_FUNCTION_KEY, "WebHook-Request-Origin": "eventgrid.azure.net"},
        timeout=10,
    )
    assert conforms(options, post, "OPTIONS").headers["WebHook-Allowed-Origin"] == "eventgrid.azure.net"
    no_origin = requests.options(
        f"{host.url}/api/offboard", headers={"x-functions-key": LOCAL_FUNCTION_KEY}, timeout=10
    )
    assert conforms(no_origin, post, "OPTIONS").status_code == 400

    # Refusals.
    too_big = host.post(
        "/api/offboard", data=b" " * (64 * 1024 + 1), headers={"Content-Type": "application/json"}
    )
    assert conforms(too_big, post, "POST").status_code == 413
    assert conforms(host.post("/api/offboard", data=b""), post, "POST").json()["error"]["code"] == "EmptyBody"
    # A `.` path segment is removed by the client: the cancel call lands on the status route.
    dotted = conforms(host.post("/api/offboard/./cancel"), "/offboard/{requestId}/cancel", "POST")
    assert dotted.status_code == 405
    # No key: the host answers 401 with no body (so there is no content type to check).
    for path, method in [(post, "POST"), ("/offboard/{requestId}", "GET"), ("/openapi.json", "GET")]:
        url = f"{host.url}/api" + path.replace("{requestId}", single.json()["requestId"])
        unauthorised = requests.request(method, url, timeout=10)
        assert unauthorised.status_code == 401 and unauthorised.content == b""
        conforms(unauthorised, path, method, [status_code_conformance])


def test_held_requests_and_their_release_are_answered_as_documented(local_host: HostFactory) -> None:
    host = local_host("--no-queues", OFFBOARD_APPROVAL="always")
    held = conforms(host.post("/api/offboard", {"machineId": MACHINE}), "/offboard", "POST").json()
    assert held["status"] == "Held" and held["heldReason"]["code"] == "ApprovalRequired"
    status = conforms(host.get(f"/api/offboard/{held['requestId']}"), "/offboard/{requestId}", "GET")
    assert status.status_code == 202 and status.json()["status"] == "Held"
    one = f"/api/offboard/{held['requestId']}/release"
    master = {"x-functions-key": LOCAL_MASTER_KEY}
    refused = host.post(one)  # the function key is not enough
    assert refused.status_code == 401
    conforms(refused, "/offboard/{requestId}/release", "POST", [status_code_conformance])
    released = conforms(host.post(one, headers=master), "/offboard/{requestId}/release", "POST")
    assert released.json()["status"] == "Queued" and released.json()["releasedBy"]
    again = conforms(host.post(one, headers=master), "/offboard/{requestId}/release", "POST")
    assert again.status_code == 409 and again.json()["error"]["code"] == "RequestNotHeld"
    missing = host.post(f"/api/offboard/{uuid.uuid4()}/release", headers=master)
    assert conforms(missing, "/offboard/{requestId}/release", "POST").status_code == 404
    batch = {"requests": [{"machineId": f"{n:040x}"} for n in (1, 2)]}
    assert conforms(host.post("/api/offboard", batch), "/offboard", "POST").status_code == 202
    everything = conforms(
        host.post("/api/offboard/held/release", headers=master), "/offboard/held/release", "POST"
    )
    assert everything.json()["count"] == 2


def test_a_device_another_caller_has_is_a_documented_conflict(local_host: HostFactory) -> None:
    host = local_host("--no-queues", WEBSITE_AUTH_ENABLED="true")
    alice = {"X-MS-CLIENT-PRINCIPAL-ID": "a1", "X-MS-CLIENT-PRINCIPAL-NAME": "alice@contoso.com"}
    bob = {"X-MS-CLIENT-PRINCIPAL-ID": "b2", "X-MS-CLIENT-PRINCIPAL-NAME": "bob@contoso.com"}
    assert host.post("/api/offboard", {"machineId": MACHINE}, headers=alice).status_code == 202
    conflict = conforms(host.post("/api/offboard", {"machineId": MACHINE}, headers=bob), "/offboard", "POST")
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "RequestByAnotherCaller"


def test_a_broken_deployment_answers_the_documented_errors(local_host: HostFactory) -> None:
    """Broken settings are a 500, storage that cannot be reached a 503: both with the error
    body the document gives (they are server errors, so that check is left out here)."""
    misconfigured = local_host("--no-queues", OFFBOARD_BREAKER_LIMIT="lots")
    for path, method in [("/offboard", "POST"), ("/offboard", "GET"), ("/openapi.json", "GET")]:
        answer = requests.request(
            method,
            f"{misconfigured.url}/api{path}",
            json={"machineId": MACHINE},
            headers={"x-functions-key": LOCAL_FUNCTION_KEY},
            timeout=10,
        )
        assert answer.status_code == 500 and answer.json()["error"]["code"] == "ServiceMisconfigured"
        conforms(answer, path, method, CONFORMANCE)
    dead = f"http://127.0.0.1:{free_port()}/devstoreaccount1"
    unreachable = local_host(
        "--no-queues",
        AzureWebJobsStorage=(
            "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
            f"AccountKey={'a' * 86}==;BlobEndpoint={dead};QueueEndpoint={dead};TableEndpoint={dead}"
        ),
    )
    answer = unreachable.get(f"/api/offboard/{uuid.uuid4()}")
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "StorageUnavailable"
    conforms(answer, "/offboard/{requestId}", "GET", CONFORMANCE)
