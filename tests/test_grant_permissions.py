"""infra/grant-permissions.sh against a fake `az` first on PATH (tests/fakes/az), which records
every call and answers from a small tenant state, so the script's real logic runs unchanged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.azcli import FakeAz, Run

DEFENDER_APP_ID = "fc780465-2017-40d4-a0c5-307022471b92"
DEFENDER_SP = "5b1f0000-0000-4000-8000-00000000d3f3"
GRAPH_APP_ID = "00000003-0000-0000-c000-000000000000"
GRAPH_SP = "9a7e0000-0000-4000-8000-0000000061a9"
PRINCIPAL = "0f1e2d3c-0000-4000-8000-000000000001"
# Made-up role ids: the script must look them up by value, never know them.
ROLES = {
    "Machine.Offboard": "11111111-0000-4000-8000-000000000001",
    "Machine.Read.All": "11111111-0000-4000-8000-000000000002",
    "Machine.ReadWrite.All": "11111111-0000-4000-8000-000000000003",
    "Machine.Isolate": "11111111-0000-4000-8000-000000000004",
}
GRAPH_ROLES = {
    "DeviceManagementManagedDevices.Read.All": "22222222-0000-4000-8000-000000000001",
    "DeviceManagementApps.Read.All": "22222222-0000-4000-8000-000000000002",
    "DeviceManagementManagedDevices.ReadWrite.All": "22222222-0000-4000-8000-000000000003",
    "User.Read.All": "22222222-0000-4000-8000-000000000004",
}
INTUNE_ROLES = ["DeviceManagementManagedDevices.Read.All", "DeviceManagementApps.Read.All"]


@pytest.fixture
def tenant(tmp_path: Path) -> dict[str, Any]:
    return {
        "graph": "https://graph.microsoft.com/",
        "servicePrincipals": {
            PRINCIPAL: {"id": PRINCIPAL, "appRoles": []},
            DEFENDER_APP_ID: {
                "id": DEFENDER_SP,
                "appRoles": [
                    {"value": value, "id": role_id, "allowedMemberTypes": ["Application"]}
                    for value, role_id in ROLES.items()
                ],
            },
            GRAPH_APP_ID: {
                "id": GRAPH_SP,
                "appRoles": [
                    {"value": value, "id": role_id, "allowedMemberTypes": ["Application"]}
                    for value, role_id in GRAPH_ROLES.items()
                ],
            },
        },
        "assignments": [],
    }


@pytest.fixture
def grant(tmp_path: Path, tenant: dict[str, Any]) -> Any:
    az = FakeAz(tmp_path, tenant)

    def run(*args: str) -> Run:
        return az.run("grant-permissions.sh", *args)

    return run


def test_refuses_without_a_principal_id_and_says_where_to_find_it(grant: Any) -> None:
    result = grant("--dry-run")
    assert result.code == 2
    assert "--principal-id is required" in result.err
    assert "apiPrincipalId output" in result.err and "az functionapp identity show" in result.err
    assert result.calls == []


@pytest.mark.parametrize("bad", ["not-a-guid", f"{PRINCIPAL}; rm -rf /", ""])
def test_refuses_a_principal_id_that_is_not_an_object_id(grant: Any, bad: str) -> None:
    result = grant("--principal-id", bad)
    assert result.code != 0 and result.calls == []
    assert "--principal-id" in result.err


def test_dry_run_looks_roles_up_by_value_and_prints_the_grants(grant: Any) -> None:
    result = grant("--principal-id", PRINCIPAL, "--dry-run")
    assert result.code == 0, result.err
    assert result.posts() == []
    url = f"https://graph.microsoft.com/v1.0/servicePrincipals/{PRINCIPAL}/appRoleAssignments"
    lines = [line for line in result.out.splitlines() if line.startswith("would grant")]
    assert [line.split(":")[0] for line in lines] == [
        "would grant Machine.Offboard",
        "would grant Machine.Read.All",
    ]
    for line, role in zip(lines, ["Machine.Offboard", "Machine.Read.All"], strict=True):
        assert f"az rest --method POST --url {url} --headers Content-Type=application/json --body" in line
        assert ROLES[role] in line and DEFENDER_SP in line and PRINCIPAL in line
    assert "Machine.ReadWrite.All" not in result.out
    # The look-ups really ran, by value: no role id was known in advance.
    queries = [c[c.index("--query") + 1] for c in result.calls if "--query" in c]
    assert any("value=='Machine.Offboard'" in q for q in queries)


def test_grants_then_a_second_run_changes_nothing(grant: Any) -> None:
    first = grant("--principal-id", PRINCIPAL, "--with-tagging")
    assert first.code == 0, first.err
    assert first.posts() == [
        {"principalId": PRINCIPAL, "resourceId": DEFENDER_SP, "appRoleId": ROLES[role]}
        for role in ("Machine.Offboard", "Machine.Read.All", "Machine.ReadWrite.All")
    ]
    second = grant("--principal-id", PRINCIPAL, "--with-tagging")
    assert second.code == 0, second.err
    assert second.posts() == []
    assert second.out.count("already granted:") == 3 and "nothing to change" in second.out


def test_only_missing_roles_are_granted(grant: Any, tenant: dict[str, Any], tmp_path: Path) -> None:
    tenant["assignments"] = [
        {"principalId": PRINCIPAL, "resourceId": DEFENDER_SP, "appRoleId": ROLES["Machine.Offboard"]}
    ]
    (tmp_path / "tenant.json").write_text(json.dumps(tenant))
    result = grant("--principal-id", PRINCIPAL)
    assert result.code == 0, result.err
    assert [p["appRoleId"] for p in result.posts()] == [ROLES["Machine.Read.All"]]
    assert "already granted: Machine.Offboard" in result.out


def test_government_cloud_uses_its_own_graph(grant: Any, tenant: dict[str, Any], tmp_path: Path) -> None:
    tenant["graph"] = "https://graph.microsoft.us/"
    (tmp_path / "tenant.json").write_text(json.dumps(tenant))
    result = grant("--principal-id", PRINCIPAL, "--dry-run")
    assert result.code == 0, result.err
    assert (
        f"--url https://graph.microsoft.us/v1.0/servicePrincipals/{PRINCIPAL}/appRoleAssignments"
        in result.out
    )


def test_unknown_principal_is_refused_before_any_change(grant: Any) -> None:
    result = grant("--principal-id", "0f1e2d3c-0000-4000-8000-0000000000ff")
    assert result.code == 1 and result.posts() == []
    assert "no service principal with object id 0f1e2d3c-0000-4000-8000-0000000000ff" in result.err


def test_tenant_without_defender_is_refused(grant: Any, tenant: dict[str, Any], tmp_path: Path) -> None:
    del tenant["servicePrincipals"][DEFENDER_APP_ID]
    (tmp_path / "tenant.json").write_text(json.dumps(tenant))
    result = grant("--principal-id", PRINCIPAL)
    assert result.code == 1 and result.posts() == []
    assert "WindowsDefenderATP service principal" in result.err


def test_intune_roles_are_neither_looked_up_nor_granted_without_the_flag(grant: Any) -> None:
    result = grant("--principal-id", PRINCIPAL, "--with-tagging")
    assert result.code == 0, result.err
    assert all(GRAPH_APP_ID not in call for call in result.calls)
    assert GRAPH_SP not in json.dumps(result.posts())


def test_with_intune_dry_run_prints_the_graph_grants_and_changes_nothing(grant: Any) -> None:
    result = grant("--principal-id", PRINCIPAL, "--with-intune", "--dry-run")
    assert result.code == 0, result.err
    assert result.posts() == []
    lines = [line for line in result.out.splitlines() if line.startswith("would grant")]
    assert [line.split(":")[0].removeprefix("would grant ") for line in lines] == [
        "Machine.Offboard",
        "Machine.Read.All",
        *INTUNE_ROLES,
    ]
    url = f"https://graph.microsoft.com/v1.0/servicePrincipals/{PRINCIPAL}/appRoleAssignments"
    for line, role in zip(lines[2:], INTUNE_ROLES, strict=True):
        # Granted on Graph's own service principal, the role looked up by value.
        assert f"--url {url}" in line and GRAPH_ROLES[role] in line and GRAPH_SP in line
        assert DEFENDER_SP not in line
    assert "dry run: 4 grant(s) not made" in result.out
    queries = [c[c.index("--query") + 1] for c in result.calls if "--query" in c]
    assert any("value=='DeviceManagementApps.Read.All'" in q for q in queries)


def test_with_intune_grants_then_a_second_run_changes_nothing(grant: Any) -> None:
    first = grant("--principal-id", PRINCIPAL, "--with-intune")
    assert first.code == 0, first.err
    assert first.posts() == [
        {"principalId": PRINCIPAL, "resourceId": DEFENDER_SP, "appRoleId": ROLES[role]}
        for role in ("Machine.Offboard", "Machine.Read.All")
    ] + [
        {"principalId": PRINCIPAL, "resourceId": GRAPH_SP, "appRoleId": GRAPH_ROLES[role]}
        for role in INTUNE_ROLES
    ]
    second = grant("--principal-id", PRINCIPAL, "--with-intune")
    assert second.code == 0, second.err
    assert second.posts() == []
    assert second.out.count("already granted:") == 4 and "nothing to change" in second.out


def test_a_role_granted_on_another_api_does_not_count(
    grant: Any, tenant: dict[str, Any], tmp_path: Path
) -> None:
    # Same principal, a Graph role already there: the Defender grants are still all missing.
    tenant["assignments"] = [
        {
            "principalId": PRINCIPAL,
            "resourceId": GRAPH_SP,
            "appRoleId": GRAPH_ROLES["DeviceManagementApps.Read.All"],
        }
    ]
    (tmp_path / "tenant.json").write_text(json.dumps(tenant))
    result = grant("--principal-id", PRINCIPAL, "--with-intune")
    assert result.code == 0, result.err
    assert [p["appRoleId"] for p in result.posts()] == [
        ROLES["Machine.Offboard"],
        ROLES["Machine.Read.All"],
        GRAPH_ROLES["DeviceManagementManagedDevices.Read.All"],
    ]
    assert "already granted: DeviceManagementApps.Read.All" in result.out


def test_missing_graph_service_principal_is_refused_before_any_grant(
    grant: Any, tenant: dict[str, Any], tmp_path: Path
) -> None:
    del tenant["servicePrincipals"][GRAPH_APP_ID]
    (tmp_path / "tenant.json").write_text(json.dumps(tenant))
    result = grant("--principal-id", PRINCIPAL, "--with-intune")
    assert result.code == 1
    # Not even the Defender roles: a refusal leaves the tenant as it was.
    assert result.posts() == []
    assert (
        f"the Microsoft Graph service principal (app id {GRAPH_APP_ID}) is not in this tenant" in result.err
    )


def test_a_role_the_api_does_not_offer_is_refused_before_any_grant(
    grant: Any, tenant: dict[str, Any], tmp_path: Path
) -> None:
    graph = tenant["servicePrincipals"][GRAPH_APP_ID]
    graph["appRoles"] = [r for r in graph["appRoles"] if r["value"] != "DeviceManagementApps.Read.All"]
    (tmp_path / "tenant.json").write_text(json.dumps(tenant))
    result = grant("--principal-id", PRINCIPAL, "--with-intune")
    assert result.code == 1 and result.posts() == []
    assert "Microsoft Graph offers no application role 'DeviceManagementApps.Read.All'" in result.err
