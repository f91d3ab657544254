from __future__ import annotations

import json

import pytest

from shared.domain.messages import ActionCheckMessage, MessageError, OffboardMessage, parse_message
from tests.conftest import offboard_message


def test_round_trip() -> None:
    message = offboard_message(attempt=3, failures=1)
    assert OffboardMessage.from_json(message.to_json()) == message


def test_wire_format_is_versioned_camel_case_json() -> None:
    body = json.loads(offboard_message().to_json())
    assert body["v"] == 1 and body["type"] == "offboard"
    assert set(body) == {
        "v",
        "type",
        "requestId",
        "machineId",
        "comment",
        "enqueuedAt",
        "caller",
        "attempt",
        "failures",
        "dryRun",
        "prechecked",
    }


def test_next_attempt_counts_failures_only_when_asked() -> None:
    message = offboard_message()
    assert message.next_attempt(failed=False).attempt == 2
    assert message.next_attempt(failed=False).failures == 0
    assert message.next_attempt(failed=True).failures == 1


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("not json", "not JSON"),
        ("[1]", "not a JSON object"),
        ('{"v": 2}', "unknown schema version 2"),
        ("{}", "unknown schema version None"),
    ],
)
def test_unreadable_messages_are_refused_with_a_reason(text: str, reason: str) -> None:
    with pytest.raises(MessageError, match=reason):
        OffboardMessage.from_json(text)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("machineId", "../../machines"),
        ("machineId", "1E5BC9D7E413DDD7902C2932E418702B84D0CC07"),
        ("requestId", "x"),
        ("attempt", "1"),
        ("attempt", True),
        ("failures", -1),
        ("comment", None),
    ],
)
def test_malformed_fields_are_refused(field: str, value: object) -> None:
    body = json.loads(offboard_message().to_json())
    body[field] = value
    with pytest.raises(MessageError, match=field):
        OffboardMessage.from_json(json.dumps(body))


def test_check_message_round_trip() -> None:
    check = ActionCheckMessage(
        request_id="6fa240ec-e2bc-4e35-a722-2edb01bb2028",
        machine_id="1e5bc9d7e413ddd7902c2932e418702b84d0cc07",
        action_id="b0567586-e668-458b-85d1-ab5f28199586",
        submitted_at="2026-11-23T10:00:00+00:00",
        check=2,
    )
    assert parse_message(check.to_json()) == check


def test_a_message_without_a_type_is_an_offboard() -> None:
    body = json.loads(offboard_message().to_json())
    del body["type"]
    assert isinstance(parse_message(json.dumps(body)), OffboardMessage)


def test_unknown_type_and_unsafe_action_id_are_refused() -> None:
    body = json.loads(offboard_message().to_json())
    with pytest.raises(MessageError, match="unknown message type 'wipe'"):
        parse_message(json.dumps({**body, "type": "wipe"}))
    check = {**body, "type": "check", "actionId": "../cancel", "submittedAt": "x", "check": 1}
    with pytest.raises(MessageError, match="actionId"):
        parse_message(json.dumps(check))
