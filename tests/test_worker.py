"""The worker in this process against real Azurite, the real credential and the simulator."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import pytest

from localdev.defender_sim import DefenderSimulator, Reply
from localdev.identity import IdentityEndpoint
from shared.domain.messages import OffboardMessage
from shared.runtime import Services
from shared.worker.worker import Worker
from tests.conftest import MACHINE, Queues, adopt, offboard_message


def test_sends_exactly_the_documented_request(
    make_worker: Callable[..., Worker],
    defender: DefenderSimulator,
    identity: IdentityEndpoint,
    queues: Queues,
) -> None:
    make_worker().process(offboard_message(comment="Offboard machine by automation"))

    [call] = defender.offboard_calls()
    assert call.method == "POST" and call.path == f"/api/machines/{MACHINE}/offboard"
    assert call.headers["Content-Type"] == "application/json"
    [(token, resource, client_id)] = identity.issued
    assert call.headers["Authorization"] == f"Bearer {token}"
    assert resource == "https://api.securitycenter.microsoft.com" and client_id is None
    assert call.json() == {"Comment": "Offboard machine by automation"}
    # What is left on the queue is the delayed status check, not the offboard.
    assert queues.count() == 1 and queues.peek() == [] and queues.count("-poison") == 0


def test_one_token_serves_many_calls(make_worker: Callable[..., Worker], identity: IdentityEndpoint) -> None:
    worker = make_worker()
    for _ in range(3):
        worker.process(offboard_message())
    assert len(identity.issued) == 1


def test_user_assigned_identity_is_asked_for_by_client_id(
    make_worker: Callable[..., Worker], identity: IdentityEndpoint
) -> None:
    make_worker(MANAGED_IDENTITY_CLIENT_ID="0f1e2d3c-0000-4000-8000-000000000001").process(offboard_message())
    assert identity.issued[0][2] == "0f1e2d3c-0000-4000-8000-000000000001"


def test_throttled_request_is_requeued_invisible_for_retry_after(
    make_worker: Callable[..., Worker], defender: DefenderSimulator, queues: Queues
) -> None:
    defender.script(MACHINE, Reply.error(429, "TooManyRequests", **{"Retry-After": "3"}))
    message = offboard_message()
    make_worker().process(message)

    assert queues.count() == 1 and queues.peek() == []  # there, but invisible
    time.sleep(3.2)
    [requeued] = queues.peek()
    assert requeued["requestId"] == message.request_id
    assert requeued["attempt"] == 2 and requeued["failures"] == 0


def test_server_error_is_requeued_with_backoff_and_counted(
    make_worker: Callable[..., Worker], defender: DefenderSimulator, queues: Queues
) -> None:
    defender.script(MACHINE, Reply.error(503, "ServiceUnavailable"))
    make_worker().process(offboard_message())
    assert queues.count() == 1
    [requeued] = queues.wait_for("", timeout=5)
    assert requeued["attempt"] == 2 and requeued["failures"] == 1


def test_slow_defender_is_a_transient_failure(
    make_worker: Callable[..., Worker], defender: DefenderSimulator, queues: Queues
) -> None:
    defender.script(MACHINE, Reply(201, {"id": "late"}, delay_seconds=2))
    make_worker().process(offboard_message())  # read timeout is 1 s in tests
    assert queues.count() == 1 and queues.count("-poison") == 0


def test_not_found_is_poisoned_with_the_reason(
    make_worker: Callable[..., Worker], defender: DefenderSimulator, queues: Queues
) -> None:
    defender.script(MACHINE, Reply.error(404, "NotFound", "Machine was not found"))
    message = offboard_message()
    make_worker().process(message)
    [record] = queues.peek("-poison")
    assert record["reason"] == {"code": "NotFound", "message": "Machine was not found", "status": 404}
    poisoned = OffboardMessage.from_json(__import__("json").dumps(record["message"]))
    assert poisoned == dataclasses.replace(message, prechecked=True)  # the precheck had passed
    assert queues.count() == 0


def test_retries_end_in_poison_at_the_attempt_limit(
    make_worker: Callable[..., Worker], defender: DefenderSimulator, queues: Queues
) -> None:
    defender.script(MACHINE, Reply.error(500, "InternalServerError"))
    make_worker().process(offboard_message(attempt=3, failures=2))  # OFFBOARD_MAX_ATTEMPTS=3
    [record] = queues.peek("-poison")
    assert record["reason"]["code"] == "RetriesExhausted"


def test_forbidden_is_a_configuration_failure_with_a_long_delay(
    make_worker: Callable[..., Worker], defender: DefenderSimulator, queues: Queues, caplog: object
) -> None:
    defender.script(MACHINE, Reply.error(403, "Forbidden"))
    make_worker().process(offboard_message())
    assert queues.count() == 1 and queues.peek() == []  # waiting OFFBOARD_CONFIG_RETRY_SECONDS
    assert "Machine.Offboard" in caplog.text  # type: ignore[attr-defined]


def test_token_endpoint_down_loses_nothing(
    make_worker: Callable[..., Worker],
    defender: DefenderSimulator,
    identity: IdentityEndpoint,
    queues: Queues,
) -> None:
    worker = make_worker()
    identity.close()
    message = offboard_message()
    worker.process(message)
    assert defender.offboard_calls() == []
    assert queues.count() == 1 and queues.count("-poison") == 0


def test_unreadable_message_is_poisoned_without_calling_defender(
    make_worker: Callable[..., Worker], defender: DefenderSimulator, queues: Queues
) -> None:
    make_worker().handle(b'{"v": 99, "machineId": "x"}', "m1")
    [record] = queues.peek("-poison")
    assert record["reason"]["code"] == "MalformedMessage"
    assert "unknown schema version 99" in record["reason"]["message"]
    assert record["message"] == '{"v": 99, "machineId": "x"}'
    assert defender.calls == []


def test_secrets_never_reach_the_logs(
    make_worker: Callable[..., Worker],
    defender: DefenderSimulator,
    identity: IdentityEndpoint,
    caplog: object,
) -> None:
    defender.script(MACHINE, Reply.error(401, "Unauthorized"), Reply.error(503, "Unavailable"))
    worker = make_worker()
    for _ in range(3):
        worker.process(offboard_message())
    text = caplog.text  # type: ignore[attr-defined]
    assert identity.issued and all(token not in text for token in identity.tokens)
    assert identity.header_secret not in text


def test_a_message_the_host_poisons_marks_its_request_failed(services: Services) -> None:
    worker = services.worker()
    message = adopt(services)
    worker.give_up(message.to_json().encode(), "ServiceRequestError: storage down")
    record = worker.store.get(message.request_id)
    assert record is not None and record.status == "Failed" and record.last_error_code == "PoisonedByHost"
    assert record.final


def test_the_worker_knows_the_hosts_dequeue_limit() -> None:
    import json
    from pathlib import Path

    import function_app

    host = json.loads((Path(__file__).parent.parent / "host.json").read_text())
    assert host["extensions"]["queues"]["maxDequeueCount"] == function_app.MAX_DEQUEUE_COUNT


def test_broken_settings_on_the_last_delivery_still_leave_the_poisoning_to_the_host(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # With the settings broken the failure cannot be written on the request either; the
    # function must still raise the original error (so the host poisons the message) and say
    # in the log that the request was left as it was.
    from azure.functions.queue import QueueMessage

    import function_app
    from shared import runtime
    from shared.settings import SettingsError, get_settings

    monkeypatch.setenv("OFFBOARD_MAX_ATTEMPTS", "0")
    for cache in (get_settings, runtime._services, runtime._worker):
        cache.cache_clear()
    try:
        last = function_app.MAX_DEQUEUE_COUNT
        message = QueueMessage(id="m-1", body=b"{}", dequeue_count=last)  # type: ignore[no-untyped-call]
        with pytest.raises(SettingsError, match="OFFBOARD_MAX_ATTEMPTS"):
            function_app.offboard_worker(message)
        assert "Could not record the failure on the request" in caplog.text
    finally:
        for cache in (get_settings, runtime._services, runtime._worker):
            cache.cache_clear()
