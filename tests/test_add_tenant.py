"""infra/add-tenant.sh against the fake `az` (tests/fakes/az), signed in to a customer tenant:
the consent URL, the Defender roles for the multi-tenant app's service principal there, and the
OFFBOARD_TENANTS entry, which the app's own settings parser must accept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared.settings import Settings
from tests.fakes.azcli import FakeAz, Run

SCRIPT = "add-tenant.sh"
ROOT = Path(__file__).resolve().parent.parent
DEFENDER_APP_ID = "fc780465-2017-40d4-a0c5-307022471b92"
CUSTOMER = "72f988bf-0000-4000-8000-0000000000c1"
APP_ID = "3c1f0000-0000-4000-8000-0000000000a9"  # the multi-tenant app (home tenant)
APP_SP = "6d2e0000-0000-4000-8000-0000000000b7"  # its service principal in the customer tenant
DEFENDER_SP = "5b1f0000-0000-4000-8000-0000000c0001"
ROLES = {
    "Machine.Offboard": "11111111-0000-4000-8000-000000000001",
    "Machine.Read.All": "11111111-0000-4000-8000-000000000002",
    "Machine.ReadWrite.All": "11111111-0000-4000-8000-000000000003",
    "Machine.Isolate": "11111111-0000-4000-8000-000000000004",
}
CONSENT = f"https://login.microsoftonline.com/{CUSTOMER}/adminconsent?client_id={APP_ID}"


@pytest.fixture
def az(tmp_path: Path) -> FakeAz:
    return FakeAz(
        tmp_path,
        {
            "graph": "https://graph.microsoft.com/",
            "tenantId": CUSTOMER,
            "servicePrincipals": {
                APP_ID: {"id": APP_SP, "appRoles": []},  # consent has created it
                DEFENDER_APP_ID: {
                    "id": DEFENDER_SP,
                    "appRoles": [
                        {"value": value, "id": role_id, "allowedMemberTypes": ["Application"]}
                        for value, role_id in ROLES.items()
                    ],
                },
            },
            "assignments": [],
        },
    )


def add(az: FakeAz, *args: str) -> Run:
    return az.run(SCRIPT, "--tenant-id", CUSTOMER, "--app-id", APP_ID, *args)


def entry(result: Run) -> str:
    lines = result.out.splitlines()
    return lines[
        lines.index(next(line for line in lines if line.startswith("OFFBOARD_TENANTS entry"))) + 1
    ].strip()


def test_refuses_without_the_tenant_or_the_app(az: FakeAz) -> None:
    for args in (["--tenant-id", CUSTOMER], ["--app-id", APP_ID], []):
        result = az.run(SCRIPT, *args)
        assert result.code == 2 and result.calls == []
        assert "--tenant-id and --app-id are required" in result.err


@pytest.mark.parametrize(
    ("args", "refusal"),
    [
        (["--tenant-id", "contoso.onmicrosoft.com", "--app-id", APP_ID], "--tenant-id"),
        (["--tenant-id", f"{CUSTOMER}; rm -rf /", "--app-id", APP_ID], "--tenant-id"),
        (["--tenant-id", CUSTOMER, "--app-id", "offboard-app"], "--app-id"),
        (["--tenant-id", CUSTOMER, "--app-id", APP_ID, "--name", "Contoso, Ltd"], "--name"),
        (["--tenant-id", CUSTOMER, "--app-id", APP_ID, "--name", "a=b"], "--name"),
    ],
)
def test_refuses_ids_that_are_not_guids_and_names_the_setting_cannot_hold(
    az: FakeAz, args: list[str], refusal: str
) -> None:
    result = az.run(SCRIPT, *args)
    assert result.code == 1 and result.calls == []
    assert refusal in result.err


def test_consent_url_needs_no_sign_in(az: FakeAz) -> None:
    del az.state["tenantId"]
    az.save()
    result = add(az, "--consent-url")
    assert result.code == 0, result.err
    assert result.out.strip() == CONSENT
    assert all(call[:2] == ["cloud", "show"] for call in result.calls)


def test_consent_url_in_azure_government_uses_its_sign_in_host(az: FakeAz) -> None:
    az.state.update(
        cloud="AzureUSGovernment",
        login="https://login.microsoftonline.us",
        graph="https://graph.microsoft.us/",
    )
    az.save()
    result = add(az, "--consent-url")
    assert (
        result.out.strip() == f"https://login.microsoftonline.us/{CUSTOMER}/adminconsent?client_id={APP_ID}"
    )


def test_dry_run_prints_the_grants_and_the_entry_and_changes_nothing(az: FakeAz) -> None:
    result = add(az, "--dry-run")
    assert result.code == 0, result.err
    assert result.changes() == []
    assert CONSENT in result.out
    url = f"https://graph.microsoft.com/v1.0/servicePrincipals/{APP_SP}/appRoleAssignments"
    lines = [line for line in result.out.splitlines() if line.startswith("would grant")]
    assert [line.split(":")[0] for line in lines] == [
        "would grant Machine.Offboard",
        "would grant Machine.Read.All",
    ]
    for line, role in zip(lines, ["Machine.Offboard", "Machine.Read.All"], strict=True):
        assert f"--url {url}" in line and ROLES[role] in line and DEFENDER_SP in line
    assert entry(result) == CUSTOMER


def test_grants_to_the_apps_service_principal_then_a_second_run_changes_nothing(az: FakeAz) -> None:
    first = add(az, "--with-tagging", "--name", "Contoso Ltd")
    assert first.code == 0, first.err
    assert first.posts() == [
        {"principalId": APP_SP, "resourceId": DEFENDER_SP, "appRoleId": ROLES[role]}
        for role in ("Machine.Offboard", "Machine.Read.All", "Machine.ReadWrite.All")
    ]
    assert entry(first) == f"{CUSTOMER}=Contoso Ltd"
    second = add(az, "--with-tagging", "--name", "Contoso Ltd")
    assert second.code == 0, second.err
    assert second.changes() == []
    assert second.out.count("already granted:") == 3 and "nothing to change" in second.out


def test_roles_the_consent_granted_are_left_alone(az: FakeAz) -> None:
    # Consent grants what the app registration requests (create-multitenant-app.sh requests these).
    az.state["assignments"] = [
        {"principalId": APP_SP, "resourceId": DEFENDER_SP, "appRoleId": ROLES[role]}
        for role in ("Machine.Offboard", "Machine.Read.All")
    ]
    az.save()
    result = add(az)
    assert result.code == 0, result.err
    assert result.changes() == [] and "nothing to change" in result.out


def test_the_entry_is_what_the_app_accepts(az: FakeAz) -> None:
    result = add(az, "--name", "Fabrikam (EU)", "--dry-run")
    env = json.loads((ROOT / "local.settings.sample.json").read_text())["Values"]
    env |= {
        "OFFBOARD_TENANTS": entry(result),
        "MULTITENANT_APP_CLIENT_ID": APP_ID,
        "MANAGED_IDENTITY_CLIENT_ID": "00000000-0000-4000-8000-00000000c11e",
    }
    (tenant,) = Settings.from_env(env).tenants
    assert (tenant.id, tenant.name) == (CUSTOMER, "Fabrikam (EU)")


def test_ids_in_capitals_are_compared_and_printed_in_lower_case(az: FakeAz) -> None:
    result = az.run(SCRIPT, "--tenant-id", CUSTOMER.upper(), "--app-id", APP_ID.upper(), "--dry-run")
    assert result.code == 0, result.err
    assert entry(result) == CUSTOMER and CONSENT in result.out


@pytest.mark.parametrize(
    ("signed_in", "refusal"),
    [
        (
            "4a3b0000-0000-4000-8000-00000000f00d",
            f"signed in to tenant 4a3b0000-0000-4000-8000-00000000f00d, not {CUSTOMER}",
        ),
        (None, "not signed in"),
    ],
)
def test_refuses_unless_signed_in_to_that_tenant(az: FakeAz, signed_in: str | None, refusal: str) -> None:
    if signed_in is None:
        del az.state["tenantId"]
    else:
        az.state["tenantId"] = signed_in
    az.save()
    result = add(az)
    assert result.code == 1 and result.changes() == []
    assert refusal in result.err and f"az login --tenant {CUSTOMER} --allow-no-subscriptions" in result.err
    # Nothing was looked up in the wrong tenant.
    assert not any(call[:3] == ["ad", "sp", "show"] for call in result.calls)


def test_without_consent_it_says_consent_first_and_creates_nothing(az: FakeAz) -> None:
    del az.state["servicePrincipals"][APP_ID]
    az.save()
    result = add(az)
    assert result.code == 1 and result.changes() == []
    assert f"the app {APP_ID} has no service principal in tenant {CUSTOMER} yet: consent first" in result.err
    assert CONSENT in result.err


def test_a_tenant_without_defender_is_refused(az: FakeAz) -> None:
    del az.state["servicePrincipals"][DEFENDER_APP_ID]
    az.save()
    result = add(az)
    assert result.code == 1 and result.changes() == []
    assert "WindowsDefenderATP service principal" in result.err and CUSTOMER in result.err


def test_the_grants_go_through_the_clis_graph(az: FakeAz) -> None:
    az.state.update(
        cloud="AzureUSGovernment",
        login="https://login.microsoftonline.us",
        graph="https://graph.microsoft.us/",
    )
    az.save()
    result = add(az, "--dry-run")
    assert result.code == 0, result.err
    assert (
        f"--url https://graph.microsoft.us/v1.0/servicePrincipals/{APP_SP}/appRoleAssignments" in result.out
    )
