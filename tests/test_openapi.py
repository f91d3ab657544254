"""The custom connector's OpenAPI document: valid OpenAPI 2.0, and true to the app's routes."""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Callable
from typing import Any

import pytest
import requests
from azure.functions.decorators.http import HttpTrigger
from openapi_spec_validator import validate
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError

from function_app import app
from shared.domain.statuses import Status
from shared.http.openapi import DOCUMENT
from tests.conftest import RunningHost


def stored() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DOCUMENT.read_text())
    return document


@functools.cache
def _http_routes() -> tuple[tuple[str, str, str], ...]:
    """(path, method, auth level) of every HTTP route, as OpenAPI names them. Once per process:
    azure-functions refuses to index the same app twice."""
    routes = []
    for function in app.get_functions():
        trigger = function.get_trigger()
        if isinstance(trigger, HttpTrigger):
            level = str(getattr(trigger.auth_level, "value", trigger.auth_level)).lower()
            # "offboard/{requestId:guid}" is "/offboard/{requestId}" in OpenAPI.
            path = "/" + re.sub(r"\{(\w+):[^}]*\}", r"{\1}", trigger.route or "")
            for method in trigger.methods or []:
                routes.append((path, str(getattr(method, "value", method)).lower(), level))
    return tuple(routes)


def app_routes(level: str | None = None) -> set[tuple[str, str]]:
    """The app's HTTP routes (of one auth level: "function", "admin")."""
    return {(path, method) for path, method, at in _http_routes() if level in (None, at)}


def operations(document: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(path, method): op for path, item in document["paths"].items() for method, op in item.items()}


def documented_routes(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {(path, method) for path, item in document["paths"].items() for method in item}


def test_the_stored_document_is_valid_openapi_2() -> None:
    document = stored()
    assert document["swagger"] == "2.0"
    validate(document)


def test_the_validator_does_catch_a_broken_document() -> None:
    broken = copy.deepcopy(stored())
    del broken["paths"]["/offboard"]["post"]["responses"]
    with pytest.raises(OpenAPIValidationError):
        validate(broken)


def test_the_document_describes_exactly_the_routes_the_app_has() -> None:
    documented, real = documented_routes(stored()), app_routes()
    missing_from_app = documented - real
    undocumented = real - documented
    assert not missing_from_app, f"documented but not in the app: {missing_from_app}"
    assert not undocumented, f"in the app but not documented: {undocumented}"
    assert ("/offboard", "post") in real and ("/offboard", "options") in real


def test_the_admin_routes_are_the_ones_documented_with_the_master_key() -> None:
    master: list[dict[str, list[str]]] = [{"masterKey": []}, {"masterKeyHeader": []}]
    documented = {route for route, op in operations(stored()).items() if op.get("security") == master}
    assert (
        documented
        == app_routes("admin")
        == {
            ("/offboard/held/release", "post"),
            ("/offboard/{requestId}/release", "post"),
        }
    )
    for route in documented:  # operators' calls, not a connector user's
        assert operations(stored())[route]["x-ms-visibility"] == "internal"
        assert "ADMIN: master key" in operations(stored())[route]["summary"]


def test_every_operation_is_named_and_documents_the_answers_every_route_can_give() -> None:
    ids = [op["operationId"] for op in operations(stored()).values()]
    assert len(set(ids)) == len(ids)
    for route, op in operations(stored()).items():
        assert op["summary"], route
        # Every route is behind a key (the host's 401) and answers_errors (500, with the body).
        assert {"401", "500"} <= set(op["responses"]), route
        assert op["responses"]["500"]["schema"] == {"$ref": "#/definitions/Error"}, route


def test_every_status_is_documented() -> None:
    definitions = stored()["definitions"]
    statuses = [s.value for s in Status]
    assert definitions["OffboardStatus"]["properties"]["status"]["enum"] == statuses
    assert definitions["OffboardAccepted"]["properties"]["status"]["enum"] == statuses
    assert definitions["ItemResult"]["properties"]["status"]["enum"] == [*statuses, "Ignored"]
    assert definitions["BatchItem"]["properties"]["status"]["enum"] == [*statuses, "Unknown"]
    [status] = [p for p in stored()["paths"]["/offboard"]["get"]["parameters"] if p["name"] == "status"]
    assert status["enum"] == statuses


def test_status_route_follows_the_async_pattern() -> None:
    get = stored()["paths"]["/offboard/{requestId}"]["get"]
    assert set(get["responses"]) >= {"200", "202", "400", "404"}
    assert set(get["responses"]["202"]["headers"]) == {"Location", "Retry-After"}
    post = stored()["paths"]["/offboard"]["post"]
    assert set(post["responses"]["202"]["headers"]) == {"Location", "Retry-After"}


def test_the_key_travels_in_the_query_so_location_can_carry_it() -> None:
    definitions = stored()["securityDefinitions"]
    # A custom connector uses the first security definition: the key in ?code=.
    assert next(iter(definitions)) == "functionKey"
    assert definitions["functionKey"] == {
        "type": "apiKey",
        "in": "query",
        "name": "code",
        "description": "The function key of the offboard function.",
    }
    # Other callers may send it in the header instead (Location then carries no key).
    assert definitions["functionKeyHeader"]["in"] == "header"
    assert definitions["functionKeyHeader"]["name"] == "x-functions-key"
    assert stored()["security"] == [{"functionKey": []}, {"functionKeyHeader": []}]


def test_served_with_this_apps_host_and_behind_the_key(local_host: Callable[..., RunningHost]) -> None:
    host = local_host("--no-queues")
    response = requests.get(
        f"{host.url}/api/openapi.json", headers={"x-functions-key": "local-function-key"}, timeout=10
    )
    assert response.status_code == 200
    served = response.json()
    assert served["host"] == host.url.removeprefix("http://") and served["schemes"] == ["http"]
    validate(served)
    assert requests.get(f"{host.url}/api/openapi.json", timeout=10).status_code == 401
