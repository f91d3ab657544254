"""Lookups: strict identifiers, the OData filter they become, and the queue message carrying them."""

from __future__ import annotations

import json

import pytest

from shared.domain.devices import InvalidLookup, Lookup, odata_literal
from shared.domain.messages import MessageError, OffboardMessage
from tests.conftest import MACHINE, offboard_message

AAD = "80fe8a4c-2b7e-4a6b-9d3c-2f1e0c5a7b61"


def test_filters_are_one_exact_comparison() -> None:
    assert Lookup.of("aadDeviceId", AAD.upper()).odata_filter() == f"aadDeviceId eq '{AAD}'"
    assert (
        Lookup.of("deviceName", "PC-1.Contoso.com").odata_filter() == "computerDnsName eq 'pc-1.contoso.com'"
    )


def test_odata_literals_double_quotes_and_refuse_the_rest() -> None:
    assert odata_literal("o'brien") == "'o''brien'"
    assert odata_literal("x' or 1 eq 1 or '") == "'x'' or 1 eq 1 or '''"
    for value in ("a\nb", "tab\there", "caf\u00e9", "\u2019"):
        with pytest.raises(InvalidLookup):
            odata_literal(value)


@pytest.mark.parametrize(
    "value",
    [
        "x' or 1 eq 1 or '",
        "x') or startswith(computerDnsName,'",
        "pc-1 or true",
        "pc_1",
        "pc-1%27",
        "ｐｃ-1",  # noqa: RUF001 - fullwidth letters look like ASCII to a person
        "a." * 127,
    ],
)
def test_injection_attempts_never_become_a_lookup(value: str) -> None:
    with pytest.raises(InvalidLookup):
        Lookup.of("deviceName", value)


def test_a_tampered_lookup_is_refused_when_the_filter_is_built() -> None:
    tampered = Lookup("deviceName", "x' or 1 eq 1 or '")  # constructed directly, never validated
    with pytest.raises(InvalidLookup):
        tampered.odata_filter()


def test_message_with_a_lookup_round_trips() -> None:
    message = offboard_message(machine_id=None, lookup=Lookup("aadDeviceId", AAD))
    body = json.loads(message.to_json())
    assert "machineId" not in body and body["lookup"] == {"by": "aadDeviceId", "value": AAD}
    assert OffboardMessage.from_json(message.to_json()) == message
    resolved = message.resolved(MACHINE)
    again = json.loads(resolved.to_json())
    assert again["machineId"] == MACHINE and "lookup" not in again
    assert again["resolvedFrom"] == {"by": "aadDeviceId", "value": AAD}
    assert OffboardMessage.from_json(resolved.to_json()) == resolved


def test_message_with_a_machine_id_keeps_the_original_shape() -> None:
    body = json.loads(offboard_message().to_json())
    assert set(body) - {"type", "dryRun", "prechecked"} == {
        "v",
        "requestId",
        "machineId",
        "comment",
        "enqueuedAt",
        "caller",
        "attempt",
        "failures",
    }


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"lookup": {"by": "aadDeviceId", "value": AAD}}, "both set"),
        ({"machineId": None}, "'machineId' is missing"),
        ({"machineId": None, "lookup": {"by": "deviceName", "value": "x' or 1 eq 1 or '"}}, "malformed"),
        ({"machineId": None, "lookup": {"by": "deviceName", "value": "PC-1"}}, "canonical"),
        ({"machineId": None, "lookup": {"by": "serial", "value": "abc"}}, "unknown lookup kind"),
        ({"machineId": None, "lookup": {"by": "deviceName", "value": "pc-1", "x": 1}}, "exactly"),
        ({"machineId": None, "lookup": "pc-1"}, "exactly"),
    ],
)
def test_malformed_lookups_in_messages_are_refused(change: dict[str, object], error: str) -> None:
    body = {**json.loads(offboard_message().to_json()), **change}
    with pytest.raises(MessageError, match=error):
        OffboardMessage.from_json(json.dumps(body))
