"""classify(): every row of the outcome table in design.md, and Retry-After parsing."""

from __future__ import annotations

import dataclasses
import json
import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
import requests

from shared.domain.errors import ConnectionFailed, NoResponse, TokenUnavailable
from shared.domain.outcome import (
    MAX_DELAY_SECONDS,
    Failed,
    Requeue,
    RetryKind,
    RetryPolicy,
    Succeeded,
    backoff_seconds,
    classify,
    parse_retry_after,
)

NOW = datetime(2026, 11, 23, 10, 0, 0, tzinfo=UTC)
POLICY = RetryPolicy(max_attempts=4, base_seconds=10, max_seconds=100, config_seconds=900)


def response(status: int, body: object = None, **headers: str) -> requests.Response:
    r = requests.Response()
    r.status_code = status
    r.headers.update(headers)
    r._content = b"" if body is None else json.dumps(body).encode()
    return r


def error(status: int, code: str, **headers: str) -> requests.Response:
    return response(status, {"error": {"code": code, "message": f"{code} happened"}}, **headers)


def decide(result: requests.Response | Exception, failures: int = 0) -> object:
    return classify(result, failures=failures, policy=POLICY, now=NOW, rng=random.Random(7))  # type: ignore[arg-type]


@pytest.mark.parametrize("status", [200, 201])
def test_machine_action_is_success_with_its_id(status: int) -> None:
    outcome = decide(response(status, {"id": "a1b2", "type": "Offboard", "status": "Pending"}))
    assert isinstance(outcome, Succeeded)
    assert outcome.action_id == "a1b2" and not outcome.already_pending


def test_success_without_a_readable_body_is_still_success() -> None:
    outcome = decide(response(201))
    assert isinstance(outcome, Succeeded) and outcome.action_id is None


def test_active_request_already_exists_is_success() -> None:
    outcome = decide(error(400, "ActiveRequestAlreadyExists"))
    assert outcome == Succeeded(already_pending=True)


@pytest.mark.parametrize(
    "code", ["OsPlatformNotSupported", "InvalidRequestBody", "BadRequest", "InvalidInput"]
)
def test_other_400s_fail_permanently_with_the_reason(code: str) -> None:
    outcome = decide(error(400, code))
    assert outcome == Failed(code, f"{code} happened", 400)


def test_400_without_an_error_body_still_fails_with_a_code() -> None:
    outcome = decide(response(400))
    assert isinstance(outcome, Failed) and outcome.code == "Http400"


@pytest.mark.parametrize("code", ["NotFound", "ResourceNotFound"])
def test_404_fails_permanently(code: str) -> None:
    outcome = decide(error(404, code))
    assert isinstance(outcome, Failed) and outcome.code == code and outcome.status == 404


def test_429_requeues_after_retry_after_and_is_not_a_failure() -> None:
    outcome = decide(error(429, "TooManyRequests", **{"Retry-After": "7"}), failures=POLICY.max_attempts)
    assert outcome == Requeue(RetryKind.THROTTLED, 7, "TooManyRequests", "TooManyRequests happened")


def test_429_without_retry_after_waits_about_a_minute_with_jitter() -> None:
    delays = {
        classify(response(429), failures=0, policy=POLICY, now=NOW, rng=random.Random(seed)).delay_seconds  # type: ignore[union-attr]
        for seed in range(20)
    }
    assert all(60 <= d <= 75 for d in delays)
    assert len(delays) > 3  # jittered, so throttled workers don't all return at once


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408])
def test_server_errors_back_off_exponentially(status: int) -> None:
    first = decide(response(status), failures=0)
    second = decide(response(status), failures=1)
    assert isinstance(first, Requeue) and isinstance(second, Requeue)
    assert first.kind is RetryKind.TRANSIENT
    assert 5 <= first.delay_seconds <= 10 and 10 <= second.delay_seconds <= 20


@pytest.mark.parametrize("exc", [ConnectionFailed("refused"), NoResponse("read timeout")])
def test_transport_errors_are_transient(exc: Exception) -> None:
    outcome = decide(exc)
    assert isinstance(outcome, Requeue) and outcome.kind is RetryKind.TRANSIENT


def test_transient_failures_stop_at_the_attempt_limit() -> None:
    assert isinstance(decide(response(503), failures=POLICY.max_attempts - 2), Requeue)
    outcome = decide(response(503), failures=POLICY.max_attempts - 1)
    assert isinstance(outcome, Failed) and outcome.code == "RetriesExhausted"
    assert "after 4 attempts" in outcome.message


