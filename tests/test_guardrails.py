"""Guardrails: precheck refusals, dry run, the blast-radius breaker, tagging."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest
import requests

from localdev.defender_sim import DefenderSimulator, Reply
from localdev.host import LOCAL_MASTER_KEY
from shared.domain.guardrails import PLATFORM_RULES, Protection, platform_refusal, verdict
from shared.runtime import Services
from shared.settings import Settings, SettingsError
from tests.conftest import MACHINE, Queues, RunningHost, adopt, events
from tests.test_request_state import wait_status

HostFactory = Callable[..., RunningHost]
PROTECTION = Protection.of(tags=["Tier0"], group_ids=[7], deny=["dc01.contoso.com", "a" * 40])


def machine(**fields: Any) -> dict[str, Any]:
    return {
        "id": MACHINE,
        "computerDnsName": "pc1.contoso.com",
        "osPlatform": "Windows11",
        "version": "23H2",
        "onboardingStatus": "Onboarded",
        "machineTags": [],
        "rbacGroupId": 1,
        **fields,
    }


# ---- the rules ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "refused"),
    [
        ({"osPlatform": "Windows10", "osBuild": 15063, "version": None}, False),
        ({"osPlatform": "Windows10", "osBuild": 14393, "version": None}, True),  # 1607
        ({"osPlatform": "Windows10", "osBuild": None, "version": "1703"}, False),
        ({"osPlatform": "Windows10", "osBuild": None, "version": "1607"}, True),
        ({"osPlatform": "Windows10", "osBuild": None, "version": "22H2"}, False),
        # The record does not say which release: Defender decides.
        ({"osPlatform": "Windows10", "osBuild": None, "version": None}, False),
        ({"osPlatform": "Windows11"}, False),
        # 2016 and 2012 R2 are supported with the unified agent, which the record does not show.
        ({"osPlatform": "WindowsServer2016"}, False),
        ({"osPlatform": "WindowsServer2012R2"}, False),
        ({"osPlatform": "WindowsServer2012"}, True),
        ({"osPlatform": "WindowsServer2019"}, False),
        ({"osPlatform": "WindowsServer2022"}, False),
        ({"osPlatform": "Windows7"}, True),
        ({"osPlatform": "macOS", "version": "14.1"}, False),
        ({"osPlatform": "macOS", "version": "15"}, False),
        ({"osPlatform": "macOS", "version": "13.6.1"}, True),
        ({"osPlatform": "macOS", "version": None}, False),
        ({"osPlatform": "Linux"}, False),
        ({"osPlatform": "Ubuntu"}, False),  # a distribution we do not list: Defender decides
        ({"osPlatform": "iOS"}, True),
        ({"osPlatform": "Android"}, True),
        ({"osPlatform": "Unknown"}, True),
        ({"osPlatform": None}, True),
    ],
)
def test_only_what_is_certainly_unsupported_is_refused(fields: dict[str, Any], refused: bool) -> None:
    assert (platform_refusal(machine(**fields), PLATFORM_RULES) is not None) is refused


def test_the_platform_table_can_be_overridden() -> None:
    settings = Settings.from_env(
        {
            "AzureWebJobsStorage": "UseDevelopmentStorage=true",
            "OFFBOARD_PLATFORM_RULES": "macOS=min:15, WindowsServer2016=refuse, Ubuntu=refuse",
        }
    )
    protection = Protection.of(platform_overrides=settings.platform_rules)
    assert platform_refusal(machine(osPlatform="macOS", version="14.1"), protection.platforms)
    assert platform_refusal(machine(osPlatform="WindowsServer2016"), protection.platforms)
    assert platform_refusal(machine(osPlatform="ubuntu"), protection.platforms)
    assert platform_refusal(machine(osPlatform="Linux"), protection.platforms) is None


@pytest.mark.parametrize("raw", ["macOS", "macOS=", "macOS=min:", "macOS=min:fourteen", "iOS=block"])
def test_a_platform_rule_that_does_not_parse_is_named(raw: str) -> None:
    with pytest.raises(SettingsError, match="OFFBOARD_PLATFORM_RULES"):
        Settings.from_env(
            {"AzureWebJobsStorage": "UseDevelopmentStorage=true", "OFFBOARD_PLATFORM_RULES": raw}
        )


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"machineTags": ["tier0"]}, "ProtectedDevice"),
        ({"rbacGroupId": 7}, "ProtectedDevice"),
        ({"computerDnsName": "DC01.contoso.com"}, "ProtectedDevice"),
        ({"id": "a" * 40}, "ProtectedDevice"),
        ({"osPlatform": "macOS", "machineTags": ["Tier0"]}, "ProtectedDevice"),  # protection first
        ({"osPlatform": "iOS"}, "OsPlatformNotSupported"),
        ({"osPlatform": "macOS", "version": "13.6"}, "OsPlatformNotSupported"),
        ({"onboardingStatus": "Offboarded"}, "AlreadyOffboarded"),
    ],
)
def test_verdicts(fields: dict[str, Any], code: str) -> None:
    refusal = verdict(machine(**fields), PROTECTION)
    assert refusal is not None and refusal.code == code
    assert refusal.done is (code == "AlreadyOffboarded")


def test_an_ordinary_machine_passes() -> None:
    assert verdict(machine(machineTags=["Finance"]), PROTECTION) is None
    # Learn's Machine resource page writes the value in lower case: still onboarded.
    assert verdict(machine(onboardingStatus="onboarded"), PROTECTION) is None


def test_guardrail_settings_that_do_not_parse_are_named() -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(
            {
                "AzureWebJobsStorage": "UseDevelopmentStorage=true",
                "OFFBOARD_DENY_LIST": "dc01.contoso.com, x' or 1 eq 1 or '",
                "OFFBOARD_PROTECTED_GROUP_IDS": "7,eight",
                "OFFBOARD_PROTECTED_TAGS": "ok,\x01bad",
                "OFFBOARD_TAG_AFTER_SUCCESS": "a,b",
                "OFFBOARD_PRECHECK_WITHOUT_PERMISSION": "maybe",
                "OFFBOARD_BREAKER_LIMIT": "0",
            }
        )
    text = str(caught.value)
    for name in (
        "OFFBOARD_DENY_LIST",
        "OFFBOARD_PROTECTED_GROUP_IDS",
        "OFFBOARD_PROTECTED_TAGS",
        "OFFBOARD_TAG_AFTER_SUCCESS",
        "OFFBOARD_PRECHECK_WITHOUT_PERMISSION",
        "OFFBOARD_BREAKER_LIMIT",
    ):
        assert name in text


# ---- in the worker -----------------------------------------------------------------------


@pytest.mark.parametrize(("platform", "version"), [("macOS", "13.6"), ("iOS", "17.1")])
def test_unsupported_platform_is_refused_before_any_offboard_call(
    services: Services, defender: DefenderSimulator, platform: str, version: str
) -> None:
    defender.add_machine(MACHINE, osPlatform=platform, version=version)
    message = adopt(services)
    services.worker().process(message)
    assert len(defender.machine_calls(MACHINE)) == 1 and defender.offboard_calls() == []
    record = services.store.get(message.request_id)
    assert (
        record is not None
        and record.status == "Rejected"
        and record.last_error_code == "OsPlatformNotSupported"
    )
    assert events(services, message.request_id) == ["Rejected"]


@pytest.mark.parametrize(("platform", "version"), [("macOS", "14.1"), ("Linux", "22.04")])
def test_macos_14_and_linux_are_offboarded(
    services: Services, defender: DefenderSimulator, platform: str, version: str
) -> None:
    defender.add_machine(MACHINE, osPlatform=platform, version=version)
    message = adopt(services)
    services.worker().process(message)
    assert len(defender.offboard_calls(MACHINE)) == 1
    record = services.store.get(message.request_id)
    assert record is not None and record.status == "Submitted"


def test_a_server_2016_is_left_to_defender_which_may_refuse_it(
    services: Services, defender: DefenderSimulator
) -> None:
    defender.add_machine(MACHINE, osPlatform="WindowsServer2016", version="1607")
    defender.script(
        MACHINE, Reply.error(400, "OsPlatformNotSupported", "The device runs the legacy MMA agent")
    )
    message = adopt(services)
    services.worker().process(message)
    assert len(defender.offboard_calls(MACHINE)) == 1
    record = services.store.get(message.request_id)
    assert record is not None and record.status == "Failed"
    assert record.public()["lastError"]["code"] == "OsPlatformNotSupported"


def test_protected_tag_blocks(make_services: Callable[..., Services], defender: DefenderSimulator) -> None:
    defender.add_machine(MACHINE, machineTags=["Domain Controller"])
    services = make_services(OFFBOARD_PROTECTED_TAGS="Tier0,domain controller")
    message = adopt(services)
    services.worker().process(message)
    record = services.store.get(message.request_id)
    assert record is not None and record.status == "Rejected" and record.last_error_code == "ProtectedDevice"
    assert defender.offboard_calls() == []


def test_already_offboarded_is_success_with_nothing_to_do(
    services: Services, defender: DefenderSimulator
) -> None:
    defender.add_machine(MACHINE, onboardingStatus="Offboarded")
    message = adopt(services)
    services.worker().process(message)
    record = services.store.get(message.request_id)
    assert record is not None and record.status == "Succeeded" and "nothing to do" in (record.note or "")
    assert defender.offboard_calls() == []


@pytest.mark.parametrize(
    ("setting", "status", "calls"), [("refuse", "Rejected", 0), ("proceed", "Submitted", 1)]
)
def test_precheck_without_permission_follows_the_setting(
    make_services: Callable[..., Services], defender: DefenderSimulator, setting: str, status: str, calls: int
) -> None:
    defender.script(f"machine:{MACHINE}", Reply.error(403, "Forbidden"))
    services = make_services(OFFBOARD_PRECHECK_WITHOUT_PERMISSION=setting)
    message = adopt(services)
    services.worker().process(message)
    record = services.store.get(message.request_id)
    assert record is not None and record.status == status
    assert len(defender.offboard_calls()) == calls
    if setting == "refuse":
        assert record.last_error_code == "PrecheckNotPermitted" and "Machine.Read.All" in (
            record.last_error_message or ""
        )


def test_precheck_can_be_turned_off(
    make_services: Callable[..., Services], defender: DefenderSimulator
) -> None:
    services = make_services(OFFBOARD_PRECHECK="false")
    services.worker().process(adopt(services))
    assert defender.machine_calls() == [] and len(defender.offboard_calls()) == 1


def test_dry_run_message_makes_no_offboard_call_and_records_it(
    services: Services, defender: DefenderSimulator
) -> None:
    message = adopt(services, dry_run=True, comment="IR-7")
    services.worker().process(message)
    assert defender.offboard_calls() == [] and len(defender.machine_calls()) == 1  # the precheck still ran
    record = services.store.get(message.request_id)
    assert record is not None and record.status == "DryRun"
    assert record.public()["wouldSend"] == {
        "method": "POST",
        "path": f"/api/machines/{MACHINE}/offboard",
        "body": {"Comment": "IR-7"},
    }
    assert events(services, message.request_id) == ["DryRun"]


def test_tag_is_added_after_a_successful_offboard(
    make_services: Callable[..., Services], defender: DefenderSimulator, queues: Queues
) -> None:
    services = make_services(OFFBOARD_TAG_AFTER_SUCCESS="Offboarded-by-automation")
    worker = services.worker()
    message = adopt(services)
    worker.process(message)
    assert len(defender.offboard_calls()) == 1
    # The tag goes in its own message, in bulk with whatever else was offboarded meanwhile.
    [tag] = [m for m in queues.peek() if m["type"] == "tag"]
    assert tag["machineIds"] == [MACHINE] and tag["requestIds"] == [message.request_id]
    worker.handle(json.dumps(tag).encode(), "tag-1")
    [bulk] = [c for c in defender.calls if c.path == "/api/machines/AddOrRemoveTagForMultipleMachines"]
    assert bulk.json() == {"Value": "Offboarded-by-automation", "Action": "Add", "MachineIds": [MACHINE]}
    machine_now = defender.machine(MACHINE)
    assert machine_now is not None and machine_now["machineTags"] == ["Offboarded-by-automation"]
    assert "Tagged" in events(services, message.request_id)


# ---- through the local host --------------------------------------------------------------


def admin_post(host: RunningHost, path: str) -> requests.Response:
    return requests.post(host.url + path, headers={"x-functions-key": LOCAL_MASTER_KEY}, timeout=10)


def test_dry_run_setting_applies_to_every_request(
    local_host: HostFactory, defender: DefenderSimulator
) -> None:
    host = local_host(OFFBOARD_DRY_RUN="true")
    accepted = host.post("/api/offboard", {"machineId": MACHINE})
    assert accepted.json()["dryRun"] is True
    final = wait_status(host, accepted.json()["requestId"], "DryRun")
    assert final.status_code == 200 and final.json()["wouldSend"]["path"].endswith("/offboard")
    assert defender.offboard_calls() == []


def test_dry_run_per_request(local_host: HostFactory, defender: DefenderSimulator) -> None:
    host = local_host()
    accepted = host.post("/api/offboard", {"machineId": MACHINE, "dryRun": True}).json()
    assert wait_status(host, accepted["requestId"], "DryRun").status_code == 200
    assert defender.offboard_calls() == []
    assert host.post("/api/offboard", {"machineId": MACHINE, "dryRun": "yes"}).status_code == 400


OTHERS = [f"{n:040x}" for n in range(1, 4)]


def test_breaker_holds_request_n_plus_1_until_released(
    local_host: HostFactory, defender: DefenderSimulator, services: Services
) -> None:
    host = local_host(OFFBOARD_BREAKER_LIMIT="2", OFFBOARD_BREAKER_WINDOW_SECONDS="3600")
    first, second, third = (host.post("/api/offboard", {"machineId": m}).json() for m in OTHERS)
    assert [first["status"], second["status"], third["status"]] == ["Queued", "Queued", "Held"]
    defender.wait_for_calls(2)
    status = host.get(f"/api/offboard/{third['requestId']}")
    assert status.status_code == 202 and status.json()["status"] == "Held"
    assert "Blast-radius breaker tripped: 2 offboards accepted in the last 3600s" in host.log()
    assert "Held" in events(services, third["requestId"])

    # Only the master key may release: the function key callers hold is not enough.
    assert host.post(f"/api/offboard/{third['requestId']}/release").status_code == 401
    released = admin_post(host, "/api/offboard/held/release")
    assert released.status_code == 200 and released.json()["released"] == [third["requestId"]]
    defender.wait_for_calls(1, OTHERS[2])
    assert events(services, third["requestId"])[-1] in ("Released", "Submitted")


def test_release_errors(local_host: HostFactory) -> None:
    host = local_host("--no-queues")
    unknown = admin_post(host, "/api/offboard/6fa240ec-e2bc-4e35-a722-2edb01bb2028/release")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "RequestNotFound"
    queued = host.post("/api/offboard", {"machineId": MACHINE}).json()["requestId"]
    not_held = admin_post(host, f"/api/offboard/{queued}/release")
    assert not_held.status_code == 409 and not_held.json()["error"]["code"] == "RequestNotHeld"


def test_unreleased_holds_expire(local_host: HostFactory, defender: DefenderSimulator) -> None:
    host = local_host(OFFBOARD_BREAKER_LIMIT="1", OFFBOARD_HOLD_EXPIRY_SECONDS="2")
    host.post("/api/offboard", {"machineId": OTHERS[0]})
    held = host.post("/api/offboard", {"machineId": OTHERS[1]}).json()
    assert held["status"] == "Held"
    final = wait_status(host, held["requestId"], "Expired", timeout=20)
    assert final.status_code == 200 and final.json()["status"] == "Expired"
    time.sleep(0.5)
    assert defender.offboard_calls(OTHERS[1]) == []


def test_the_breaker_counts_each_item_of_a_batch(
    local_host: HostFactory, defender: DefenderSimulator
) -> None:
    host = local_host("--no-queues", OFFBOARD_BREAKER_LIMIT="2")
    response = host.post("/api/offboard", {"requests": [{"machineId": m} for m in OTHERS]})
    assert response.status_code == 202
    assert [r["status"] for r in response.json()["results"]] == ["Queued", "Queued", "Held"]
