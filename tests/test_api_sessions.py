"""Every API client of the app (Defender, Graph, the hold webhook) trusts the CA bundle the
environment names, also when no proxy is set and `requests` therefore does not scan the
environment itself: over real TLS on loopback, against a certificate only that bundle trusts.
(The Graph client once missed it, so a TLS-inspecting network broke the watcher alone.)"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from localdev.entra import EntraTokenService
from localdev.identity import IdentityEndpoint
from shared.adapters.defender import DefenderClient
from shared.adapters.graph import GraphClient
from shared.adapters.tokens import TokenProvider
from shared.adapters.transport import needs_environment
from shared.adapters.webhook import Webhook
from tests.tls import self_signed

_PROXY_SETTINGS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


@pytest.fixture
def tls_host(
    identity: IdentityEndpoint, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """An HTTPS server on loopback whose certificate only REQUESTS_CA_BUNDLE trusts; the
    sign-in fake serves it, and answers any other path with an error: an answer all the same."""
    certificate = self_signed(tmp_path_factory.mktemp("tls"))
    for name in _PROXY_SETTINGS:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certificate.certfile))
    for name, value in identity.env.items():
        monkeypatch.setenv(name, value)
    assert not needs_environment()
    with EntraTokenService(
        identity,
        certfile=certificate.certfile,
        keyfile=certificate.keyfile,
        app_client_id="5e6f7a8b-0000-4000-8000-000000000003",
        identity_client_id="0c1d2e3f-1111-4000-8000-000000000001",
        tenants=(),
    ) as server:
        yield server.url


def test_the_defender_client_trusts_the_bundle(tls_host: str) -> None:
    tokens = TokenProvider("https://api.securitycenter.microsoft.com/.default")
    client = DefenderClient(tls_host, tokens, connect_timeout=2, read_timeout=2)
    assert client.offboard("a" * 40, "test").status_code == 404  # answered, over verified TLS


def test_the_graph_client_trusts_the_bundle(tls_host: str) -> None:
    client = GraphClient(
        tls_host, TokenProvider("https://graph.microsoft.com/.default"), connect_timeout=2, read_timeout=2
    )
    assert client.managed_devices().status_code == 501  # the fake has no GET: answered, over verified TLS


def test_the_hold_webhook_trusts_the_bundle(tls_host: str) -> None:
    assert Webhook(tls_host + "/hook").post({"held": 1}) == "answered 404"
