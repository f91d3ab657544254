"""Clients for the app's own queues and tables in the `AzureWebJobsStorage` account, in the
form its settings give (`shared.storage_settings`): a connection string, or the identity form
with tokens from the managed identity, as the Functions host uses them. Every client shares the
process's one transport (`transport.py`). The SDKs are imported on first use: they cost cold
starts a few hundred milliseconds, and the HTTP intake's first answer should not wait for them.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Any

from ..storage_settings import StorageAccess
from .entities import TableEntities
from .transport import shared_transport

if TYPE_CHECKING:
    from azure.data.tables import TableClient
    from azure.identity import ManagedIdentityCredential
    from azure.storage.queue import QueueClient


def queue_client(storage: StorageAccess, name: str) -> QueueClient:
    """A client for one queue, reading and writing base64 as the Functions host does."""
    from azure.storage.queue import QueueClient, TextBase64DecodePolicy, TextBase64EncodePolicy

    options: dict[str, Any] = {
        "message_encode_policy": TextBase64EncodePolicy(),
        "message_decode_policy": TextBase64DecodePolicy(),
        "transport": shared_transport(),
    }
    if storage.connection_string is not None:
        return QueueClient.from_connection_string(storage.connection_string, name, **options)
    assert storage.queue_service_uri is not None
    return QueueClient(storage.queue_service_uri, name, credential=_credential(storage.client_id), **options)


def table_client(storage: StorageAccess, name: str, **options: Any) -> TableClient:
    """A client for one table in the same account, with the same identity."""
    from azure.data.tables import TableClient

    options.setdefault("transport", shared_transport())
    if storage.connection_string is not None:
        return TableClient.from_connection_string(storage.connection_string, name, **options)
    assert storage.table_service_uri is not None
    return TableClient(storage.table_service_uri, name, credential=_credential(storage.client_id), **options)


def entities(storage: StorageAccess, name: str, **options: Any) -> TableEntities:
    """The `Entities` of one table (see entities.py)."""
    return TableEntities(table_client(storage, name, **options))


@lru_cache(maxsize=4)
def _credential(client_id: str | None) -> ManagedIdentityCredential:
    from azure.identity import ManagedIdentityCredential

    # One credential per identity per process: azure-identity caches tokens on it, so every
    # client shares one token per storage service instead of fetching its own.
    return ManagedIdentityCredential(client_id=client_id)
