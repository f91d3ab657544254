"""The Defender simulator over real HTTP: its fleet, 404s for machines it does not know,
bulk tagging, and rate-limit budgets per operation and per tenant."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from localdev.defender_sim import (
    BULK_TAGS,
    FLEET,
    LOOKUP,
    MAX_BULK_TAG_MACHINES,
    DefenderSimulator,
    Reply,
    operation_of,
)
from localdev.fleet import SAMPLE_MACHINE, SHARED_NAME

UNKNOWN = "0123456789abcdef0123456789abcdef01234567"
BULK = "/api/machines/AddOrRemoveTagForMultipleMachines"


class Client:
    """Calls the simulator as the app does: bearer token, JSON bodies."""

    def __init__(self, sim: DefenderSimulator, token: str = "t") -> None:  # noqa: S107 - a fake token
        self.sim, self.token = sim, token

    def get(self, path: str) -> requests.Response:
        return requests.get(self.sim.url + path, headers=self._headers(), timeout=5)

    def post(self, path: str, body: Any) -> requests.Response:
        return requests.post(self.sim.url + path, json=body, headers=self._headers(), timeout=5)

    def offboard(self, machine_id: str) -> requests.Response:
        return self.post(f"/api/machines/{machine_id}/offboard", {"Comment": "test"})

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@pytest.fixture
def sim() -> Iterator[DefenderSimulator]:
    with DefenderSimulator() as simulator:
        yield simulator


def fleet_machine(**match: Any) -> str:
    """The id of the one fleet machine whose fields are `match`."""
    [machine] = [m for m in FLEET if all(getattr(m, k) == v for k, v in match.items())]
    return machine.id


# ---- the fleet --------------------------------------------------------------------------


def test_the_fleet_covers_every_path_with_fixed_well_formed_ids() -> None:
    ids = [m.id for m in FLEET]
    assert len(set(ids)) == len(ids) and all(re.fullmatch(r"[0-9a-f]{40}", i) for i in ids)
    for machine in FLEET:
        if machine.aad_device_id is not None:
            assert str(uuid.UUID(machine.aad_device_id)) == machine.aad_device_id
    platforms = {(m.os_platform, (m.version or "").split(".")[0]) for m in FLEET}
    for wanted in [
        ("Windows10", "22H2"),
        ("Windows11", "23H2"),
        ("WindowsServer2022", "21H2"),
        ("WindowsServer2016", "1607"),
        ("macOS", "14"),
        ("macOS", "13"),
        ("Linux", "22"),
    ]:
        assert wanted in platforms
    assert any("Tier0" in m.machine_tags for m in FLEET)
    assert sum(m.computer_dns_name == SHARED_NAME for m in FLEET) == 2
    assert fleet_machine(id=SAMPLE_MACHINE) == "1e5bc9d7e413ddd7902c2932e418702b84d0cc07"
    assert next(m for m in FLEET if m.id == SAMPLE_MACHINE).os_platform == "Windows11"


def test_a_fleet_machine_reads_as_defender_returns_it(sim: DefenderSimulator) -> None:
    response = Client(sim).get(f"/api/machines/{SAMPLE_MACHINE}")
    assert response.status_code == 200
    machine = response.json()
    assert machine["id"] == SAMPLE_MACHINE and machine["computerDnsName"] == "ws-0042.contoso.com"
    assert machine["osPlatform"] == "Windows11" and machine["onboardingStatus"] == "Onboarded"
    assert machine["lastSeen"].endswith("Z") and machine["machineTags"] == []


def test_a_lookup_by_the_shared_name_finds_both_records(sim: DefenderSimulator) -> None:
    response = Client(sim).get(f"/api/machines?$filter=computerDnsName eq '{SHARED_NAME.upper()}'")
    assert response.status_code == 200
    found = response.json()["value"]
    assert sorted(m["id"] for m in found) == sorted(m.id for m in FLEET if m.computer_dns_name == SHARED_NAME)
    assert {m["healthStatus"] for m in found} == {"Active", "Inactive"}


def test_a_supported_fleet_machine_is_offboarded_under_its_own_name(sim: DefenderSimulator) -> None:
    windows10 = fleet_machine(os_platform="Windows10")
    response = Client(sim).offboard(windows10)
    assert response.status_code == 201
    assert response.json()["machineId"] == windows10
    assert response.json()["computerDnsName"] == "desktop-7f3k2.contoso.com"


@pytest.mark.parametrize(("platform", "version"), [("macOS", "13.6.9"), ("WindowsServer2016", "1607")])
def test_unsupported_fleet_machines_are_refused_by_the_offboard_api(
    sim: DefenderSimulator, platform: str, version: str
) -> None:
    response = Client(sim).offboard(fleet_machine(os_platform=platform, version=version))
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "OsPlatformNotSupported"
    assert sim.actions == {}


def test_add_machine_replaces_a_fleet_machine_with_what_the_test_says(sim: DefenderSimulator) -> None:
    mac13 = fleet_machine(os_platform="macOS", version="13.6.9")
    sim.add_machine(mac13, osPlatform="macOS", version="14.1")
    assert Client(sim).offboard(mac13).status_code == 201


# ---- machines it does not know ----------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", f"/api/machines/{UNKNOWN}", None),
        ("POST", f"/api/machines/{UNKNOWN}/offboard", {"Comment": "x"}),
        ("POST", f"/api/machines/{UNKNOWN}/tags", {"Value": "x", "Action": "Add"}),
    ],
)
def test_an_unknown_machine_is_404_not_found(
    sim: DefenderSimulator, method: str, path: str, body: Any
) -> None:
    client = Client(sim)
    response = client.get(path) if method == "GET" else client.post(path, body)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "NotFound" and UNKNOWN in response.json()["error"]["message"]
    assert sim.actions == {}


def test_accept_any_makes_any_well_formed_id_an_onboarded_windows_11_pc() -> None:
    with DefenderSimulator(accept_any=True) as sim:
        client = Client(sim)
        machine = client.get(f"/api/machines/{UNKNOWN}").json()
        assert machine["osPlatform"] == "Windows11" and machine["onboardingStatus"] == "Onboarded"
        assert client.offboard(UNKNOWN).status_code == 201
        assert client.get("/api/machines/not-an-id").status_code == 404
        # The fleet is still there, and so is what a test adds.
        sample = client.get(f"/api/machines/{SAMPLE_MACHINE}").json()
        assert sample["computerDnsName"] == "ws-0042.contoso.com"
        sim.add_machine("f" * 40, osPlatform="Linux")
        assert client.get(f"/api/machines/{'f' * 40}").json()["osPlatform"] == "Linux"


def test_add_machine_works_without_accept_any(sim: DefenderSimulator) -> None:
    sim.add_machine(UNKNOWN, "pc-9.contoso.com")
    assert Client(sim).get(f"/api/machines/{UNKNOWN}").json()["computerDnsName"] == "pc-9.contoso.com"
    assert Client(sim).offboard(UNKNOWN).status_code == 201


# ---- tags -------------------------------------------------------------------------------


def test_bulk_tagging_adds_and_removes_a_tag_on_the_machines_it_knows(sim: DefenderSimulator) -> None:
    client = Client(sim)
    linux = fleet_machine(os_platform="Linux")
    ids = [SAMPLE_MACHINE, linux, UNKNOWN]
    added = client.post(BULK, {"Value": "Offboarded", "Action": "Add", "MachineIds": ids})
    assert added.status_code == 200
    assert [m["id"] for m in added.json()["value"]] == [SAMPLE_MACHINE, linux]
    assert all(m["machineTags"] == ["Offboarded"] for m in added.json()["value"])
    assert client.get(f"/api/machines/{linux}").json()["machineTags"] == ["Offboarded"]
    removed = client.post(BULK, {"Value": "Offboarded", "Action": "Remove", "MachineIds": [linux]})
    assert removed.status_code == 200 and removed.json()["value"][0]["machineTags"] == []


def test_single_tagging_keeps_the_other_tags(sim: DefenderSimulator) -> None:
    tier0 = next(m.id for m in FLEET if "Tier0" in m.machine_tags)
    response = Client(sim).post(f"/api/machines/{tier0}/tags", {"Value": "Reviewed", "Action": "Add"})
    assert response.status_code == 200 and response.json()["machineTags"] == ["Tier0", "Reviewed"]


@pytest.mark.parametrize(
    "body",
    [
        "not an object",
        {"Action": "Add", "MachineIds": [SAMPLE_MACHINE]},
        {"Value": "x", "Action": "Toggle", "MachineIds": [SAMPLE_MACHINE]},
        {"Value": "x", "Action": "Add"},
        {"Value": "x", "Action": "Add", "MachineIds": []},
        {"Value": "x", "Action": "Add", "MachineIds": SAMPLE_MACHINE},
        {"Value": "x", "Action": "Add", "MachineIds": [SAMPLE_MACHINE] * (MAX_BULK_TAG_MACHINES + 1)},
    ],
)
def test_a_bad_bulk_tag_body_is_400(sim: DefenderSimulator, body: Any) -> None:
    response = Client(sim).post(BULK, body)
    assert response.status_code == 400 and response.json()["error"]["code"] == "InvalidRequestBody"
    machine = sim.machine(SAMPLE_MACHINE)
    assert machine is not None and machine["machineTags"] == []


def test_500_ids_are_allowed_in_one_bulk_call(sim: DefenderSimulator) -> None:
    ids = [SAMPLE_MACHINE] * MAX_BULK_TAG_MACHINES
    response = Client(sim).post(BULK, {"Value": "x", "Action": "Add", "MachineIds": ids})
    assert response.status_code == 200 and len(response.json()["value"]) == 1


def test_tag_calls_spend_their_own_budget() -> None:
    assert operation_of("POST", f"/api/machines/{SAMPLE_MACHINE}/tags") == "machine-tag"
    assert operation_of("POST", BULK) == "machine-tag"
    with DefenderSimulator(rate_limits={"machine-tag": ((2, 60.0),), "offboard": ((5, 60.0),)}) as limited:
        client = Client(limited)
        tag = {"Value": "x", "Action": "Add"}
        assert client.post(f"/api/machines/{SAMPLE_MACHINE}/tags", tag).status_code == 200
        assert client.post(BULK, {**tag, "MachineIds": [SAMPLE_MACHINE]}).status_code == 200
        refused = client.post(f"/api/machines/{SAMPLE_MACHINE}/tags", tag)
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 59
        assert client.offboard(SAMPLE_MACHINE).status_code == 201  # offboards have their own budget
        assert len(limited.tag_calls()) == 3 and limited.throttled == limited.tag_calls()[2:]


def test_a_scripted_bulk_tag_reply_is_answered_first(sim: DefenderSimulator) -> None:
    sim.script(BULK_TAGS, Reply.error(503, "ServiceUnavailable"))
    body = {"Value": "x", "Action": "Add", "MachineIds": [SAMPLE_MACHINE]}
    assert Client(sim).post(BULK, body).status_code == 503
    assert Client(sim).post(BULK, body).status_code == 200


# ---- budgets per tenant -----------------------------------------------------------------


def tenant_of_token(token: str) -> str | None:
    """Test tokens look like `<tenant>.<anything>`."""
    return token.split(".", 1)[0] if "." in token else None


def test_each_tenant_has_its_own_full_budget() -> None:
    limits = {"offboard": ((2, 60.0),), "machine-read": ((1, 60.0),)}
    with DefenderSimulator(rate_limits=limits, accept_any=True, tenant_of=tenant_of_token) as sim:
        contoso, fabrikam = Client(sim, "contoso.token-1"), Client(sim, "fabrikam.token-2")
        assert [contoso.offboard(f"{n:040x}").status_code for n in (1, 2, 3)] == [201, 201, 429]
        assert [fabrikam.offboard(f"{n:040x}").status_code for n in (4, 5, 6)] == [201, 201, 429]
        # A tenant's operations stay separate too.
        assert contoso.get(f"/api/machines/{SAMPLE_MACHINE}").status_code == 200
        assert contoso.get(f"/api/machines/{SAMPLE_MACHINE}").status_code == 429
        assert fabrikam.get(f"/api/machines/{SAMPLE_MACHINE}").status_code == 200
        assert [c.tenant for c in sim.offboard_calls()] == ["contoso"] * 3 + ["fabrikam"] * 3
        assert [c.tenant for c in sim.throttled] == ["contoso", "fabrikam", "contoso"]


def test_without_tenant_of_every_caller_shares_one_budget_per_operation() -> None:
    with DefenderSimulator(rate_limits={"offboard": ((2, 60.0),)}, accept_any=True) as sim:
        contoso, fabrikam = Client(sim, "contoso.token-1"), Client(sim, "fabrikam.token-2")
        assert contoso.offboard(f"{1:040x}").status_code == 201
        assert fabrikam.offboard(f"{2:040x}").status_code == 201
        assert fabrikam.offboard(f"{3:040x}").status_code == 429
        assert {c.tenant for c in sim.calls} == {None}


def test_a_lookup_is_still_scriptable(sim: DefenderSimulator) -> None:
    sim.script(LOOKUP, Reply.error(429, "TooManyRequests", **{"Retry-After": "7"}))
    response = Client(sim).get(f"/api/machines?$filter=computerDnsName eq '{SHARED_NAME}'")
    assert response.status_code == 429 and response.headers["Retry-After"] == "7"
