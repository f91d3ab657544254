"""Quiet, useful logs: under the Functions Python worker every record at INFO and above is a
user log (Application Insights bills it by the gigabyte). The Azure SDKs log each HTTP
exchange at INFO; the app sets them to OFFBOARD_SDK_LOG_LEVEL (WARNING) on first use, so an
invocation's INFO records are the app's own: at most three on the normal path."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime

import azure.functions as func
import pytest
from azure.functions.queue import QueueMessage

import function_app
from shared import runtime, settings
from tests.conftest import MACHINE, Queues

SDK = ("azure", "msal", "urllib3")


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def take(self) -> list[logging.LogRecord]:
        taken, self.records = self.records, []
        return [r for r in taken if r.levelno >= logging.INFO]


@pytest.fixture
def app(app_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[Records]:
    """The app's own handlers, with its process-wide services built from the test's settings
    on first use, as on a fresh instance; every record the worker would forward is kept."""
    for name, value in app_env.items():
        monkeypatch.setenv(name, value)
    for name in SDK:  # as a fresh worker process has them: nothing set
        logging.getLogger(name).setLevel(logging.NOTSET)
    settings.get_settings.cache_clear()
    runtime._services.cache_clear()
    runtime._worker.cache_clear()
    records = Records()
    root = logging.getLogger()
    old_level = root.level
    root.setLevel(logging.INFO)  # the Python worker forwards INFO and above
    root.addHandler(records)
    yield records
    root.removeHandler(records)
    root.setLevel(old_level)
    settings.get_settings.cache_clear()
    runtime._services.cache_clear()
    runtime._worker.cache_clear()
    for name in SDK:
        logging.getLogger(name).setLevel(logging.WARNING)


def post(body: bytes) -> func.HttpResponse:
    request = func.HttpRequest(
        method="POST",
        url="http://127.0.0.1:7071/api/offboard",
        headers={"content-type": "application/json"},
        params={},
        route_params={},
        body=body,
    )
    response: func.HttpResponse = function_app.offboard(request)
    return response


def deliver(queues: Queues) -> None:
    client = queues.client()
    [received] = client.receive_messages(max_messages=1)
    import base64

    message = QueueMessage(  # type: ignore[no-untyped-call]
        id=received.id,
        body=base64.b64decode(received.content),
        dequeue_count=received.dequeue_count,
        pop_receipt=received.pop_receipt,
        insertion_time=datetime.now(UTC),
        expiration_time=None,
        time_next_visible=None,
    )
    function_app.offboard_worker(message)
    client.delete_message(received)


def test_an_invocation_logs_only_the_apps_own_lines(app: Records, queues: Queues) -> None:
    assert post(b'{"machineId": "%s"}' % MACHINE.encode()).status_code == 202
    intake = app.take()
    deliver(queues)  # the offboard
    worker = app.take()
    for invocation in (intake, worker):
        sources = {r.name.split(".")[0] for r in invocation}
        assert sources <= {"shared", "function_app"}, [(r.name, r.getMessage()) for r in invocation]
        assert 1 <= len(invocation) <= 3, [r.getMessage() for r in invocation]
    [submitted] = [r.getMessage() for r in worker if "submitted" in r.getMessage()]
    assert MACHINE in submitted and "request fe" in submitted  # the ids a search needs


def test_the_sdk_logs_can_be_turned_back_up_for_debugging(
    app: Records, queues: Queues, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OFFBOARD_SDK_LOG_LEVEL", "INFO")
    post(b'{"machineId": "%s"}' % MACHINE.encode())
    assert any(r.name.startswith("azure.") for r in app.take())


def test_the_sdk_loggers_are_left_alone_at_import() -> None:
    import importlib

    logging.getLogger("azure").setLevel(logging.NOTSET)
    importlib.reload(function_app)
    assert logging.getLogger("azure").level == logging.NOTSET  # set on first use, not at import
    logging.getLogger("azure").setLevel(logging.WARNING)


def test_debugging_the_sdks_never_logs_request_lines_with_their_query() -> None:
    # urllib3 logs each request line, query included, at DEBUG: the hold-notify webhook's URL
    # carries its signature in the query, so DEBUG for the SDKs stops short of urllib3's.
    from shared.runtime import quiet_sdk_logs

    try:
        quiet_sdk_logs("DEBUG")
        assert logging.getLogger("azure").level == logging.DEBUG
        assert not logging.getLogger("urllib3.connectionpool").isEnabledFor(logging.DEBUG)
    finally:
        quiet_sdk_logs("WARNING")
