"""The two forms of AzureWebJobsStorage: parsing, bad combinations, and the clients they build.

The connection-string form is exercised end to end on Azurite by the other tests; the identity
form needs Azure's managed identity and https, so here it is checked up to the client it builds.
"""

from __future__ import annotations

import pytest
from azure.identity import ManagedIdentityCredential
from azure.storage.queue import TextBase64DecodePolicy, TextBase64EncodePolicy

from shared.adapters.storage import queue_client, table_client
from shared.settings import Settings, SettingsError
from shared.storage_settings import StorageAccess, StorageSettingsError

QUEUE_URI = "https://offboardst1.queue.core.usgovcloudapi.net/"
TABLE_URI = "https://offboardst1.table.core.usgovcloudapi.net/"
CLIENT_ID = "0f1e2d3c-0000-4000-8000-000000000001"


def test_connection_string_form() -> None:
    storage = StorageAccess.from_env({"AzureWebJobsStorage": " UseDevelopmentStorage=true "})
    assert storage == StorageAccess(connection_string="UseDevelopmentStorage=true")
    assert not storage.uses_identity


def test_account_name_form_uses_the_system_assigned_identity_by_default() -> None:
    storage = StorageAccess.from_env({"AzureWebJobsStorage__accountName": "offboardst1"})
    assert storage.uses_identity and storage.connection_string is None
    assert storage.queue_service_uri == "https://offboardst1.queue.core.windows.net"
    assert storage.table_service_uri == "https://offboardst1.table.core.windows.net"
    assert storage.client_id is None


def test_service_uri_form_with_a_user_assigned_identity() -> None:
    storage = StorageAccess.from_env(
        {
            "AzureWebJobsStorage__queueServiceUri": QUEUE_URI,
            "AzureWebJobsStorage__tableServiceUri": TABLE_URI,
            "AzureWebJobsStorage__blobServiceUri": "https://offboardst1.blob.core.usgovcloudapi.net",
            "AzureWebJobsStorage__credential": "managedidentity",
            "AzureWebJobsStorage__clientId": CLIENT_ID,
        }
    )
    assert storage == StorageAccess(
        queue_service_uri=QUEUE_URI.rstrip("/"), table_service_uri=TABLE_URI.rstrip("/"), client_id=CLIENT_ID
    )


def test_empty_identity_settings_count_as_unset() -> None:
    storage = StorageAccess.from_env(
        {"AzureWebJobsStorage": "UseDevelopmentStorage=true", "AzureWebJobsStorage__clientId": " "}
    )
    assert storage.connection_string == "UseDevelopmentStorage=true"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {},
            ["AzureWebJobsStorage is required: a connection string in AzureWebJobsStorage, or the identity"],
        ),
        (
            {
                "AzureWebJobsStorage": "UseDevelopmentStorage=true",
                "AzureWebJobsStorage__accountName": "offboardst1",
            },
            ["or the identity-based settings (AzureWebJobsStorage__accountName), not both"],
        ),
        (
            {
                "AzureWebJobsStorage__accountName": "offboardst1",
                "AzureWebJobsStorage__queueServiceUri": QUEUE_URI,
            },
            ["give AzureWebJobsStorage__accountName or the service URIs, not both"],
        ),
        (
            {"AzureWebJobsStorage__accountName": "Offboard_St"},
            ["'Offboard_St' is not a storage account name"],
        ),
        (
            {"AzureWebJobsStorage__queueServiceUri": QUEUE_URI},
            ["AzureWebJobsStorage__tableServiceUri is required"],
        ),
        (
            {
                "AzureWebJobsStorage__queueServiceUri": "http://offboardst1.queue.core.windows.net",
                "AzureWebJobsStorage__tableServiceUri": TABLE_URI + "?sv=2024&sig=abc",
            },
            [
                "queueServiceUri: 'http://offboardst1.queue.core.windows.net' is not an absolute https URL",
                "SAS",
            ],
        ),
        (
            {"AzureWebJobsStorage__accountName": "offboardst1", "AzureWebJobsStorage__clientId": CLIENT_ID},
            ["AzureWebJobsStorage__clientId needs AzureWebJobsStorage__credential=managedidentity"],
        ),
        (
            {
                "AzureWebJobsStorage__accountName": "offboardst1",
                "AzureWebJobsStorage__credential": "connectionstring",
            },
            ["'connectionstring' is not supported; use 'managedidentity'"],
        ),
    ],
)
def test_bad_forms_are_refused_with_every_problem_named(env: dict[str, str], expected: list[str]) -> None:
    with pytest.raises(StorageSettingsError) as caught:
        StorageAccess.from_env(env)
    assert len(caught.value.problems) == len(expected)
    for problem, words in zip(caught.value.problems, expected, strict=True):
        assert words in problem


def test_settings_accept_the_identity_form_without_a_connection_string() -> None:
    settings = Settings.from_env({"AzureWebJobsStorage__accountName": "offboardst1"})
    assert settings.storage.queue_service_uri == "https://offboardst1.queue.core.windows.net"


def test_settings_report_storage_problems_with_the_others() -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"AzureWebJobsStorage__accountName": "x", "OFFBOARD_MAX_ATTEMPTS": "0"})
    assert [p.split(":")[0] for p in caught.value.problems] == [
        "AzureWebJobsStorage__accountName",
        "OFFBOARD_MAX_ATTEMPTS",
    ]


def test_identity_clients_use_one_managed_identity_credential_and_base64_queues() -> None:
    storage = StorageAccess(
        queue_service_uri=QUEUE_URI.rstrip("/"), table_service_uri=TABLE_URI.rstrip("/"), client_id=CLIENT_ID
    )
    work, poison, table = (
        queue_client(storage, "offboard-requests"),
        queue_client(storage, "x-poison"),
        table_client(storage, "requests"),
    )
    assert work.url == QUEUE_URI + "offboard-requests"
    assert table.url == TABLE_URI.rstrip("/") and table.table_name == "requests"
    assert isinstance(work.credential, ManagedIdentityCredential)
    assert work.credential is poison.credential is table.credential
    assert isinstance(work._message_encode_policy, TextBase64EncodePolicy)
    assert isinstance(work._message_decode_policy, TextBase64DecodePolicy)


def test_connection_string_clients_carry_no_managed_identity() -> None:
    storage = StorageAccess(connection_string="UseDevelopmentStorage=true")
    client = queue_client(storage, "offboard-requests")
    assert not isinstance(client.credential, ManagedIdentityCredential)
    assert isinstance(client._message_encode_policy, TextBase64EncodePolicy)
    assert table_client(storage, "requests").table_name == "requests"
