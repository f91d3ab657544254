from __future__ import annotations

import re

import pytest

from shared.settings import DEFAULT_COMMENT, Settings, SettingsError

MINIMAL = {"AzureWebJobsStorage": "UseDevelopmentStorage=true"}


def test_defaults_follow_the_contract() -> None:
    s = Settings.from_env(MINIMAL)
    assert s.queue_name == "offboard-requests" and s.poison_queue_name == "offboard-requests-poison"
    assert s.defender_base_url == "https://api.securitycenter.microsoft.com"
    assert s.defender_scope == "https://api.securitycenter.microsoft.com/.default"
    assert s.managed_identity_client_id is None
    assert s.default_comment == DEFAULT_COMMENT


def test_every_problem_is_reported_at_once_with_its_name() -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(
            {
                "OFFBOARD_QUEUE_NAME": "Bad_Queue",
                "DEFENDER_API_BASE_URL": "http://api.securitycenter.microsoft.com",
                "DEFENDER_API_SCOPE": "api://defender",
                "OFFBOARD_MAX_ATTEMPTS": "zero",
                "OFFBOARD_RETRY_BASE_SECONDS": "-1",
                "DEFENDER_READ_TIMEOUT_SECONDS": "nan",
            }
        )
    names = [p.split(" ")[0].rstrip(":") for p in caught.value.problems]
    assert names == [
        "AzureWebJobsStorage",
        "OFFBOARD_QUEUE_NAME",
        "DEFENDER_API_BASE_URL",
        "DEFENDER_API_SCOPE",
        "OFFBOARD_MAX_ATTEMPTS",
        "OFFBOARD_RETRY_BASE_SECONDS",
        "DEFENDER_READ_TIMEOUT_SECONDS",
    ]
    assert "https" in str(caught.value)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080", "http://localhost:1", "http://[::1]:9"])
def test_plain_http_is_allowed_only_for_loopback(url: str) -> None:
    assert Settings.from_env({**MINIMAL, "DEFENDER_API_BASE_URL": url}).defender_base_url == url


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.5",
        "ftp://x",
        "https://user:pw@api.securitycenter.microsoft.com",
        "https://x/?a=b",
        "api",
    ],
)
def test_unsafe_base_urls_are_refused(url: str) -> None:
    with pytest.raises(SettingsError, match="DEFENDER_API_BASE_URL"):
        Settings.from_env({**MINIMAL, "DEFENDER_API_BASE_URL": url})


def test_queue_name_leaves_room_for_the_poison_suffix() -> None:
    with pytest.raises(SettingsError, match="OFFBOARD_QUEUE_NAME"):
        Settings.from_env({**MINIMAL, "OFFBOARD_QUEUE_NAME": "q" * 60})


def test_user_assigned_identity() -> None:
    s = Settings.from_env({**MINIMAL, "MANAGED_IDENTITY_CLIENT_ID": " 0f1e2d3c-0000-4000-8000-000000000001 "})
    assert s.managed_identity_client_id == "0f1e2d3c-0000-4000-8000-000000000001"


def test_settings_are_frozen() -> None:
    s = Settings.from_env(MINIMAL)
    with pytest.raises(AttributeError):
        s.queue_name = "other"  # type: ignore[misc]


def test_sample_settings_file_is_valid_and_complete() -> None:
    import json
    from pathlib import Path

    values = json.loads((Path(__file__).parent.parent / "local.settings.sample.json").read_text())["Values"]
    settings = Settings.from_env(values)
    assert settings.queue_name == "offboard-requests"


