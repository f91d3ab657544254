"""The error shapes every HTTP handler answers with, whatever fails inside it."""

from __future__ import annotations

import json

import azure.functions as func
import pytest
from azure.core.exceptions import ServiceRequestError

from shared.adapters.request_store import StaleRecord
from shared.domain.errors import IdempotencyKeyReused
from shared.http.responses import answers_errors
from shared.settings import SettingsError

REQUEST = func.HttpRequest(method="GET", url="/api/x", headers={}, params={}, route_params={}, body=b"")


@pytest.mark.parametrize(
    ("failure", "status", "code"),
    [
        (IdempotencyKeyReused("InvalidThing", "the thing is wrong"), 422, "InvalidThing"),
        (RecursionError("maximum recursion depth exceeded"), 500, "InternalError"),
        (KeyError("what a bug looks like"), 500, "InternalError"),
        (SettingsError(["AzureWebJobsStorage is required"]), 500, "ServiceMisconfigured"),
        (ServiceRequestError("connection refused"), 503, "StorageUnavailable"),
        (StaleRecord("r"), 503, "StorageUnavailable"),
    ],
)
def test_failures_become_the_contract_error_body(failure: Exception, status: int, code: str) -> None:
    def handler(req: func.HttpRequest) -> func.HttpResponse:
        raise failure

    response = answers_errors(handler)(REQUEST)
    assert response.status_code == status
    assert json.loads(response.get_body())["error"]["code"] == code
    # Settings problems are for the operator's log, not for the caller.
    assert b"AzureWebJobsStorage" not in response.get_body()


def test_a_handler_that_succeeds_is_untouched() -> None:
    ok = func.HttpResponse("fine", status_code=200)
    assert answers_errors(lambda req: ok)(REQUEST) is ok
