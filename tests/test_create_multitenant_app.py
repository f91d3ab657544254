"""infra/create-multitenant-app.sh against the fake `az` (tests/fakes/az): the multi-tenant app
registration and the federated credential that trusts the user-assigned identity."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.fakes.azcli import FakeAz, Run

SCRIPT = "create-multitenant-app.sh"
DEFENDER_APP_ID = "fc780465-2017-40d4-a0c5-307022471b92"
HOME_TENANT = "4a3b0000-0000-4000-8000-00000000f00d"
IDENTITY = "5e1f0000-0000-4000-8000-0000000011a1"  # the user-assigned identity's principal id
SYSTEM_IDENTITY = "5e1f0000-0000-4000-8000-00000000a991"
PLAIN_APP_SP = "5e1f0000-0000-4000-8000-0000000000ab"
NAME = "Defender offboarding (multi-tenant)"
ROLES = {
    "Machine.Offboard": "11111111-0000-4000-8000-000000000001",
    "Machine.Read.All": "11111111-0000-4000-8000-000000000002",
    "Machine.ReadWrite.All": "11111111-0000-4000-8000-000000000003",
    "Machine.Isolate": "11111111-0000-4000-8000-000000000004",
}
EXISTING_APP = "3c1f0000-0000-4000-8000-0000000000a9"
GLOBAL_FIC = {
    "name": f"uami-{IDENTITY}",
    "issuer": f"https://login.microsoftonline.com/{HOME_TENANT}/v2.0",
    "subject": IDENTITY,
    "audiences": ["api://AzureADTokenExchange"],
    "description": "Defender offboarding: the function app's user-assigned identity",
}


def managed_identity(object_id: str, explicit: bool) -> dict[str, Any]:
    kind = "userAssignedIdentities/offboard-identity" if explicit else "sites/offboard"
    return {
        "id": object_id,
        "servicePrincipalType": "ManagedIdentity",
        "alternativeNames": [
            f"isExplicit={explicit}",
            f"/subscriptions/0/resourcegroups/rg/providers/{kind}",
        ],
        "appRoles": [],
    }


def app(**fields: Any) -> dict[str, Any]:
    return {
        "appId": EXISTING_APP,
        "id": "0b1e0000-0000-4000-8000-0000000000a9",
        "displayName": NAME,
        "signInAudience": "AzureADMultipleOrgs",
        "web": {"redirectUris": ["https://portal.azure.com"]},
        "requiredResourceAccess": [],
        "federatedIdentityCredentials": [],
        **fields,
    }


@pytest.fixture
def az(tmp_path: Path) -> FakeAz:
    return FakeAz(
        tmp_path,
        {
            "graph": "https://graph.microsoft.com/",
            "tenantId": HOME_TENANT,
            "servicePrincipals": {
                IDENTITY: managed_identity(IDENTITY, explicit=True),
                SYSTEM_IDENTITY: managed_identity(SYSTEM_IDENTITY, explicit=False),
                PLAIN_APP_SP: {"id": PLAIN_APP_SP, "servicePrincipalType": "Application", "appRoles": []},
                DEFENDER_APP_ID: {
                    "id": "5b1f0000-0000-4000-8000-00000000d3f3",
                    "appRoles": [
                        {"value": value, "id": role_id, "allowedMemberTypes": ["Application"]}
                        for value, role_id in ROLES.items()
                    ],
                },
            },
            "assignments": [],
            "applications": [],
        },
    )


def create(az: FakeAz, *args: str) -> Run:
    return az.run(SCRIPT, "--identity-principal-id", IDENTITY, *args)


def requested(application: dict[str, Any]) -> list[dict[str, str]]:
    (defender,) = [r for r in application["requiredResourceAccess"] if r["resourceAppId"] == DEFENDER_APP_ID]
    return list(defender["resourceAccess"])


def test_refuses_without_the_identity_and_says_where_to_find_it(az: FakeAz) -> None:
    result = az.run(SCRIPT, "--dry-run")
    assert result.code == 2 and result.calls == []
    assert "--identity-principal-id is required" in result.err
    assert "userAssignedIdentityPrincipalId output" in result.err


@pytest.mark.parametrize(
    "args",
    [
        ["--identity-principal-id", "not-a-guid"],
        ["--identity-principal-id", f"{IDENTITY}; rm -rf /"],
        ["--identity-principal-id", IDENTITY, "--app-id", "my-app"],
        ["--identity-principal-id", IDENTITY, "--display-name", "it's"],
    ],
)
def test_refuses_values_that_are_not_ids_or_safe_names(az: FakeAz, args: list[str]) -> None:
    result = az.run(SCRIPT, *args)
    assert result.code != 0 and result.calls == []


def test_dry_run_looks_everything_up_and_changes_nothing(az: FakeAz) -> None:
    result = create(az, "--dry-run")
    assert result.code == 0, result.err
    assert result.changes() == [] and az.state["applications"] == []
    lines = result.out.splitlines()
    (create_line,) = [line for line in lines if line.startswith("would create the app registration:")]
    assert "--sign-in-audience AzureADMultipleOrgs" in create_line
    assert "--web-redirect-uris https://portal.azure.com" in create_line
    requests = [line for line in lines if line.startswith("would request")]
    assert [line.split(":")[0] for line in requests] == [
        "would request Machine.Offboard",
        "would request Machine.Read.All",
    ]
    assert f"--api {DEFENDER_APP_ID}" in requests[0] and f"{ROLES['Machine.Offboard']}=Role" in requests[0]
    (trust,) = [line for line in lines if line.startswith("would trust the identity")]
    for part in (
        f"uami-{IDENTITY}",
        f"https://login.microsoftonline.com/{HOME_TENANT}/v2.0",
        "AzureADTokenExchange",
    ):
        assert part in trust
    assert "dry run: 4 change(s) not made" in result.out
    # The role ids were looked up by value.
    assert any("value=='Machine.Offboard'" in q for q in result.queries())


def test_creates_the_app_and_trusts_the_identity_then_a_second_run_changes_nothing(az: FakeAz) -> None:
    first = create(az)
    assert first.code == 0, first.err
    (application,) = az.state["applications"]
    assert application["displayName"] == NAME
    assert application["signInAudience"] == "AzureADMultipleOrgs"
    assert application["web"]["redirectUris"] == ["https://portal.azure.com"]
    assert requested(application) == [
        {"id": ROLES["Machine.Offboard"], "type": "Role"},
        {"id": ROLES["Machine.Read.All"], "type": "Role"},
    ]
    assert application["federatedIdentityCredentials"] == [GLOBAL_FIC]
    assert f"multitenantAppClientId={application['appId']}" in first.out
    assert f"add-tenant.sh --tenant-id <customer tenant id> --app-id {application['appId']}" in first.out

    second = create(az)
    assert second.code == 0, second.err
    assert second.changes() == []
    assert "nothing to change" in second.out and "already trusted" in second.out
    assert second.out.count("already requested:") == 2


def test_government_cloud_uses_its_own_issuer_audience_and_portal(az: FakeAz) -> None:
    az.state.update(
        cloud="AzureUSGovernment",
        login="https://login.microsoftonline.us/",
        graph="https://graph.microsoft.us/",
    )
    az.save()
    result = create(az)
    assert result.code == 0, result.err
    (application,) = az.state["applications"]
    assert application["web"]["redirectUris"] == ["https://portal.azure.us"]
    (credential,) = application["federatedIdentityCredentials"]
    assert credential["issuer"] == f"https://login.microsoftonline.us/{HOME_TENANT}/v2.0"
    assert credential["audiences"] == ["api://AzureADTokenExchangeUSGov"]


def test_with_tagging_also_requests_machine_readwrite(az: FakeAz) -> None:
    result = create(az, "--with-tagging")
    assert result.code == 0, result.err
    (application,) = az.state["applications"]
    assert [r["id"] for r in requested(application)] == [
        ROLES["Machine.Offboard"],
        ROLES["Machine.Read.All"],
        ROLES["Machine.ReadWrite.All"],
    ]


def test_an_existing_app_gets_only_what_it_lacks(az: FakeAz) -> None:
    github = {
        "name": "github-main",
        "issuer": "https://token.actions.githubusercontent.com",
        "subject": "repo:contoso/offboard:ref:refs/heads/main",
        "audiences": ["api://AzureADTokenExchange"],
    }
    az.state["applications"] = [
        app(
            requiredResourceAccess=[
                {
                    "resourceAppId": DEFENDER_APP_ID,
                    "resourceAccess": [{"id": ROLES["Machine.Offboard"], "type": "Role"}],
                }
            ],
            federatedIdentityCredentials=[github],
        )
    ]
    az.save()
    result = create(az, "--app-id", EXISTING_APP)
    assert result.code == 0, result.err
    assert [c[:4] for c in result.changes()] == [
        ["ad", "app", "permission", "add"],
        ["ad", "app", "federated-credential", "create"],
    ]
    (application,) = az.state["applications"]
    assert [r["id"] for r in requested(application)] == [ROLES["Machine.Offboard"], ROLES["Machine.Read.All"]]
    assert application["federatedIdentityCredentials"] == [github, GLOBAL_FIC]


def test_the_identity_trusted_under_another_name_is_not_trusted_twice(az: FakeAz) -> None:
    done_by_hand = {**GLOBAL_FIC, "name": "function-app-identity", "subject": IDENTITY.upper()}
    az.state["applications"] = [app(federatedIdentityCredentials=[done_by_hand])]
    az.save()
    result = create(az)
    assert result.code == 0, result.err
    assert "already trusted: the identity" in result.out and "function-app-identity" in result.out
    assert not any(c[:4] == ["ad", "app", "federated-credential", "create"] for c in result.changes())


@pytest.mark.parametrize(
    ("principal", "refusal"),
    [
        (SYSTEM_IDENTITY, "only a user-assigned identity can be a federated credential"),
        (PLAIN_APP_SP, "is a Application service principal, not a managed identity"),
        ("5e1f0000-0000-4000-8000-0000000000ff", "no service principal with object id"),
    ],
)
def test_only_a_user_assigned_identity_is_trusted(az: FakeAz, principal: str, refusal: str) -> None:
    result = az.run(SCRIPT, "--identity-principal-id", principal)
    assert result.code == 1 and refusal in result.err
    assert result.changes() == []


def test_a_single_tenant_app_is_not_widened_silently(az: FakeAz) -> None:
    az.state["applications"] = [app(signInAudience="AzureADMyOrg")]
    az.save()
    result = create(az)
    assert result.code == 1 and result.changes() == []
    assert "signInAudience 'AzureADMyOrg'" in result.err
    assert f"az ad app update --id {EXISTING_APP} --sign-in-audience AzureADMultipleOrgs" in result.err


def test_two_apps_with_the_name_are_refused(az: FakeAz) -> None:
    az.state["applications"] = [app(), app(appId="3c1f0000-0000-4000-8000-0000000000aa")]
    az.save()
    result = create(az)
    assert result.code == 1 and result.changes() == []
    assert "several app registrations are named" in result.err and "--app-id" in result.err


def test_an_unknown_app_id_is_refused(az: FakeAz) -> None:
    result = create(az, "--app-id", EXISTING_APP)
    assert result.code == 1 and result.changes() == []
    assert f"no app registration with application id {EXISTING_APP}" in result.err


def test_a_full_app_is_refused_before_any_change(az: FakeAz) -> None:
    others = [{**GLOBAL_FIC, "name": f"other-{i}", "subject": f"subject-{i}"} for i in range(20)]
    az.state["applications"] = [app(federatedIdentityCredentials=others)]
    az.save()
    result = create(az)
    assert result.code == 1
    assert "already has 20 federated credentials" in result.err
    # The missing permissions were printed as planned, but nothing was made before the refusal.
    assert not any(c[:4] == ["ad", "app", "federated-credential", "create"] for c in result.changes())


def test_a_credential_with_our_name_and_another_subject_is_refused(az: FakeAz) -> None:
    stale = {**GLOBAL_FIC, "subject": "5e1f0000-0000-4000-8000-0000000000ee"}
    az.state["applications"] = [app(federatedIdentityCredentials=[stale])]
    az.save()
    result = create(az)
    assert result.code == 1
    assert f"federated credential named uami-{IDENTITY} that does not match" in result.err
    assert "az ad app federated-credential delete" in result.err


def test_not_signed_in_is_refused(az: FakeAz) -> None:
    del az.state["tenantId"]
    az.save()
    result = create(az)
    assert result.code == 1 and result.changes() == []
    assert "az login" in result.err


def test_a_home_tenant_without_defender_is_told_how_to_look_the_roles_up(az: FakeAz) -> None:
    del az.state["servicePrincipals"][DEFENDER_APP_ID]
    az.save()
    result = create(az)
    assert result.code == 1 and result.changes() == []
    assert f"az ad sp create --id {DEFENDER_APP_ID}" in result.err
