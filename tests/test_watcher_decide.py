"""The Intune watcher's pure rules: which devices and events are retirements, which device
they name, the key and the comment, the checkpoint, the inventory's changes, and what a
Graph answer means. No network, no storage: milliseconds."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests

from localdev.graph_sim import audit_event, managed_device
from shared.domain.devices import Lookup
from shared.domain.errors import (
    ConnectionFailed,
    IdempotencyKeyReused,
    InvalidInput,
    NoResponse,
    RequestConflict,
    ServiceUnavailable,
    TokenUnavailable,
)
from shared.intake.submission import Answer
from shared.watcher import decide
from shared.watcher.decide import (
    LOOKBACK,
    MAX_ATTEMPTS,
    Device,
    Event,
    GraphPolicy,
    Known,
    PageRead,
    Sighting,
    Skip,
    Stop,
    Wait,
)

NOW = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
INTUNE = "5e3f9a2b-7c41-4d8e-9f60-1a2b3c4d5e6f"
AAD = "6d5c4b3a-2f1e-4d0c-9b8a-7f6e5d4c3b2a"
ZERO = "00000000-0000-0000-0000-000000000000"
BASE = "https://graph.microsoft.com"


def device(**fields: Any) -> dict[str, Any]:
    return managed_device(INTUNE, "WS-0042", AAD, **fields)


def event(action: str = "retire", **fields: Any) -> dict[str, Any]:
    raw = audit_event(action, {"id": INTUNE, "deviceName": "WS-0042", "azureADDeviceId": AAD}, at=NOW)
    return {**raw, **fields}


# ---- what is a retirement --------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "action"),
    [
        ("retirePending", "retire"),
        ("retireIssued", "retire"),
        ("wipePending", "wipe"),
        ("WIPEISSUED", "wipe"),
        ("deletePending", "delete"),
        ("managed", None),
        ("retireFailed", None),
        ("wipeCanceled", None),
        ("retireCanceled", None),
        ("unknownFutureValue", None),
        (None, None),
    ],
)
def test_only_leaving_states_are_retirements(state: str | None, action: str | None) -> None:
    parsed = decide.parse_device(device(managementState=state), 0)
    assert isinstance(parsed, Device)
    sighting = decide.device_sighting(parsed, NOW)
    assert (sighting.action if sighting else None) == action
    if sighting:
        assert sighting.source == "device" and sighting.aad_device_id == AAD and sighting.at == NOW


def test_a_device_item_without_an_intune_id_is_skipped_with_its_reason() -> None:
    for raw in ("text", {"deviceName": "x"}, {"id": "not-a-guid"}):
        skipped = decide.parse_device(raw, 3)
        assert isinstance(skipped, Skip) and skipped.code == "InvalidManagedDevice"
        assert skipped.item == "managedDevices item 3" and skipped.fingerprint
    assert decide.parse_device({"id": INTUNE.upper(), "azureADDeviceId": ZERO}, 0) == Device(INTUNE)


@pytest.mark.parametrize(
    ("activity_type", "action"),
    [
        ("retire ManagedDevice", "retire"),
        ("wipe ManagedDevice", "wipe"),
        ("Delete ManagedDevice", "delete"),
        ("Wipe managedDevice", "wipe"),
        ("retireManagedDevice", "retire"),
        ("DELETE MANAGEDDEVICE", "delete"),
        ("Patch DeviceConfiguration", None),
        ("syncDevice ManagedDevice", None),
    ],
)
def test_audit_activity_types_are_matched_ignoring_case_and_spaces(
    activity_type: str, action: str | None
) -> None:
    parsed = decide.parse_event(event(activityType=activity_type), 0)
    assert isinstance(parsed, Event) and parsed.at == NOW
    assert [s.action for s in parsed.sightings] == ([action] if action else [])


def test_an_audit_sighting_carries_who_when_and_the_identifiers() -> None:
    parsed = decide.parse_event(event("wipe"), 0)
    assert isinstance(parsed, Event)
    [sighting] = parsed.sightings
    assert sighting == Sighting(
        INTUNE, "wipe", "audit", NOW, "intune-admin@contoso.com", parsed.id, None, AAD, "WS-0042"
    )


def test_only_successful_device_actions_count() -> None:
    failed = decide.parse_event(event(activityResult="Failure"), 0)
    assert isinstance(failed, Event) and failed.sightings == ()


def test_an_event_without_a_managed_device_is_recorded_but_kept_for_the_checkpoint() -> None:
    raw = event(
        resources=[{"displayName": "x", "resourceId": "not-a-guid", "auditResourceType": "ManagedDevice"}]
    )
    parsed = decide.parse_event(raw, 0)
    assert isinstance(parsed, Event) and parsed.at == NOW and parsed.sightings == ()
    assert [s.code for s in parsed.skips] == ["NoDeviceIdentifier"]


def test_an_event_that_cannot_be_placed_in_time_is_skipped() -> None:
    for raw in (["list"], event(activityDateTime="yesterday"), event(activityDateTime=None)):
        skipped = decide.parse_event(raw, 7)
        assert isinstance(skipped, Skip) and skipped.code == "InvalidAuditEvent"


def test_each_managed_device_resource_of_an_event_is_a_sighting() -> None:
    other = "0c9d8e7f-6a5b-4c3d-8e2f-1a0b9c8d7e6f"
    raw = event()
    raw["resources"] = [
        *raw["resources"],
        {"resourceId": other, "auditResourceType": "ManagedDevice", "displayName": "DESKTOP-7F3K2"},
        {"resourceId": "9d1f0c8e-1111-4222-8333-444455556666", "auditResourceType": "DeviceConfiguration"},
    ]
    parsed = decide.parse_event(raw, 0)
    assert isinstance(parsed, Event)
    assert [(s.intune_id, s.name) for s in parsed.sightings] == [
        (INTUNE, "WS-0042"),
        (other, "DESKTOP-7F3K2"),
    ]


def test_identifiers_come_from_modified_properties_new_then_old_value_quotes_and_all() -> None:
    raw = event()
    raw["resources"][0]["modifiedProperties"] = [
        {"displayName": "AzureADDeviceId", "oldValue": f'"{AAD.upper()}"', "newValue": ""},
        {"displayName": "DeviceName", "oldValue": None, "newValue": "WS-0042.contoso.com"},
    ]
    parsed = decide.parse_event(raw, 0)
    assert isinstance(parsed, Event)
    assert (parsed.sightings[0].aad_device_id, parsed.sightings[0].name) == (AAD, "WS-0042.contoso.com")


def test_the_actor_is_the_user_else_the_application() -> None:
    assert decide.actor_of({"userPrincipalName": "a@b.c", "applicationDisplayName": "x"}) == "a@b.c"
    assert (
        decide.actor_of({"userPrincipalName": None, "applicationDisplayName": "Intune API"}) == "Intune API"
    )
    assert decide.actor_of("someone") is None


# ---- one retirement per device, and which one ------------------------------------------


def test_merge_prefers_the_earliest_audit_event_and_fills_identifiers() -> None:
    listed = Sighting(
        INTUNE, "retire", "device", NOW, state="retirePending", aad_device_id=AAD, name="WS-0042"
    )
    retire = Sighting(INTUNE, "retire", "audit", NOW - timedelta(minutes=3), actor="a@b.c", event_id="e1")
    delete = Sighting(INTUNE, "delete", "audit", NOW - timedelta(minutes=1), actor="c@d.e", event_id="e2")
    [merged] = decide.merge([listed, delete, retire]).values()
    assert (merged.action, merged.actor, merged.aad_device_id, merged.name) == (
        "retire",
        "a@b.c",
        AAD,
        "WS-0042",
    )
    alone = decide.merge([listed])[INTUNE]
    assert alone == listed


def test_a_deleted_device_is_named_by_the_inventory() -> None:
    deleted = Sighting(INTUNE, "delete", "audit", NOW, name=None)
    known = Device(INTUNE, "WS-0042", AAD, "Windows", "managed")
    enriched = decide.enrich(deleted, None, known)
    assert decide.identify(enriched) == Lookup("aadDeviceId", AAD)
    # The listing, when the device is still there, comes before the inventory.
    newer = Device(INTUNE, "WS-0042", "b004050f-f94d-454b-ab55-8d67e188ea7a")
    assert decide.enrich(deleted, newer, known).aad_device_id == newer.aad_device_id
    # The event's own identifiers come first of all.
    own = Sighting(INTUNE, "delete", "audit", NOW, aad_device_id=AAD)
    assert decide.enrich(own, newer, known).aad_device_id == AAD


def test_identify_by_entra_id_else_exact_dns_name_else_skip() -> None:
    assert decide.identify(Sighting(INTUNE, "wipe", "device", NOW, aad_device_id=AAD, name="x")) == Lookup(
        "aadDeviceId", AAD
    )
    by_name = decide.identify(Sighting(INTUNE, "wipe", "device", NOW, name="lnx-build-11.corp.contoso.com"))
    assert by_name == Lookup("deviceName", "lnx-build-11.corp.contoso.com")
    for name in ("Lobby kiosk #3", None, "bad'name"):
        skipped = decide.identify(Sighting(INTUNE, "wipe", "device", NOW, name=name))
        assert isinstance(skipped, Skip) and skipped.code == "NoDeviceIdentifier"
        assert "all-zero" in skipped.message and INTUNE in skipped.item


def test_the_key_is_the_device_its_first_action_and_when_it_was_first_seen() -> None:
    key = decide.idempotency_key(INTUNE, "wipe", NOW, "offboard")
    assert key == f"intune-watcher:{INTUNE}:wipe:20261201T100000Z"
    assert decide.idempotency_key(INTUNE, "wipe", NOW, "report") == key + ":report"
    later = decide.idempotency_key(INTUNE, "wipe", NOW + timedelta(days=90), "offboard")
    assert later != key and len(key) <= 200 and key.isascii()


def test_the_comment_names_the_action_who_and_when() -> None:
    audit = Sighting(INTUNE, "wipe", "audit", NOW, actor="alice@contoso.com", name="WS-0042")
    text = decide.comment(audit, "WS-0042", "default")
    assert text == (
        f"Intune wipe of WS-0042 (managed device {INTUNE}) by alice@contoso.com at 2026-12-01T10:00:00Z; "
        "seen in the Intune audit log by intune-watcher"
    )
    listed = Sighting(INTUNE, "retire", "device", NOW, state="retirePending")
    assert "managementState retirePending at 2026-12-01T10:00:00Z" in decide.comment(listed, None, "d")
    noisy = Sighting(INTUNE, "retire", "audit", NOW, actor="x\x00y" * 600)
    assert len(decide.comment(noisy, None, "d")) == 1000 and "\x00" not in decide.comment(noisy, None, "d")


def test_opening_a_row_fixes_key_comment_and_lookup_or_settles_a_skip() -> None:
    sighting = Sighting(
        INTUNE, "retire", "audit", NOW - timedelta(minutes=2), actor="a@b.c", aad_device_id=AAD
    )
    row = decide.open_retirement(sighting, NOW, "report", "default")
    assert row.key == decide.idempotency_key(INTUNE, "retire", NOW, "report")
    assert (row.lookup, row.settled, row.actions, row.at) == (
        Lookup("aadDeviceId", AAD),
        False,
        ("retire",),
        sighting.at,
    )
    request = decide.offboard_request(row, "report")
    assert request.dry_run and request.comment == row.comment and request.machine_id is None
    assert not decide.offboard_request(row, "offboard").dry_run
    skipped = decide.open_retirement(
        Sighting(INTUNE, "wipe", "device", NOW, name="Lobby kiosk #3"), NOW, "offboard", "d"
    )
    assert (skipped.settled, skipped.outcome, skipped.lookup) == (True, "NoDeviceIdentifier", None)


# ---- the intake's answers ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "outcome"),
    [
        ({"requestId": "r1", "status": "Queued"}, "Queued"),
        ({"requestId": "r1", "status": "Held"}, "Held"),
        ({"requestId": "r1", "status": "Queued", "replayed": True}, "Replayed"),
        ({"requestId": "r1", "status": "Pending", "existingRequest": True}, "Existing"),
    ],
)
def test_every_accepted_answer_settles_the_row(body: dict[str, Any], outcome: str) -> None:
    assert decide.settlement(Answer(202, body), 1) == decide.Settlement(True, outcome, "r1")


def test_refusals_settle_defer_or_stop() -> None:
    down = decide.settlement(ServiceUnavailable("StorageUnavailable", "down"), 1)
    assert (down.settled, down.storage_failed) == (False, True)
    busy = RequestConflict("IdempotentRequestInProgress", "ask again")
    assert not decide.settlement(busy, MAX_ATTEMPTS - 1).settled
    assert decide.settlement(busy, MAX_ATTEMPTS).settled  # never retried forever
    reused = decide.settlement(IdempotencyKeyReused("IdempotencyKeyReused", "different body"), 1)
    assert (reused.settled, reused.outcome) == (True, "IdempotencyKeyReused")
    assert decide.settlement(InvalidInput("TenantNotAllowed", "no"), 1).settled


# ---- the checkpoint and the ledger ------------------------------------------------------


def test_audit_events_are_read_from_a_lookback_before_the_checkpoint() -> None:
    assert decide.audit_since(NOW, NOW + timedelta(hours=5)) == NOW - LOOKBACK
    assert decide.audit_since(None, NOW) == NOW - LOOKBACK


def test_the_checkpoint_moves_to_the_newest_event_when_everything_is_settled() -> None:
    old, newest = NOW - timedelta(minutes=30), NOW - timedelta(minutes=5)
    moved = decide.next_checkpoint(old, complete=True, newest=newest, unsettled=[], started=NOW)
    assert moved == newest


def test_the_checkpoint_stops_just_before_the_first_retirement_not_accepted() -> None:
    old = NOW - timedelta(minutes=30)
    pending = NOW - timedelta(minutes=20)
    at = decide.next_checkpoint(
        old, complete=True, newest=NOW, unsettled=[NOW - timedelta(minutes=2), pending], started=NOW
    )
    assert at == pending - timedelta(microseconds=1)


def test_the_checkpoint_never_goes_back_and_does_not_move_after_an_incomplete_read() -> None:
    old = NOW - timedelta(minutes=10)
    behind = decide.next_checkpoint(
        old, complete=True, newest=None, unsettled=[NOW - timedelta(hours=3)], started=NOW
    )
    assert behind == old
    assert decide.next_checkpoint(old, complete=False, newest=NOW, unsettled=[], started=NOW) == old
    assert decide.next_checkpoint(None, complete=False, newest=NOW, unsettled=[], started=NOW) is None


def test_a_quiet_audit_log_still_moves_the_checkpoint_to_the_lookback() -> None:
    at = decide.next_checkpoint(None, complete=True, newest=None, unsettled=[], started=NOW)
    assert at == NOW - LOOKBACK


def test_a_ledger_row_is_pruned_only_when_no_run_can_see_its_leaving_again() -> None:
    opened = NOW - timedelta(days=3)
    assert decide.prunable(opened, True, False, NOW, listing_complete=True)
    assert not decide.prunable(opened, False, False, NOW, listing_complete=True)  # not settled
    assert not decide.prunable(opened, True, True, NOW, listing_complete=True)  # still leaving
    assert not decide.prunable(opened, True, False, NOW, listing_complete=False)  # not sure
    assert not decide.prunable(
        NOW - timedelta(hours=20), True, False, NOW, listing_complete=True
    )  # too young
    assert not decide.prunable(opened, True, False, opened, listing_complete=True)  # checkpoint stuck


# ---- the inventory ----------------------------------------------------------------------


def test_inventory_changes_are_only_what_changed() -> None:
    same = Device("a", "A", AAD)
    renamed_old, renamed = Device("b", "B"), Device("b", "B2")
    gone_now, gone_long = Device("c", "C"), Device("d", "D")
    back = Device("e", "E")
    known = {
        "a": Known(same, None, "1"),
        "b": Known(renamed_old, None, "2"),
        "c": Known(gone_now, None, "3"),
        "d": Known(gone_long, NOW - timedelta(days=8), "4"),
        "e": Known(back, NOW - timedelta(days=1), "5"),
    }
    listed = {"a": same, "b": renamed, "e": back, "f": Device("f", "F")}
    changes = decide.inventory_changes(known, listed, complete=True, now=NOW)
    assert [d.intune_id for d in changes.upserts] == ["b", "e", "f"]
    assert changes.gone == ("c",) and changes.removed == ("d",)
    partial = decide.inventory_changes(known, listed, complete=False, now=NOW)
    assert len(partial.upserts) == 3 and partial.gone == () and partial.removed == ()
    # Everything listed again as it was: only the two marked gone are written (back).
    again = decide.inventory_changes(known, {k: v.device for k, v in known.items()}, complete=True, now=NOW)
    assert [d.intune_id for d in again.upserts] == ["d", "e"] and len(again) == 2


# ---- Graph's answers --------------------------------------------------------------------


def response(
    status: int, body: Any = None, headers: dict[str, str] | None = None, raw: bytes | None = None
) -> requests.Response:
    answer = requests.Response()
    answer.status_code = status
    answer._content = raw if raw is not None else json.dumps(body).encode() if body is not None else b""
    answer.headers.update(headers or {})
    return answer


def judge(result: requests.Response | Exception, tries: int = 0) -> PageRead | Wait | Stop:
    return decide.read_answer(
        result,  # type: ignore[arg-type]
        tries=tries,
        now=NOW,
        rng=random.Random(1),
        permission="DeviceManagementApps.Read.All",
        same_origin=lambda link: link.startswith(BASE + "/"),
    )


def test_a_page_gives_its_items_and_link() -> None:
    link = BASE + "/v1.0/deviceManagement/auditEvents?$skiptoken=abc"
    assert judge(response(200, {"value": [1, 2], "@odata.nextLink": link})) == PageRead([1, 2], link)
    assert judge(response(200, {"value": []})) == PageRead([], None)


def test_a_page_that_is_not_the_expected_json_is_tried_again_then_stops_the_read() -> None:
    for bad in (response(200, raw=b"<html>"), response(200, [1, 2]), response(200, raw=b'{"value": [')):
        assert isinstance(judge(bad), Wait)
        stopped = judge(bad, tries=GraphPolicy().max_tries - 1)
        assert isinstance(stopped, Stop) and stopped.code == "InvalidGraphPage"
    without_value = judge(response(200, {"items": [1], "@odata.nextLink": BASE + "/v1.0/x"}))
    assert isinstance(without_value, PageRead) and without_value.items == []
    assert without_value.next_link == BASE + "/v1.0/x" and without_value.skip is not None
    foreign = judge(response(200, {"value": [], "@odata.nextLink": "https://evil.example/v1.0/x"}))
    assert isinstance(foreign, Stop) and foreign.code == "InvalidGraphPage"


def test_429_waits_retry_after_when_a_run_can_else_stops_and_keeps_it() -> None:
    short = judge(response(429, {"error": {"code": "TooManyRequests"}}, {"Retry-After": "7"}))
    assert short == Wait(7.0, "TooManyRequests", "", throttled=True)
    date = (NOW + timedelta(seconds=12)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert judge(response(429, None, {"Retry-After": date})) == Wait(
        12.0, "TooManyRequests", "", throttled=True
    )
    long = judge(response(429, None, {"Retry-After": "120"}))
    assert isinstance(long, Stop) and long.retry_after == 120.0
    unavailable = judge(response(503, None, {"Retry-After": "2"}))
    assert isinstance(unavailable, Wait) and unavailable.seconds == 2.0 and not unavailable.throttled


def test_429_without_retry_after_backs_off_exponentially_then_stops() -> None:
    waits = [judge(response(429), tries=t) for t in range(4)]
    assert all(isinstance(w, Wait) and w.throttled for w in waits)
    seconds = [w.seconds for w in waits if isinstance(w, Wait)]
    for tries, waited in enumerate(seconds):
        assert 2**tries / 2 <= waited <= 2**tries
    assert isinstance(judge(response(429), tries=4), Stop)


@pytest.mark.parametrize(
    "failure",
    [
        response(500),
        response(502),
        response(503),
        response(504),
        response(408),
        ConnectionFailed("x"),
        NoResponse("y"),
    ],
)
def test_server_errors_and_timeouts_are_retried_a_few_times(failure: requests.Response | Exception) -> None:
    assert isinstance(judge(failure), Wait)
    assert isinstance(judge(failure, tries=GraphPolicy().max_tries - 1), Stop)


def test_permissions_and_tokens_stop_the_read_naming_what_to_fix() -> None:
    forbidden = judge(response(403, {"error": {"code": "Forbidden", "message": "no"}}))
    assert isinstance(forbidden, Stop) and forbidden.configuration
    assert "DeviceManagementApps.Read.All" in forbidden.message
    unauthorised = judge(response(401))
    assert isinstance(unauthorised, Stop) and "GRAPH_API_SCOPE" in unauthorised.message
    assert isinstance(judge(TokenUnavailable("down")), Wait)
    no_token = judge(TokenUnavailable("down"), tries=2)
    assert isinstance(no_token, Stop) and "MANAGED_IDENTITY_CLIENT_ID" in no_token.message
    redirect = judge(response(302, None, {"Location": "https://elsewhere"}))
    assert isinstance(redirect, Stop) and redirect.code == "Redirect"
    bad_request = judge(response(400, {"error": {"code": "BadRequest", "message": "Invalid filter"}}))
    assert bad_request == Stop("BadRequest", "Invalid filter")
