"""A loopback Entra ID token endpoint for the client-assertion exchange, over HTTPS.

A customer tenant is reached as the multi-tenant app, whose credential is a token the
user-assigned managed identity gets for the token-exchange audience (shared/adapters/tokens.py).
azure-identity's ClientAssertionCredential POSTs that token here, form-encoded, to
`/{tenant}/oauth2/v2.0/token` (`client_assertion`, `client_assertion_type` jwt-bearer,
`client_id`, `grant_type=client_credentials`, `scope`), on the host AZURE_AUTHORITY_HOST
names. The authority must be https, so this endpoint speaks TLS with the certificate it is
given; the client trusts it through REQUESTS_CA_BUNDLE.

It checks what Entra checks for a federated credential, with errors shaped like Entra's
(`error`, `error_description` starting with the AADSTS code, `error_codes`):
- the tenant is one it knows (others: 400 `invalid_tenant`, AADSTS90002);
- `client_id` is the multi-tenant app (400 `unauthorized_client`, AADSTS700016);
- the assertion is a token the loopback managed-identity endpoint really issued
  (localdev/identity.py records each one), for the exchange audience and for the
  user-assigned identity the app trusts (400 `invalid_client`, AADSTS700211-700213);
- the scope is the one resource the app may ask for (400 `invalid_scope`, AADSTS70011).
It then answers a token of that tenant and records it, so a test maps a token to its tenant
(`tenant_of`, e.g. as the Defender simulator's `tenant_of`).

`script(tenant, *replies)` makes the next requests for a tenant fail (`EntraReply.error_of`)
or answer slowly (`EntraReply.slow`), in order, then normally again; `fail(tenant, status,
times)` is the short form and `clear(tenant)` ends it. Every request is recorded (`requests`),
with what was answered. The certificate is the caller's (tests make one; none is committed).
"""

from __future__ import annotations

import contextlib
import io
import secrets
import ssl
import threading
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple, cast
from urllib.parse import parse_qs

from .identity import IdentityEndpoint
from .loopback import LoopbackServer, QuietHandler

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
TOKEN_LIFETIME_SECONDS = 3599  # what Entra answers for an app-only token
# A connection that sends nothing (no TLS handshake, no request) is closed after this long.
_IDLE_SECONDS = 30.0


@dataclass(frozen=True)
class EntraReply:
    """A scripted answer: an error (`status` set), or the normal answer after a delay."""

    status: int | None = None
    error: str = ""
    description: str = ""
    delay_seconds: float = 0.0

    @classmethod
    def error_of(cls, status: int, error: str, description: str = "") -> EntraReply:
        return cls(status, error, description or f"scripted {error}")

    @classmethod
    def slow(cls, seconds: float) -> EntraReply:
        return cls(delay_seconds=seconds)


class Refusal(NamedTuple):
    """Entra's 400: `error`, its AADSTS number and the description."""

    error: str
    code: int
    description: str


@dataclass(frozen=True)
class TokenRequest:
    """One request the endpoint received, and what it answered."""

    tenant: str
    form: dict[str, str]
    status: int
    error: str | None
    at: float
    token: str | None = None
    scripted: bool = False  # answered as `script` said

    @property
    def assertion(self) -> str | None:
        return self.form.get("client_assertion")