def test_tenants_are_listed_with_names_and_their_own_protection() -> None:
    home = "9f0e1d2c-3b4a-4596-8877-665544332211"
    s = Settings.from_env(
        {
            **MINIMAL,
            "OFFBOARD_TENANTS": f"{home}=Contoso Ltd, 1A2B3C4D-0000-4000-8000-000000000002",
            f"OFFBOARD_PROTECTED_TAGS__{home}": "Tier0,DC",
            "MULTITENANT_APP_CLIENT_ID": "5e6f7a8b-0000-4000-8000-000000000003",
            "MANAGED_IDENTITY_CLIENT_ID": "0f1e2d3c-0000-4000-8000-000000000001",
        }
    )
    contoso, other = s.tenants
    assert contoso.id == home and contoso.name == "Contoso Ltd" and contoso.protected_tags == ("Tier0", "DC")
    assert other.id == "1a2b3c4d-0000-4000-8000-000000000002" and other.protected_tags is None
    assert s.tenant(home) is contoso and s.tenant(None) is None and s.tenant("x") is None


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"OFFBOARD_TENANTS": "not-a-guid"}, "OFFBOARD_TENANTS"),
        ({"OFFBOARD_TENANTS": "9f0e1d2c-3b4a-4596-8877-665544332211"}, "MULTITENANT_APP_CLIENT_ID"),
        ({"OFFBOARD_APPROVAL": "sometimes"}, "OFFBOARD_APPROVAL"),
        ({"OFFBOARD_CANCEL": "nobody"}, "OFFBOARD_CANCEL"),
        ({"OFFBOARD_PUBLIC_BASE_URL": "http://offboard.contoso.com"}, "OFFBOARD_PUBLIC_BASE_URL"),
        ({"OFFBOARD_PUBLIC_BASE_URL": "https://offboard.contoso.com/api"}, "OFFBOARD_PUBLIC_BASE_URL"),
        ({"OFFBOARD_HOLD_NOTIFY_URL": "http://hooks.contoso.com/x"}, "OFFBOARD_HOLD_NOTIFY_URL"),
        ({"INTUNE_WATCH_SCHEDULE": "*/5 * * * *"}, "INTUNE_WATCH_SCHEDULE"),
        ({"INTUNE_WATCH_MODE": "wipe"}, "INTUNE_WATCH_MODE"),
        ({"GRAPH_API_BASE_URL": "http://graph.microsoft.com"}, "GRAPH_API_BASE_URL"),
        ({"OFFBOARD_SDK_LOG_LEVEL": "LOUD"}, "OFFBOARD_SDK_LOG_LEVEL"),
    ],
)
def test_new_settings_that_do_not_parse_are_named(extra: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        Settings.from_env({**MINIMAL, **extra})


TENANT = "9f0e1d2c-3b4a-4596-8877-665544332211"
TENANT_SETTINGS = {
    "OFFBOARD_TENANTS": TENANT,
    "MULTITENANT_APP_CLIENT_ID": "5e6f7a8b-0000-4000-8000-000000000003",
    "MANAGED_IDENTITY_CLIENT_ID": "0f1e2d3c-0000-4000-8000-000000000001",
}


def test_a_per_tenant_setting_names_its_tenant_with_underscores_as_app_service_requires() -> None:
    # App Service setting names hold only letters, digits, periods and underscores.
    underscored = TENANT.replace("-", "_").upper()
    s = Settings.from_env(
        {
            **MINIMAL,
            **TENANT_SETTINGS,
            f"OFFBOARD_PROTECTED_TAGS__{underscored}": "Crown-Jewels",
            f"OFFBOARD_PROTECTED_GROUP_IDS__{TENANT}": "7",
        }
    )
    assert s.tenants[0].protected_tags == ("Crown-Jewels",) and s.tenants[0].protected_group_ids == (7,)


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("OFFBOARD_PROTECTED_TAGS__1a2b3c4d_0000_4000_8000_000000000002", "does not list"),
        ("OFFBOARD_PROTECTED_GROUP_IDS__contoso", "is not a tenant id"),
    ],
)
def test_a_per_tenant_setting_for_no_listed_tenant_is_refused_not_ignored(name: str, says: str) -> None:
    # A mistyped id would otherwise leave the tenant meant without the protection asked for.
    with pytest.raises(SettingsError, match=f"{name}: .*{says}"):
        Settings.from_env({**MINIMAL, **TENANT_SETTINGS, name: "Tier0"})


def test_every_problem_is_reported_at_once_tenants_included() -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({**MINIMAL, "OFFBOARD_MAX_ATTEMPTS": "0", "OFFBOARD_TENANTS": TENANT})
    text = str(raised.value)
    assert "OFFBOARD_MAX_ATTEMPTS" in text and "MULTITENANT_APP_CLIENT_ID is required" in text


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (
            {"MANAGED_IDENTITY_CLIENT_ID": "anything-goes"},
            "MANAGED_IDENTITY_CLIENT_ID: 'anything-goes' is not a GUID",
        ),
        ({"OFFBOARD_DEFAULT_COMMENT": "x" * 1001}, "OFFBOARD_DEFAULT_COMMENT: is over 1000 characters"),
        ({"OFFBOARD_DEFAULT_COMMENT": "bell\a"}, "OFFBOARD_DEFAULT_COMMENT: contains control characters"),
        ({"OFFBOARD_QUEUE_NAME": " offboard-requests"}, "OFFBOARD_QUEUE_NAME: remove the spaces"),
        ({"INTUNE_WATCH_SCHEDULE": "0 */5 * * * * "}, "INTUNE_WATCH_SCHEDULE: remove the spaces"),
    ],
)
def test_settings_the_app_could_only_fail_on_later_are_refused_at_start(
    extra: dict[str, str], says: str
) -> None:
    with pytest.raises(SettingsError, match=re.escape(says)):
        Settings.from_env({**MINIMAL, **extra})


def test_a_bad_table_name_is_explained_once() -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({**MINIMAL, "OFFBOARD_STATE_TABLE_NAME": "ab"})
    assert str(raised.value).count("is not a valid table name") == 1
