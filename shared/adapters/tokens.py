"""Bearer tokens for Defender from the app's managed identity.

One credential per process: azure-identity caches the token on the credential object and
refreshes it before expiry, so a new credential per message would mean a token request
per message.
"""

from __future__ import annotations

import threading

from azure.core.credentials import TokenCredential
from azure.core.exceptions import AzureError
from azure.identity import ManagedIdentityCredential

from ..domain.errors import TokenUnavailable


class TokenProvider:
    def __init__(self, scope: str, client_id: str | None = None) -> None:
        self._scope = scope
        self._client_id = client_id
        self._credential: TokenCredential | None = None
        self._lock = threading.Lock()

    def _get_credential(self) -> TokenCredential:
        with self._lock:
            if self._credential is None:
                # client_id selects a user-assigned identity; None means system-assigned.
                self._credential = ManagedIdentityCredential(client_id=self._client_id)
            return self._credential

    def token(self) -> str:
        try:
            return self._get_credential().get_token(self._scope).token
        except AzureError as exc:
            # The exception text names the endpoint and status, never the token itself.
            raise TokenUnavailable(f"{type(exc).__name__}: {str(exc)[:300]}") from exc
