"""Many tenants, end to end: the real credentials (ManagedIdentityCredential for the home
tenant; ClientAssertionCredential for each customer tenant, whose assertion is the managed
identity's token for api://AzureADTokenExchange), real HTTPS to a loopback Entra
(localdev/entra.py, a certificate made here), real Azurite, the local host's HTTP and queue
triggers, and the Defender simulator keeping one budget per tenant.

What the issue asks: three tenants each get their full budget at once with no 429; a tenant
not allowed is refused (400 TenantNotAllowed) and changes nothing; a token failure in one
tenant does not slow the others; nothing of one tenant (token, budget, breaker, protection)
leaks into another, and the home tenant keeps the plain managed identity.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
from azure.core.exceptions import ResourceNotFoundError
from azure.data.tables import TableClient

from localdev.azurite import Azurite
from localdev.defender_sim import Call, DefenderSimulator, Reply
from localdev.entra import JWT_BEARER, EntraReply, EntraTokenService
from localdev.host import LOCAL_MASTER_KEY
from localdev.identity import IdentityEndpoint
from shared.domain.errors import TokenUnavailable
from shared.runtime import Services
from tests.conftest import RunningHost, adopt
from tests.tls import Certificate, self_signed

HostFactory = Callable[..., RunningHost]

CONTOSO = "3f8e2a1c-5b6d-4e7f-9a0b-1c2d3e4f5a6b"
FABRIKAM = "4a9f3b2d-6c7e-4f80-8b1c-2d3e4f5a6b7c"
NORTHWIND = "5b0a4c3e-7d8f-4091-9c2d-3e4f5a6b7c8d"
CUSTOMERS = (CONTOSO, FABRIKAM, NORTHWIND)
STRANGER = "9f0e1d2c-3b4a-4596-8877-665544332211"  # a real-looking tenant not in OFFBOARD_TENANTS
HOME = "home"  # how the simulator names the app's own tenant
APP = "5e6f7a8b-0000-4000-8000-000000000003"  # the multi-tenant app registration
IDENTITY = "0c1d2e3f-1111-4000-8000-000000000001"  # the user-assigned managed identity
DEFENDER_RESOURCE = "https://api.securitycenter.microsoft.com"
SCOPE = f"{DEFENDER_RESOURCE}/.default"
EXCHANGE = "api://AzureADTokenExchange"
# Small windows keep the file fast: 5 calls per 2 s per operation and tenant, on both sides.
CALLS, WINDOW, MARGIN = 5, 2.0, 1.0  # the margin is the app's default
LIMITS = {op: ((CALLS, WINDOW),) for op in ("offboard", "machine-read", "action-read", "machine-tag")}


def machine(tenant: str, n: int) -> str:
    """A distinct, well-formed machine id per tenant (the simulator's fleet is shared)."""
    return f"{CUSTOMERS.index(tenant) + 1 if tenant in CUSTOMERS else 9:x}{n:039x}"


# ---- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    return self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def entra(identity: IdentityEndpoint, certificate: Certificate) -> Iterator[EntraTokenService]:
    with EntraTokenService(
        identity,
        certfile=certificate.certfile,
        keyfile=certificate.keyfile,
        app_client_id=APP,
        identity_client_id=IDENTITY,
        tenants=CUSTOMERS,
        scope=SCOPE,
        audience=EXCHANGE,
    ) as service:
        yield service


def home_token(identity: IdentityEndpoint, token: str) -> bool:
    """A token the managed identity got for Defender itself (not the exchange audience)."""
    return any(t == token and r == DEFENDER_RESOURCE and c == IDENTITY for t, r, c in list(identity.issued))


@pytest.fixture
def defender(identity: IdentityEndpoint, entra: EntraTokenService) -> Iterator[DefenderSimulator]:
    """Overrides conftest's: only a Defender token is accepted (an exchange-audience token is
    not), and each token's tenant has its own budgets."""

    def tenant_of(token: str) -> str | None:
        return entra.tenant_of(token) or (HOME if home_token(identity, token) else None)

    with DefenderSimulator(
        accept_token=lambda token: tenant_of(token) is not None,
        accept_any=True,
        rate_limits=LIMITS,
        tenant_of=tenant_of,
    ) as sim:
        yield sim


@pytest.fixture
def tenant_env(entra: EntraTokenService, certificate: Certificate) -> dict[str, str]:
    budget = f"{CALLS}/{WINDOW:g}"
    return {
        "OFFBOARD_TENANTS": f"{CONTOSO}=Contoso,{FABRIKAM}=Fabrikam,{NORTHWIND}=Northwind",
        "MULTITENANT_APP_CLIENT_ID": APP,
        "MANAGED_IDENTITY_CLIENT_ID": IDENTITY,
        "DEFENDER_API_SCOPE": SCOPE,
        **entra.env,  # AZURE_AUTHORITY_HOST=https://127.0.0.1:<port>
        "REQUESTS_CA_BUNDLE": str(certificate.certfile),
        "DEFENDER_OFFBOARD_RATE_LIMITS": budget,
        "DEFENDER_MACHINE_READ_RATE_LIMITS": budget,
        "DEFENDER_ACTION_READ_RATE_LIMITS": budget,
        "DEFENDER_TAG_RATE_LIMITS": budget,
        "RATE_LIMIT_MARGIN_SECONDS": f"{MARGIN:g}",
        "OFFBOARD_BREAKER_LIMIT": "50",
        "OFFBOARD_CHECK_INITIAL_SECONDS": "1",
    }


@pytest.fixture
def in_process(
    make_services: Callable[..., Services], tenant_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Services]:
    """The app's services in this process, with the sign-in host and its certificate in the
    environment, where azure-identity reads them."""

    def make(**overrides: str) -> Services:
        env = {**tenant_env, **overrides}
        for name in ("AZURE_AUTHORITY_HOST", "REQUESTS_CA_BUNDLE"):
            monkeypatch.setenv(name, env[name])
        return make_services(**env)

    return make


# ---- helpers -----------------------------------------------------------------------------


def until(check: Callable[[], Any], timeout: float = 20.0, what: str = "the condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout:g}s")
        time.sleep(0.1)


def tenant(tenant_id: str | None) -> dict[str, str]:
    """How a request body names its tenant; the home tenant is named by naming none."""
    return {"tenantId": tenant_id} if tenant_id else {}


def status(host: RunningHost, request_id: str) -> dict[str, Any]:
    body: dict[str, Any] = host.get(f"/api/offboard/{request_id}").json()
    return body


def settled(host: RunningHost, request_ids: list[str], *statuses: str, timeout: float = 20.0) -> None:
    """Waits until every request has one of `statuses`, reading them all in one list call."""

    def done() -> bool:
        listed = {r["requestId"]: r["status"] for r in host.get("/api/offboard").json()["requests"]}
        return all(listed.get(r) in statuses for r in request_ids)

    until(done, timeout, f"{len(request_ids)} requests reaching {'/'.join(statuses)}")


def request_ids(answer: requests.Response) -> list[str]:
    body = answer.json()
    return [r["requestId"] for r in body["results"]] if "results" in body else [body["requestId"]]


def bearer(call: Call) -> str:
    return call.headers["Authorization"].removeprefix("Bearer ")


def table_rows(azurite: Azurite, name: str) -> list[dict[str, Any]]:
    client = TableClient.from_connection_string(azurite.connection_string, name)
    try:
        return [dict(e) for e in client.list_entities()]
    except ResourceNotFoundError:
        return []


def by_tenant(calls: list[Call]) -> dict[str, list[Call]]:
    grouped: dict[str, list[Call]] = {}
    for call in calls:
        grouped.setdefault(str(call.tenant), []).append(call)
    return grouped


def assert_each_call_carries_its_own_tenants_token(
    defender: DefenderSimulator, entra: EntraTokenService, identity: IdentityEndpoint
) -> None:
    for call in defender.calls:
        token = bearer(call)
        if call.tenant == HOME:
            assert home_token(identity, token) and entra.tenant_of(token) is None
        else:
            assert call.tenant in CUSTOMERS and token in entra.tokens_for(call.tenant)


# ---- the loopback Entra refuses what Entra refuses ----------------------------------------


def exchange_form(identity: IdentityEndpoint, **changes: str) -> dict[str, str]:
    return {
        "client_assertion": identity.issue(EXCHANGE, IDENTITY),
        "client_assertion_type": JWT_BEARER,
        "client_id": APP,
        "grant_type": "client_credentials",
        "scope": SCOPE,
        **changes,
    }


@pytest.mark.parametrize(
    ("tenant", "changes", "error", "code"),
    [
        (STRANGER, {}, "invalid_tenant", 90002),
        (CONTOSO, {"client_id": STRANGER}, "unauthorized_client", 700016),
        (CONTOSO, {"client_assertion": "sim-never-issued"}, "invalid_client", 700211),
        (CONTOSO, {"scope": "https://graph.microsoft.com/.default"}, "invalid_scope", 70011),
        (CONTOSO, {"grant_type": "password"}, "unsupported_grant_type", 70003),
    ],
)
def test_entra_refuses_what_entra_refuses(
    entra: EntraTokenService,
    identity: IdentityEndpoint,
    certificate: Certificate,
    tenant: str,
    changes: dict[str, str],
    error: str,
    code: int,
) -> None:
    form = exchange_form(identity, **changes)
    response = requests.post(
        f"{entra.url}/{tenant}/oauth2/v2.0/token", data=form, verify=str(certificate.certfile), timeout=5
    )
    assert response.status_code == 400
    body = response.json()
    assert body["error"] == error and body["error_codes"] == [code]
    assert body["error_description"].startswith(f"AADSTS{code}:")
    assert entra.issued == []


def test_entra_takes_only_the_trusted_identitys_exchange_token(
    entra: EntraTokenService, identity: IdentityEndpoint, certificate: Certificate
) -> None:
    url = f"{entra.url}/{CONTOSO}/oauth2/v2.0/token"

    def post(form: dict[str, str]) -> requests.Response:
        return requests.post(url, data=form, verify=str(certificate.certfile), timeout=5)

    # A token of the right identity for Defender itself, and one of another identity.
    wrong_audience = post(
        exchange_form(identity, client_assertion=identity.issue(DEFENDER_RESOURCE, IDENTITY))
    )
    other_identity = post(exchange_form(identity, client_assertion=identity.issue(EXCHANGE, STRANGER)))
    assert [r.json()["error_codes"] for r in (wrong_audience, other_identity)] == [[700212], [700213]]
    good = post(exchange_form(identity))
    assert good.status_code == 200 and good.json()["expires_in"] == 3599
    assert entra.tenant_of(good.json()["access_token"]) == CONTOSO
    with pytest.raises(requests.exceptions.SSLError):  # only a client that trusts the certificate
        requests.post(url, data=exchange_form(identity), timeout=5)


# ---- the credentials, in process ---------------------------------------------------------


def test_one_credential_per_tenant_and_the_home_tenant_keeps_the_plain_managed_identity(
    in_process: Callable[..., Services],
    entra: EntraTokenService,
    identity: IdentityEndpoint,
    defender: DefenderSimulator,
) -> None:
    services = in_process()
    for _ in range(3):
        for who in (None, *CUSTOMERS):
            services.defender.warm_up(who)
    # One exchange per customer tenant, each presenting the identity's one exchange token.
    exchanges = [t for t, r, _ in identity.issued if r == EXCHANGE]
    assert len(exchanges) == 1
    assert [(r.tenant, r.status, r.assertion) for r in entra.requests] == [
        (t, 200, exchanges[0]) for t in CUSTOMERS
    ]
    # The home tenant: the managed identity's own Defender token, never a trip to Entra.
    assert [(r, c) for _, r, c in identity.issued] == [(DEFENDER_RESOURCE, IDENTITY), (EXCHANGE, IDENTITY)]
    for who in (None, *CUSTOMERS):
        assert services.defender.get_machine(machine(CONTOSO, 1), who).status_code == 200
    assert [c.tenant for c in defender.calls] == [HOME, *CUSTOMERS]
    assert_each_call_carries_its_own_tenants_token(defender, entra, identity)


def test_a_tenant_entra_does_not_know_fails_its_own_requests_saying_which(
    in_process: Callable[..., Services], entra: EntraTokenService, defender: DefenderSimulator
) -> None:
    entra.tenants.discard(NORTHWIND)  # listed here, but consent was never given there (or a typo)
    services = in_process()
    with pytest.raises(TokenUnavailable) as caught:
        services.defender.warm_up(NORTHWIND)
    assert f"for tenant {NORTHWIND}" in str(caught.value) and "AADSTS90002" in str(caught.value)
    message = adopt(services, tenant_id=NORTHWIND)
    services.worker().process(message)
    record = services.store.get(message.request_id)
    assert record is not None and record.status == "Queued" and record.last_error_code == "TokenUnavailable"
    assert NORTHWIND in (record.last_error_message or "")
    assert defender.calls == []  # nothing reached Defender without its tenant's token
    services.defender.warm_up(CONTOSO)  # the other tenants are untouched
    assert entra.requests_for(CONTOSO)[-1].status == 200


# ---- through the local host --------------------------------------------------------------


def sign_in_everywhere(host: RunningHost, defender: DefenderSimulator) -> None:
    """A running instance: one dry run per tenant signs it in (see the cold-instance test at
    the end), then the window its precheck read took passes."""
    dry_runs = [
        request_ids(
            host.post("/api/offboard", {"machineId": machine(t or HOME, 99), "dryRun": True, **tenant(t)})
        )[0]
        for t in (None, *CUSTOMERS)
    ]
    settled(host, dry_runs, "DryRun")
    time.sleep(max(0.0, max(c.at for c in defender.calls) + WINDOW + MARGIN - time.time()))


def test_three_tenants_each_get_their_full_budget_at_once(
    local_host: HostFactory,
    tenant_env: dict[str, str],
    azurite: Azurite,
    app_env: dict[str, str],
    defender: DefenderSimulator,
    entra: EntraTokenService,
    identity: IdentityEndpoint,
) -> None:
    defender.action_progression = ["Succeeded"]  # one status read per action
    host = local_host(**tenant_env)
    sign_in_everywhere(host, defender)
    # All at once: Contoso, a batch naming its tenant once for every item, with one more than
    # a window allows; Fabrikam, single requests; Northwind, a batch naming the tenant per
    # item; the home tenant, a batch naming none.
    bodies: list[tuple[str, dict[str, Any]]] = [
        (
            CONTOSO,
            {
                "tenantId": CONTOSO.upper(),
                "requests": [{"machineId": machine(CONTOSO, n)} for n in range(CALLS + 1)],
            },
        ),
        *[(FABRIKAM, {"machineId": machine(FABRIKAM, n), "tenantId": FABRIKAM}) for n in range(CALLS)],
        (
            NORTHWIND,
            {"requests": [{"machineId": machine(NORTHWIND, n), "tenantId": NORTHWIND} for n in range(CALLS)]},
        ),
        (HOME, {"requests": [{"machineId": machine(HOME, n)} for n in range(CALLS)]}),
    ]
    ids: dict[str, list[str]] = {}
    lock = threading.Lock()

    def post(who: str, body: dict[str, Any]) -> None:
        answer = host.post("/api/offboard", body)
        assert answer.status_code == 202, answer.text
        with lock:
            ids.setdefault(who, []).extend(request_ids(answer))

    threads = [threading.Thread(target=post, args=pair) for pair in bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {t: len(i) for t, i in ids.items()} == {CONTOSO: 6, FABRIKAM: 5, NORTHWIND: 5, HOME: 5}
    settled(host, [i for group in ids.values() for i in group], "Succeeded", timeout=30)

    assert defender.throttled == []  # no 429, for offboards, reads or status checks
    offboards = by_tenant(defender.offboard_calls())
    assert {t: len(c) for t, c in offboards.items()} == {CONTOSO: 6, FABRIKAM: 5, NORTHWIND: 5, HOME: 5}
    first = min(c.at for c in defender.offboard_calls())
    for who, calls in offboards.items():
        # Each tenant's full window at once. One budget for all would have needed three more
        # windows (of 3 s with the margin) for these 20 calls: 9 s at least.
        assert calls[CALLS - 1].at - first < 2 * (WINDOW + MARGIN), who
    # One budget row per operation and tenant, shared by every instance.
    rows = table_rows(azurite, app_env["OFFBOARD_QUEUE_NAME"])
    assert sorted(r["RowKey"] for r in rows if r["PartitionKey"] == "offboard") == sorted(
        ["budget", *(f"budget-{t}" for t in CUSTOMERS)]
    )
    # The sixth of Contoso waited for Contoso's window, and only Contoso's.
    assert offboards[CONTOSO][CALLS].at - offboards[CONTOSO][0].at >= WINDOW
    assert_each_call_carries_its_own_tenants_token(defender, entra, identity)
    assert entra.refused() == []

    # What an operator sees: the tenant on every status, list and audit entry.
    assert {status(host, i).get("tenantId") for i in ids[CONTOSO]} == {CONTOSO}
    assert {"tenantId" in status(host, i) for i in ids[HOME]} == {False}
    listed = host.get("/api/offboard", params={"tenantId": FABRIKAM}).json()["requests"]
    assert sorted(r["requestId"] for r in listed if not r.get("dryRun")) == sorted(ids[FABRIKAM])
    trail = host.get(f"/api/offboard/{ids[NORTHWIND][0]}/audit").json()["events"]
    assert [e["event"] for e in trail][:3] == ["Received", "Queued", "Submitted"]
    assert {e.get("tenantId") for e in trail} == {NORTHWIND}


def test_a_tenant_not_allowed_is_refused_and_changes_nothing(
    local_host: HostFactory,
    tenant_env: dict[str, str],
    azurite: Azurite,
    app_env: dict[str, str],
    defender: DefenderSimulator,
    entra: EntraTokenService,
) -> None:
    host = local_host("--no-queues", **tenant_env)
    single = host.post("/api/offboard", {"machineId": machine(CONTOSO, 1), "tenantId": STRANGER})
    assert single.status_code == 400 and single.json()["error"]["code"] == "TenantNotAllowed"
    assert STRANGER in single.json()["error"]["message"]
    batch = host.post(
        "/api/offboard",
        {"tenantId": STRANGER, "requests": [{"machineId": machine(CONTOSO, n)} for n in (2, 3)]},
    )
    assert batch.status_code == 400 and batch.json()["error"]["code"] == "NoValidItems"
    assert [r["error"]["code"] for r in batch.json()["results"]] == ["TenantNotAllowed"] * 2
    # In a batch, only the item naming that tenant is refused.
    mixed = host.post(
        "/api/offboard",
        {
            "requests": [
                {"machineId": machine(CONTOSO, 4), "tenantId": STRANGER},
                {"machineId": machine(CONTOSO, 5)},
            ]
        },
    ).json()["results"]
    assert [r["status"] for r in mixed] == ["Rejected", "Queued"]
    not_an_id = host.post("/api/offboard", {"machineId": machine(CONTOSO, 6), "tenantId": "contoso"})
    assert not_an_id.status_code == 400 and not_an_id.json()["error"]["code"] == "InvalidTenantId"

    # Nothing of the refused tenant anywhere: no row, guard, breaker or budget, no message,
    # no token request, no Defender call; only the audit trail's record of each refusal.
    queue = app_env["OFFBOARD_QUEUE_NAME"]
    for table in (f"{queue}state", queue):
        assert STRANGER not in json.dumps(table_rows(azurite, table), default=str), table
    naming = [row for row in table_rows(azurite, f"{queue}audit") if STRANGER in json.dumps(row, default=str)]
    assert [(row["event"], row["outcome"]) for row in naming] == [("Rejected", "TenantNotAllowed")] * 4
    assert {row["PartitionKey"].startswith("rejected-") for row in naming} == {True}
    assert [r["requestId"] for r in host.get("/api/offboard").json()["requests"]] == [mixed[1]["requestId"]]
    assert entra.requests == [] and defender.calls == []


SLOW = 4.0  # seconds a slow sign-in takes


def test_a_token_failure_in_one_tenant_does_not_slow_the_others(
    local_host: HostFactory, tenant_env: dict[str, str], defender: DefenderSimulator, entra: EntraTokenService
) -> None:
    defender.action_progression = ["Pending"]
    entra.fail(FABRIKAM, 500, times=100)  # Fabrikam's sign-in is down (azure-identity retries each 500)
    entra.script(NORTHWIND, EntraReply.slow(SLOW))  # Northwind's first sign-in is slow
    host = local_host(**tenant_env)
    posted: dict[str, list[str]] = {}
    accepted: dict[str, float] = {}

    def post(who: str | None) -> None:
        body = {"requests": [{"machineId": machine(who or HOME, n)} for n in range(2)], **tenant(who)}
        answer = host.post("/api/offboard", body)
        posted[who or HOME], accepted[who or HOME] = request_ids(answer), time.time()

    threads = [threading.Thread(target=post, args=(t,)) for t in (None, *CUSTOMERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    settled(host, posted[CONTOSO] + posted[HOME] + posted[NORTHWIND], "Submitted", "Pending")
    latency = {
        t: max(c.at for c in calls) - accepted[t] for t, calls in by_tenant(defender.offboard_calls()).items()
    }
    # Contoso and the home tenant went at once, waiting neither for Fabrikam's sign-ins (each
    # fails after about 5 s: azure-identity tries a 500 four times, 0 + 1.6 + 3.2 s apart) nor
    # for Northwind's; Northwind was late by its own slow sign-in only.
    assert latency[CONTOSO] < 3.0 and latency[HOME] < 3.0, latency
    assert SLOW <= latency[NORTHWIND] < SLOW + 3.0, latency
    assert FABRIKAM not in latency and not any(c.tenant == FABRIKAM for c in defender.calls)

    # Fabrikam's requests wait, saying why and where; once its sign-in is back they go.
    failing = until(lambda: [s for i in posted[FABRIKAM] if (s := status(host, i)).get("lastError")])
    assert (
        failing[0]["lastError"]["code"] == "TokenUnavailable"
        and FABRIKAM in failing[0]["lastError"]["message"]
    )
    entra.clear(FABRIKAM)
    settled(host, posted[FABRIKAM], "Submitted", "Pending", timeout=30)
    assert {c.tenant for c in defender.offboard_calls()} == {CONTOSO, FABRIKAM, NORTHWIND, HOME}
    assert defender.throttled == []


def test_nothing_of_one_tenant_leaks_into_another(
    local_host: HostFactory,
    tenant_env: dict[str, str],
    azurite: Azurite,
    app_env: dict[str, str],
    defender: DefenderSimulator,
    entra: EntraTokenService,
    identity: IdentityEndpoint,
) -> None:
    defender.action_progression = ["Pending"]  # the actions stay cancellable
    crown, vip = ["Crown-Jewels"], ["VIP"]
    for who, n, tags in ((CONTOSO, 1, crown), (CONTOSO, 2, vip), (FABRIKAM, 1, crown), (HOME, 1, vip)):
        defender.add_machine(machine(who, n), machineTags=tags)
    # Contoso's second plain machine is throttled once: Contoso's budget backs off, no other.
    defender.script(machine(CONTOSO, 3), Reply.error(429, "TooManyRequests", **{"Retry-After": "1"}))
    host = local_host(
        **{
            **tenant_env,
            "OFFBOARD_BREAKER_LIMIT": "3",
            "OFFBOARD_PROTECTED_TAGS": "VIP",  # the deployment's protection
            f"OFFBOARD_PROTECTED_TAGS__{CONTOSO}": "Crown-Jewels",  # Contoso's own, instead of it
        }
    )

    def batch(who: str | None, *numbers: int) -> list[dict[str, Any]]:
        body = {"requests": [{"machineId": machine(who or HOME, n)} for n in numbers], **tenant(who)}
        results: list[dict[str, Any]] = host.post("/api/offboard", body).json()["results"]
        return results

    contoso = batch(CONTOSO, 1, 2, 3, 4)
    fabrikam = batch(FABRIKAM, 1, 2, 3)
    home = batch(None, 1, 2)
    # The breaker counts per tenant: Contoso's fourth is held, and nothing of anyone else.
    assert [r["status"] for r in contoso] == ["Queued"] * 3 + ["Held"]
    assert (
        contoso[3]["heldReason"]["code"] == "BreakerTripped"
        and "(limit 3)" in contoso[3]["heldReason"]["message"]
    )
    assert [r["status"] for r in fabrikam + home] == ["Queued"] * 5
    assert f"Blast-radius breaker tripped for tenant {CONTOSO}" in host.log()

    # Protection per tenant: Contoso's own tags replace the deployment's, for Contoso only.
    ids = {
        (t, n): r["requestId"]
        for t, rs in ((CONTOSO, contoso), (FABRIKAM, fabrikam), (HOME, home))
        for n, r in enumerate(rs, 1)
    }
    until(
        lambda: all(
            status(host, ids[k])["status"] not in ("Queued", "Throttled") for k in ids if k != (CONTOSO, 4)
        )
    )

    def outcome(request_id: str) -> str:
        found = status(host, request_id)
        if found["status"] in ("Submitted", "Pending"):
            return "Sent"
        text: str = found["status"]
        return text + (f"/{found['lastError']['code']}" if "lastError" in found else "")

    assert {k: outcome(i) for k, i in ids.items()} == {
        (CONTOSO, 1): "Rejected/ProtectedDevice",  # Crown-Jewels, in Contoso
        (CONTOSO, 2): "Sent",  # VIP protects the home tenant and Fabrikam, not Contoso
        (CONTOSO, 3): "Sent",  # throttled once, then sent
        (CONTOSO, 4): "Held",
        (FABRIKAM, 1): "Sent",  # Crown-Jewels means nothing in Fabrikam
        (FABRIKAM, 2): "Sent",
        (FABRIKAM, 3): "Sent",
        (HOME, 1): "Rejected/ProtectedDevice",  # VIP, in the home tenant
        (HOME, 2): "Sent",
    }
    # The 429 backed off Contoso's offboard budget only.
    budgets = {
        r["RowKey"]: r["BlockedUntil"]
        for r in table_rows(azurite, app_env["OFFBOARD_QUEUE_NAME"])
        if r["PartitionKey"] == "offboard"
    }
    assert len(defender.offboard_calls(machine(CONTOSO, 3))) == 2  # the 429, then the offboard
    assert budgets[f"budget-{CONTOSO}"] > 0 and budgets[f"budget-{FABRIKAM}"] == budgets["budget"] == 0
    assert defender.throttled == []  # and no 429 of the simulator's own limits, anywhere

    # Releasing Contoso's held request, and cancelling one, act in Contoso with Contoso's token.
    released = requests.post(
        f"{host.url}/api/offboard/{ids[(CONTOSO, 4)]}/release",
        headers={"x-functions-key": LOCAL_MASTER_KEY},
        timeout=10,
    )
    assert released.status_code == 200
    settled(host, [ids[(CONTOSO, 4)]], "Submitted", "Pending")
    cancelled = host.post(f"/api/offboard/{ids[(CONTOSO, 2)]}/cancel", {"comment": "wrong device"})
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "Cancelled"
    [cancel] = [c for c in defender.calls if c.path.endswith("/cancel")]
    assert cancel.tenant == CONTOSO
    assert_each_call_carries_its_own_tenants_token(defender, entra, identity)
    # Every exchange presented the user-assigned identity's exchange token, and only that.
    assertions = {r.assertion for r in entra.requests}
    assert assertions and all(
        (a, EXCHANGE, IDENTITY) in [(t, r, c) for t, r, c in identity.issued] for a in assertions
    )


# ---- a cold sign-in ----------------------------------------------------------------------


# Every read's slot is taken after the tenant's token (Calls.warm_up), as the offboard's is: a
# cold instance's first sign-in in a tenant (two hops: the identity, then Entra) must not make
# the reads late for their slots, or the read after them would be refused with 429.
def test_a_slow_first_sign_in_does_not_make_reads_late_for_their_slots(
    local_host: HostFactory, tenant_env: dict[str, str], defender: DefenderSimulator, entra: EntraTokenService
) -> None:
    defender.action_progression = ["Pending"]
    entra.script(CONTOSO, *[EntraReply.slow(2.5)] * (CALLS + 1))  # a cold, slow sign-in
    host = local_host(**tenant_env)
    host.post(
        "/api/offboard",
        {"tenantId": CONTOSO, "requests": [{"machineId": machine(CONTOSO, n)} for n in range(CALLS + 1)]},
    )
    defender.wait_for_calls(CALLS + 1)
    assert defender.throttled == []
