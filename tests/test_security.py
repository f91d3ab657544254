"""What a security review found, each through the local host over real HTTP: who may read and
cancel a request, URLs that never come from a forged Host, no bare 500, bounded bodies, one
line per caller, duplicate keys refused."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest
import requests

from localdev.host import LOCAL_FUNCTION_KEY, LOCAL_MASTER_KEY
from shared.adapters.entities import Query
from shared.runtime import Services
from tests.conftest import MACHINE, Queues, RunningHost

HostFactory = Callable[..., RunningHost]
OTHER = "2f6cd0e8f524eee8a13d3a43f529813c95e1dd18"
AUTH = {"WEBSITE_AUTH_ENABLED": "true"}


def principal(object_id: str, name: str, *roles: str) -> dict[str, str]:
    """The headers App Service authentication sets (and strips from what callers send)."""
    claims = [{"typ": "roles", "val": role} for role in roles]
    encoded = base64.b64encode(json.dumps({"auth_typ": "aad", "claims": claims}).encode()).decode()
    return {
        "X-MS-CLIENT-PRINCIPAL-ID": object_id,
        "X-MS-CLIENT-PRINCIPAL-NAME": name,
        "X-MS-CLIENT-PRINCIPAL": encoded,
    }


ALICE = principal("a1", "alice@contoso.com")
BOB = principal("b2", "bob@contoso.com")
OPERATOR = principal("o3", "soc@contoso.com", "Offboard.Operator")


# ---- 1. who may read and cancel a request -----------------------------------------------


def test_with_authentication_a_request_belongs_to_its_principal(local_host: HostFactory) -> None:
    host = local_host("--no-queues", **AUTH)
    mine = host.post(
        "/api/offboard", {"machineId": MACHINE, "comment": "IR-7: Alice's"}, headers=ALICE
    ).json()
    path = f"/api/offboard/{mine['requestId']}"
    assert host.get(path, headers=ALICE).json()["caller"] == "principal:alice@contoso.com"
    assert host.get(path, headers=OPERATOR).status_code == 202  # operators see every request
    hidden = host.get(path, headers=BOB)
    assert hidden.status_code == 404 and "IR-7" not in hidden.text
    assert host.post(path + "/cancel", headers=BOB).status_code == 404
    assert host.get(path + "/audit", headers=BOB).status_code == 404
    # Bob asking for the same device learns neither the request nor its comment.
    again = host.post("/api/offboard", {"machineId": MACHINE}, headers=BOB)
    assert again.status_code == 409 and again.json()["error"]["code"] == "RequestByAnotherCaller"
    assert mine["requestId"] not in again.text
    # Lists show a caller its own requests; an operator all.
    host.post("/api/offboard", {"machineId": OTHER}, headers=BOB)
    assert {r["requestId"] for r in host.get("/api/offboard", headers=ALICE).json()["requests"]} == {
        mine["requestId"]
    }
    assert len(host.get("/api/offboard", headers=OPERATOR).json()["requests"]) == 2
    cancelled = host.post(path + "/cancel", headers=OPERATOR)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "Cancelled"


def test_principal_headers_count_only_with_authentication_on(local_host: HostFactory) -> None:
    host = local_host("--no-queues")  # WEBSITE_AUTH_ENABLED unset: every key holder is trusted
    mine = host.post("/api/offboard", {"machineId": MACHINE}, headers=ALICE).json()
    seen = host.get(f"/api/offboard/{mine['requestId']}", headers=BOB)
    assert seen.status_code == 202 and seen.json()["caller"].startswith("agent:")


def test_cancel_can_require_the_master_key(local_host: HostFactory) -> None:
    host = local_host("--no-queues", OFFBOARD_CANCEL="admin")
    request_id = host.post("/api/offboard", {"machineId": MACHINE}).json()["requestId"]
    assert host.post(f"/api/offboard/{request_id}/cancel").status_code == 401
    admin = host.post(f"/api/offboard/{request_id}/cancel", headers={"x-functions-key": LOCAL_MASTER_KEY})
    assert admin.status_code == 200 and admin.json()["status"] == "Cancelled"


# ---- 2. URLs never built from the request's Host header ----------------------------------


@pytest.mark.parametrize(
    "forged", ["legit.azurewebsites.net@evil.example", "evil.example", "evil.example:443"]
)
def test_a_forged_host_never_reaches_a_url(local_host: HostFactory, forged: str) -> None:
    host = local_host("--no-queues")
    response = requests.post(
        f"{host.url}/api/offboard?code={LOCAL_FUNCTION_KEY}",
        json={"machineId": MACHINE},
        headers={"Host": forged},
        timeout=10,
    )
    body = response.json()
    assert body["statusUrl"].startswith(host.url + "/api/offboard/")
    assert response.headers["Location"] == f"{body['statusUrl']}?code={LOCAL_FUNCTION_KEY}"
    document = requests.get(
        f"{host.url}/api/openapi.json",
        headers={"Host": forged, "x-functions-key": LOCAL_FUNCTION_KEY},
        timeout=10,
    ).json()
    assert document["host"] == host.url.removeprefix("http://") and "evil" not in json.dumps(document)


def test_a_configured_public_base_url_is_what_callers_are_sent_to(local_host: HostFactory) -> None:
    host = local_host("--no-queues", OFFBOARD_PUBLIC_BASE_URL="https://offboard.contoso.com")
    response = host.post(f"/api/offboard?code={LOCAL_FUNCTION_KEY}", {"machineId": MACHINE}, key=False)
    assert response.json()["statusUrl"].startswith("https://offboard.contoso.com/api/offboard/")
    assert response.headers["Location"].startswith("https://offboard.contoso.com/api/offboard/")


# ---- 3-6. no bare 500, bounded bodies, one-line callers, no duplicate keys ---------------


def rejected(services: Services) -> list[dict[str, Any]]:
    return [dict(s.entity) for s in services.audit.query(Query())]


@pytest.mark.parametrize(
    "route", ["/api/offboard", "/api/offboard/6fa240ec-e2bc-4e35-a722-2edb01bb2028/cancel"]
)
def test_deeply_nested_json_is_a_400_with_the_error_body(local_host: HostFactory, route: str) -> None:
    host = local_host("--no-queues")
    response = host.post(route, data=b"[" * 60_000, headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "InvalidJson"


def test_a_refused_body_is_recorded_as_rejected(
    local_host: HostFactory, make_services: Callable[..., Services]
) -> None:
    host = local_host("--no-queues")
    host.post("/api/offboard", data=b"[" * 60_000, headers={"Content-Type": "application/json"})
    [event] = rejected(make_services())
    assert event["event"] == "Rejected" and event["outcome"] == "InvalidJson"


def test_the_cancel_route_refuses_a_body_over_the_limit(local_host: HostFactory) -> None:
    host = local_host("--no-queues")
    request_id = host.post("/api/offboard", {"machineId": MACHINE}).json()["requestId"]
    big = json.dumps({"comment": "x" * 70_000}).encode()
    response = host.post(
        f"/api/offboard/{request_id}/cancel", data=big, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413 and response.json()["error"]["code"] == "PayloadTooLarge"
    assert host.get(f"/api/offboard/{request_id}").json()["status"] == "Queued"


def test_a_folded_user_agent_is_one_line_in_the_audit_trail(
    local_host: HostFactory, make_services: Callable[..., Services]
) -> None:
    host = local_host("--no-queues")
    # The local host passes the header on as a client folded it: CR and LF included.
    raw = (
        f"POST /api/offboard HTTP/1.1\r\nHost: 127.0.0.1\r\nx-functions-key: {LOCAL_FUNCTION_KEY}\r\n"
        "User-Agent: playbook/1.0\r\n \r\nforged: line\r\nContent-Type: application/json\r\n"
    )
    body = json.dumps({"machineId": MACHINE}).encode()
    request_id = send_raw(host, raw.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    caller = host.get(f"/api/offboard/{request_id}").json()["caller"]
    assert "\r" not in caller and "\n" not in caller
    events = make_services().store.events(request_id)
    assert all("\n" not in e.get("caller", "") and "\r" not in e.get("caller", "") for e in events)


def send_raw(host: RunningHost, data: bytes) -> str:
    import socket

    port = int(host.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    return str(json.loads(reply.split(b"\r\n\r\n", 1)[1])["requestId"])


def test_duplicate_keys_are_refused_and_nothing_is_queued(local_host: HostFactory, queues: Queues) -> None:
    host = local_host("--no-queues")
    body = b'{"machineId": "%s", "dryRun": true, "dryRun": false}' % MACHINE.encode()
    response = host.post("/api/offboard", data=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "DuplicateKey"
    assert queues.count() == 0
