"""Bearer tokens from the app's managed identity: for the home tenant directly, and for a
customer tenant as the multi-tenant app that trusts that identity.

One credential per tenant per process: azure-identity caches the token on the credential
and refreshes it before expiry, so a credential per message would mean a token request per
message. A customer tenant's credential is a `ClientAssertionCredential` for the
multi-tenant app (MULTITENANT_APP_CLIENT_ID) in that tenant, whose assertion is a token the
user-assigned managed identity (MANAGED_IDENTITY_CLIENT_ID) gets for the token-exchange
audience (`api://AzureADTokenExchange`; Entra: "Configure an application to trust a managed
identity"). No secret exists anywhere. The sign-in host is azure-identity's own
AZURE_AUTHORITY_HOST (the template sets it for US Government clouds).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..domain.errors import TokenUnavailable

if TYPE_CHECKING:
    from azure.core.credentials import TokenCredential


@dataclass(frozen=True)
class CustomerTenants:
    """How customer tenants are reached: as this app, with this identity's assertion."""

    app_client_id: str
    exchange_audience: str = "api://AzureADTokenExchange"


class TokenProvider:
    def __init__(
        self, scope: str, client_id: str | None = None, customers: CustomerTenants | None = None
    ) -> None:
        self._scope = scope
        self._client_id = client_id
        self._customers = customers
        self._credentials: dict[str | None, TokenCredential] = {}
        self._lock = threading.RLock()  # a customer's credential is built on the home one

    def token(self, tenant_id: str | None = None) -> str:
        from azure.core.exceptions import AzureError

        try:
            return self._credential(tenant_id).get_token(self._scope).token
        except AzureError as exc:
            # The exception text names the endpoint and status, never the token itself.
            where = f" for tenant {tenant_id}" if tenant_id else ""
            raise TokenUnavailable(f"{type(exc).__name__}{where}: {str(exc)[:300]}") from exc

    def _credential(self, tenant_id: str | None) -> TokenCredential:
        with self._lock:
            found = self._credentials.get(tenant_id)
            if found is None:
                found = self._credentials[tenant_id] = self._build(tenant_id)
            return found

    def _build(self, tenant_id: str | None) -> TokenCredential:
        from azure.identity import ClientAssertionCredential, ManagedIdentityCredential

        if tenant_id is None:
            # client_id selects a user-assigned identity; None means system-assigned.
            return ManagedIdentityCredential(client_id=self._client_id)
        if self._customers is None or self._client_id is None:
            raise TokenUnavailable(
                f"tenant {tenant_id} needs MULTITENANT_APP_CLIENT_ID and MANAGED_IDENTITY_CLIENT_ID"
            )
        identity = self._credential(None)
        audience = f"{self._customers.exchange_audience}/.default"
        return ClientAssertionCredential(
            tenant_id, self._customers.app_client_id, lambda: identity.get_token(audience).token
        )