class EntraTokenService(LoopbackServer):
    def __init__(
        self,
        identity: IdentityEndpoint,
        *,
        certfile: str | Path,
        keyfile: str | Path,
        app_client_id: str,
        identity_client_id: str,
        tenants: Iterable[str],
        scope: str = "https://api.securitycenter.microsoft.com/.default",
        audience: str = "api://AzureADTokenExchange",
        port: int = 0,
    ) -> None:
        self.identity = identity
        self.app_client_id = app_client_id.lower()
        self.identity_client_id = identity_client_id.lower()
        self.tenants = {t.lower() for t in tenants}
        self.scope = scope
        self.audience = audience
        self.issued: list[tuple[str, str]] = []  # (token, tenant)
        self.requests: list[TokenRequest] = []
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context.load_cert_chain(str(certfile), str(keyfile))
        self._scripts: dict[str, deque[EntraReply]] = defaultdict(deque)
        self._lock = threading.Lock()
        super().__init__(_Handler, port)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """What azure-identity reads to sign in here (the certificate is trusted separately)."""
        return {"AZURE_AUTHORITY_HOST": self.url}

    def script(self, tenant: str, *replies: EntraReply) -> None:
        """Answer the next requests for `tenant` with `replies`, in order, then normally."""
        with self._lock:
            self._scripts[tenant.lower()].extend(replies)

    def fail(self, tenant: str, status: int = 500, times: int = 1) -> None:
        error = "temporarily_unavailable" if status >= 500 else "invalid_request"
        self.script(tenant, *[EntraReply.error_of(status, error)] * times)

    def clear(self, tenant: str) -> None:
        """Forget what is still scripted for `tenant`: it answers normally from now on."""
        with self._lock:
            self._scripts.pop(tenant.lower(), None)

    def tenant_of(self, token: str) -> str | None:
        """The tenant this endpoint issued `token` for; None for a token it never issued."""
        with self._lock:
            return next((tenant for issued, tenant in self.issued if issued == token), None)

    def tokens_for(self, tenant: str) -> set[str]:
        with self._lock:
            return {token for token, t in self.issued if t == tenant.lower()}

    def requests_for(self, tenant: str) -> list[TokenRequest]:
        with self._lock:
            return [r for r in self.requests if r.tenant == tenant.lower()]

    def refused(self) -> list[TokenRequest]:
        """Requests answered with an error that no script asked for."""
        with self._lock:
            return [r for r in self.requests if r.status != 200 and not r.scripted]

    def next_scripted(self, tenant: str) -> EntraReply | None:
        with self._lock:
            queue = self._scripts.get(tenant)
            return queue.popleft() if queue else None

    def issue(self, tenant: str) -> str:
        token = f"entra-{tenant[:8]}-{secrets.token_urlsafe(24)}"
        with self._lock:
            self.issued.append((token, tenant))
        return token

    def record(self, request: TokenRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def check(self, tenant: str, form: dict[str, str]) -> Refusal | None:
        """Entra's refusal of this request, or None when it earns a token."""
        if tenant not in self.tenants:
            return Refusal(
                "invalid_tenant",
                90002,
                f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are "
                "signing into the correct cloud.",
            )
        if form.get("grant_type") != "client_credentials":
            return Refusal("unsupported_grant_type", 70003, "The app requested an unsupported grant type.")
        if form.get("client_assertion_type") != JWT_BEARER or not form.get("client_assertion"):
            return Refusal("invalid_request", 900144, "The request body must contain client_assertion.")
        if (form.get("client_id") or "").lower() != self.app_client_id:
            return Refusal(
                "unauthorized_client",
                700016,
                f"Application with identifier '{form.get('client_id')}' was not found in the directory "
                f"'{tenant}'.",
            )
        # The federated credential: the identity endpoint's own token, for the exchange
        # audience, of the one user-assigned identity the app trusts.
        assertion = form["client_assertion"]
        issued = next(((r, c) for t, r, c in list(self.identity.issued) if t == assertion), None)
        no_match = "No matching federated identity record found for presented assertion"
        if issued is None:
            return Refusal("invalid_client", 700211, f"{no_match} issuer.")
        resource, client = issued
        if resource.removesuffix("/.default") != self.audience:
            return Refusal("invalid_client", 700212, f"{no_match} audience.")
        if (client or "").lower() != self.identity_client_id:
            return Refusal("invalid_client", 700213, f"{no_match} subject.")
        if form.get("scope") != self.scope:
            return Refusal(
                "invalid_scope", 70011, f"The provided value for scope {form.get('scope')!r} is not valid."
            )
        return None


class _Handler(QuietHandler):
    """TLS per connection, set up in the connection's own thread: a client that never finishes
    its handshake holds up no one else."""

    _secure = False

    def setup(self) -> None:
        service = cast(EntraTokenService, self.server.owner)  # type: ignore[attr-defined]
        plain = self.request
        plain.settimeout(_IDLE_SECONDS)
        try:
            self.request = service.context.wrap_socket(plain, server_side=True)
        except (ssl.SSLError, OSError):
            plain.close()  # e.g. a client that does not trust the certificate
            self.connection = plain
            self.rfile, self.wfile = io.BytesIO(), io.BytesIO()
            return
        self._secure = True
        super().setup()

    def handle(self) -> None:
        if self._secure:
            super().handle()

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        self.connection.close()

    def do_POST(self) -> None:  # noqa: N802 - http.server naming
        service = cast(EntraTokenService, self.server.owner)  # type: ignore[attr-defined]
        body = self.read_body()
        parts = self.path.split("?", 1)[0].strip("/").split("/")
        if len(parts) != 4 or parts[1:] != ["oauth2", "v2.0", "token"]:
            return self._send_json(404, {"error": "not_found", "error_description": f"no route {self.path}"})
        tenant = parts[0].lower()
        form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
        at = time.time()
        scripted = service.next_scripted(tenant)
        if scripted is not None and scripted.delay_seconds:
            time.sleep(scripted.delay_seconds)
        if scripted is not None and scripted.status is not None:
            service.record(TokenRequest(tenant, form, scripted.status, scripted.error, at, scripted=True))
            return self._error(scripted.status, scripted.error, 0, scripted.description)
        if self.headers.get_content_type() != "application/x-www-form-urlencoded":
            refusal: Refusal | None = Refusal(
                "invalid_request", 900144, "The request body must be application/x-www-form-urlencoded."
            )
        else:
            refusal = service.check(tenant, form)
        if refusal is not None:
            service.record(TokenRequest(tenant, form, 400, refusal.error, at))
            return self._error(400, *refusal)
        token = service.issue(tenant)
        service.record(TokenRequest(tenant, form, 200, None, at, token))
        self._send_json(
            200,
            {
                "token_type": "Bearer",
                "expires_in": TOKEN_LIFETIME_SECONDS,
                "ext_expires_in": TOKEN_LIFETIME_SECONDS,
                "access_token": token,
            },
        )

    def _error(self, status: int, error: str, code: int, description: str) -> None:
        body: dict[str, Any] = {
            "error": error,
            "error_description": f"AADSTS{code}: {description}" if code else description,
            "error_codes": [code] if code else [],
            "timestamp": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ"),
            "trace_id": str(uuid.uuid4()),
            "correlation_id": str(uuid.uuid4()),
        }
        self._send_json(status, body)

    def _send_json(self, status: int, body: Any) -> None:
        # A client may have given up waiting (a slow scripted answer), as a timing-out one does.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError, ssl.SSLError):
            self.send_json(status, body)
