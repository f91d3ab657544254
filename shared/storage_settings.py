"""Where the app's own queues and tables live: the `AzureWebJobsStorage` account, in either
form the Functions host accepts, so the app and the host always use the same account the same way.

- Connection string: `AzureWebJobsStorage` (Azurite locally; an account key in Azure only if
  you must).
- Identity (no secret anywhere): `AzureWebJobsStorage__accountName`, or the service URIs
  `AzureWebJobsStorage__queueServiceUri` and `AzureWebJobsStorage__tableServiceUri`
  (`__blobServiceUri` is the host's own), with `AzureWebJobsStorage__credential=managedidentity`
  and `AzureWebJobsStorage__clientId` to pick a user-assigned identity. Tokens come from the
  managed identity, as they do for the host, so the same role assignments serve both.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

PREFIX = "AzureWebJobsStorage"
_ACCOUNT_NAME = re.compile(r"[a-z0-9]{3,24}")
# The identity form's settings that this app reads; the host reads these and more.
_IDENTITY_KEYS = ("accountName", "queueServiceUri", "tableServiceUri", "credential", "clientId")


class StorageSettingsError(ValueError):
    """The storage settings are missing, malformed or contradict each other."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass(frozen=True)
class StorageAccess:
    """Either a connection string, or the queue and table endpoints reached with a managed identity."""

    connection_string: str | None = None
    queue_service_uri: str | None = None
    table_service_uri: str | None = None
    client_id: str | None = None

    @property
    def uses_identity(self) -> bool:
        return self.connection_string is None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> StorageAccess:
        connection = env.get(PREFIX, "").strip()
        given = {key: env.get(f"{PREFIX}__{key}", "").strip() for key in _IDENTITY_KEYS}
        identity = {key: value for key, value in given.items() if value}
        if connection and identity:
            names = ", ".join(f"{PREFIX}__{key}" for key in identity)
            both = f"{PREFIX}: set either a connection string or the identity-based settings ({names})"
            raise StorageSettingsError([f"{both}, not both"])
        if connection:
            return cls(connection_string=connection)
        if not identity:
            raise StorageSettingsError(
                [
                    f"{PREFIX} is required: a connection string in {PREFIX}, or the identity-based "
                    f"{PREFIX}__accountName (or {PREFIX}__queueServiceUri and {PREFIX}__tableServiceUri)"
                ]
            )
        return cls._from_identity_settings(identity)

    @classmethod
    def _from_identity_settings(cls, given: Mapping[str, str]) -> StorageAccess:
        problems: list[str] = []
        credential = given.get("credential")
        client_id = given.get("clientId")
        if credential is not None and credential.lower() != "managedidentity":
            problems.append(f"{PREFIX}__credential: {credential!r} is not supported; use 'managedidentity'")
        if client_id is not None and credential is None:
            # Without it the host would ignore the client id and use another identity.
            problems.append(f"{PREFIX}__clientId needs {PREFIX}__credential=managedidentity")

        account = given.get("accountName")
        queue_uri, table_uri = given.get("queueServiceUri"), given.get("tableServiceUri")
        if account is not None and (queue_uri or table_uri):
            problems.append(f"{PREFIX}: give {PREFIX}__accountName or the service URIs, not both")
        elif account is not None:
            if _ACCOUNT_NAME.fullmatch(account):
                # The public cloud's endpoints; other clouds give the service URIs instead.
                queue_uri = f"https://{account}.queue.core.windows.net"
                table_uri = f"https://{account}.table.core.windows.net"
            else:
                problems.append(f"{PREFIX}__accountName: {account!r} is not a storage account name")
        else:
            for key, uri in (("queueServiceUri", queue_uri), ("tableServiceUri", table_uri)):
                if uri is None:
                    problems.append(f"{PREFIX}__{key} is required with the service-URI form")
                elif (problem := _service_uri_problem(uri)) is not None:
                    problems.append(f"{PREFIX}__{key}: {problem}")
        if problems:
            raise StorageSettingsError(problems)
        assert queue_uri is not None and table_uri is not None  # every other path added a problem
        return cls(
            queue_service_uri=queue_uri.rstrip("/"),
            table_service_uri=table_uri.rstrip("/"),
            client_id=client_id,
        )


def _service_uri_problem(raw: str) -> str | None:
    parts = urlsplit(raw)
    if parts.scheme != "https" or not parts.hostname:
        # azure-core sends a bearer token only over https, so http could never work here.
        return f"{raw!r} is not an absolute https URL"
    if parts.query or parts.fragment or parts.username or parts.password:
        # A SAS token in a query would be a secret in a setting: exactly what this form avoids.
        return "must not carry credentials, a query (such as a SAS token) or a fragment"
    return None
