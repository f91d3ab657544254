from __future__ import annotations

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