@pytest.mark.parametrize(
    ("result", "code", "hint"),
    [
        (error(401, "Unauthorized"), "Unauthorized", "DEFENDER_API_SCOPE"),
        (error(403, "Forbidden"), "Forbidden", "Machine.Offboard"),
    ],
)
def test_configuration_failures_wait_long_and_say_what_to_fix(result: object, code: str, hint: str) -> None:
    outcome = decide(result)  # type: ignore[arg-type]
    assert isinstance(outcome, Requeue)
    assert outcome.kind is RetryKind.CONFIGURATION and outcome.delay_seconds == 900
    assert outcome.code == code and hint in outcome.message
    final = decide(result, failures=POLICY.max_attempts - 1)  # type: ignore[arg-type]
    assert isinstance(final, Failed) and final.code == code


def test_a_token_hiccup_is_retried_within_seconds_and_a_lasting_one_is_configuration() -> None:
    result = TokenUnavailable("CredentialUnavailableError: (invalid_scope) 500")
    delays = []
    for failures in range(3):
        outcome = decide(result, failures=failures)
        assert isinstance(outcome, Requeue) and outcome.kind is RetryKind.TRANSIENT
        delays.append(outcome.delay_seconds)
    assert delays[0] <= 2 and delays[1] <= 4 and delays[2] <= 8 and sum(delays) <= 14
    patient = dataclasses.replace(POLICY, max_attempts=8)
    lasting = classify(result, failures=3, policy=patient, now=NOW, rng=random.Random(0))
    assert isinstance(lasting, Requeue) and lasting.kind is RetryKind.CONFIGURATION
    assert lasting.delay_seconds == 900 and "MANAGED_IDENTITY_CLIENT_ID" in lasting.message
    final = decide(result, failures=POLICY.max_attempts - 1)
    assert isinstance(final, Failed) and final.code == "TokenUnavailable"


@pytest.mark.parametrize("status", [405, 409, 413, 415, 302])
def test_unexpected_statuses_fail_rather_than_loop(status: int) -> None:
    assert isinstance(decide(response(status)), Failed)


class TestRetryAfter:
    def test_seconds(self) -> None:
        assert parse_retry_after("7", NOW) == 7

    def test_http_date(self) -> None:
        assert parse_retry_after(format_datetime(NOW + timedelta(seconds=90), usegmt=True), NOW) == 90

    def test_date_in_the_past_means_now(self) -> None:
        assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", NOW) == 0

    @pytest.mark.parametrize("value", [None, "", "-5", "soon", "1.5e3", "٣", "Mon, 99 Foo 2026"])
    def test_missing_negative_or_garbage_is_ignored(self, value: str | None) -> None:
        assert parse_retry_after(value, NOW) is None

    def test_huge_values_are_clamped_to_what_a_queue_can_delay(self) -> None:
        assert parse_retry_after("999999999999", NOW) == MAX_DELAY_SECONDS
        far = format_datetime(NOW + timedelta(days=30), usegmt=True)
        assert parse_retry_after(far, NOW) == MAX_DELAY_SECONDS

    def test_a_huge_retry_after_requeues_at_most_seven_days(self) -> None:
        outcome = decide(response(429, **{"Retry-After": "99999999"}))
        assert isinstance(outcome, Requeue) and outcome.delay_seconds == MAX_DELAY_SECONDS

    def test_a_retry_after_beyond_the_longest_window_is_capped_there_and_says_so(self) -> None:
        outcome = classify(
            response(429, **{"Retry-After": "604800"}),
            failures=0,
            policy=POLICY,
            now=NOW,
            rng=random.Random(0),
            longest_wait=3600,
        )
        assert isinstance(outcome, Requeue) and outcome.delay_seconds == 3600
        assert outcome.capped_retry_after == "604800"
        within = classify(
            response(429, **{"Retry-After": "120"}),
            failures=0,
            policy=POLICY,
            now=NOW,
            rng=random.Random(0),
            longest_wait=3600,
        )
        assert (
            isinstance(within, Requeue) and within.delay_seconds == 120 and within.capped_retry_after is None
        )


def test_backoff_never_exceeds_the_cap() -> None:
    rng = random.Random(1)
    assert all(backoff_seconds(n, POLICY, rng) <= POLICY.max_seconds for n in range(100))
