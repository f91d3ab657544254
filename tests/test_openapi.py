"""The custom connector's OpenAPI document: valid OpenAPI 2.0, and true to the app's routes."""

from __future__ import annotations

import copy
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
from shared.http.openapi import DOCUMENT
from tests.conftest import RunningHost

# Operator routes (ADMIN level, the master key) are not for a custom connector's users.
ADMIN_ONLY = {("/offboard/held/release", "post"), ("/offboard/{requestId}/release", "post")}


def stored() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DOCUMENT.read_text())
    return document


def app_routes() -> set[tuple[str, str]]:
    routes: set[tuple[str, str]] = set()
    for function in app.get_functions():
        trigger = function.get_trigger()
        if isinstance(trigger, HttpTrigger):
            # "offboard/{requestId:guid}" is "/offboard/{requestId}" in OpenAPI.
            path = "/" + re.sub(r"\{(\w+):[^}]*\}", r"{\1}", trigger.route or "")
            for method in trigger.methods or []:
                routes.add((path, str(getattr(method, "value", method)).lower()))
    return routes


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
    undocumented = real - documented - ADMIN_ONLY
    assert not missing_from_app, f"documented but not in the app: {missing_from_app}"
    assert not undocumented, f"in the app but not documented: {undocumented}"
    assert ("/offboard", "post") in real and ("/offboard", "options") in real


def test_status_route_follows_the_async_pattern() -> None:
    get = stored()["paths"]["/offboard/{requestId}"]["get"]
    assert set(get["responses"]) >= {"200", "202", "400", "404"}
    assert set(get["responses"]["202"]["headers"]) == {"Location", "Retry-After"}
    post = stored()["paths"]["/offboard"]["post"]
    assert set(post["responses"]["202"]["headers"]) == {"Location", "Retry-After"}


def test_the_key_travels_in_the_query_so_location_can_carry_it() -> None:
    assert stored()["securityDefinitions"]["functionKey"] == {
        "type": "apiKey",
        "in": "query",
        "name": "code",
        "description": "The function key of the offboard function.",
    }


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
