"""The Graph simulator speaks what the watcher relies on: bearer tokens, paging with
@odata.nextLink, $select, the audit filter, scripted faults, Graph's own limits, and the
administrator's actions with their audit events; and the Graph client talks to it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import requests

from localdev.fleet import FLEET
from localdev.graph_sim import (
    AUDIT,
    DEVICES,
    EMPTY_GUID,
    SEEDS,
    GraphSimulator,
    Reply,
    seed_named,
    stamp,
)
from localdev.identity import IdentityEndpoint
from shared.adapters.graph import DEVICE_FIELDS, ForeignLink, GraphClient, graph_time
from shared.adapters.tokens import TokenProvider
from shared.domain.errors import NoResponse

DEVICES_URL = "/v1.0/deviceManagement/managedDevices"
AUDIT_URL = "/v1.0/deviceManagement/auditEvents"


ANY_TOKEN = "t"
GRAPH_RESOURCE = "https://graph.microsoft.com"


@pytest.fixture
def graph(identity: IdentityEndpoint) -> Iterator[GraphSimulator]:
    """Accepts only tokens the identity endpoint issued for Graph (not Defender's)."""

    def accept(token: str) -> bool:
        return any(t == token and r == GRAPH_RESOURCE for t, r, _ in list(identity.issued))

    with GraphSimulator(accept_token=accept) as sim:
        yield sim


def get(sim: GraphSimulator, url: str, token: str = ANY_TOKEN, **params: str) -> requests.Response:
    full = url if url.startswith("http") else sim.url + url
    return requests.get(full, params=params or None, headers={"Authorization": f"Bearer {token}"}, timeout=5)


@pytest.fixture
def client(graph: GraphSimulator, identity: IdentityEndpoint, monkeypatch: pytest.MonkeyPatch) -> GraphClient:
    for name, value in identity.env.items():
        monkeypatch.setenv(name, value)
    tokens = TokenProvider(GRAPH_RESOURCE + "/.default")
    return GraphClient(graph.url, tokens, connect_timeout=2, read_timeout=1)


def test_the_seeds_match_the_defender_fleet_by_entra_id_or_dns_name() -> None:
    by_aad = {m.aad_device_id: m for m in FLEET if m.aad_device_id}
    by_name = {m.computer_dns_name: m for m in FLEET}
    matched = [s for s in SEEDS if s.azure_ad_device_id in by_aad or s.device_name in by_name]
    assert {s.device_name for s in matched} == {
        "WS-0042",
        "DESKTOP-7F3K2",
        "WS-0117",
        "mac-design-07",
        "mac-finance-02",
        "lnx-build-11.corp.contoso.com",
    }
    assert seed_named("lnx-build-11.corp.contoso.com").azure_ad_device_id == EMPTY_GUID
    outside = {s.device_name for s in SEEDS} - {s.device_name for s in matched}
    assert outside == {"WS-0999", "Lobby kiosk #3"}  # unknown to Defender; no usable identifier


def test_only_accepted_tokens_are_served() -> None:
    with GraphSimulator(accept_token=lambda token: token == "good") as sim:
        assert get(sim, DEVICES_URL, "bad").status_code == 401
        assert get(sim, DEVICES_URL, "good").status_code == 200
        no_header = requests.get(sim.url + DEVICES_URL, timeout=5)
        assert no_header.status_code == 401
        assert no_header.json()["error"]["code"] == "InvalidAuthenticationToken"


def test_devices_are_paged_with_next_links_and_select_is_honoured() -> None:
    with GraphSimulator(page_size=3) as sim:
        first = get(sim, DEVICES_URL, **{"$select": "id,deviceName"}).json()
        assert [set(d) for d in first["value"]] == [{"id", "deviceName"}] * 3
        seen, link = list(first["value"]), first.get("@odata.nextLink")
        while link:
            assert link.startswith(sim.url + DEVICES_URL + "?") and "$skiptoken=" in link
            page = get(sim, link).json()
            seen += page["value"]
            link = page.get("@odata.nextLink")
        assert [d["id"] for d in seen] == [s.id for s in SEEDS]
        assert len(sim.route_calls(DEVICES)) == 3  # 8 devices, 3 a page


def test_paging_reads_a_snapshot_and_a_made_up_skiptoken_is_refused() -> None:
    with GraphSimulator(page_size=4) as sim:
        first = get(sim, DEVICES_URL).json()
        sim.delete(SEEDS[5].id)  # on the second page
        second = get(sim, first["@odata.nextLink"]).json()
        assert [d["id"] for d in first["value"] + second["value"]] == [s.id for s in SEEDS]
        refused = get(sim, DEVICES_URL, **{"$skiptoken": "bm90LWEtdG9rZW4"})
        assert refused.status_code == 400


def test_a_filter_on_managed_devices_is_silently_ignored_as_graph_may() -> None:
    with GraphSimulator() as sim:
        answer = get(sim, DEVICES_URL, **{"$filter": "managementState eq 'retirePending'"}).json()
        assert len(answer["value"]) == len(SEEDS)  # not one of them is retiring


def test_admin_actions_change_state_and_write_audit_events() -> None:
    ws42, kiosk = seed_named("WS-0042"), seed_named("Lobby kiosk #3")
    with GraphSimulator() as sim:
        retired = sim.retire(ws42.id, actor="alice@contoso.com")
        wiped = sim.wipe(seed_named("DESKTOP-7F3K2").id)
        deleted = sim.delete(kiosk.id)
        devices = {d["id"]: d for d in get(sim, DEVICES_URL).json()["value"]}
        assert devices[ws42.id]["managementState"] == "retirePending"
        assert devices[seed_named("DESKTOP-7F3K2").id]["managementState"] == "wipePending"
        assert kiosk.id not in devices  # a deleted record is gone at once
        assert retired["activityType"] == "retire ManagedDevice"
        assert wiped["activityType"] == "wipe ManagedDevice"
        assert deleted["activityType"] == "Delete ManagedDevice"
        assert retired["actor"]["userPrincipalName"] == "alice@contoso.com"
        assert retired["resources"][0]["resourceId"] == ws42.id
        properties = {p["displayName"]: p["newValue"] for p in retired["resources"][0]["modifiedProperties"]}
        assert properties["AzureADDeviceId"] == ws42.azure_ad_device_id
        assert deleted["resources"][0]["modifiedProperties"] == []  # only the inventory knows it
        sim.check_in(ws42.id)
        assert ws42.id not in {d["id"] for d in get(sim, DEVICES_URL).json()["value"]}


def test_audit_events_filter_on_time_newest_first_in_pages() -> None:
    start = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
    with GraphSimulator(audit_page_size=2) as sim:
        for minutes, seed in enumerate(SEEDS[:5]):
            sim.retire(seed.id, at=start + timedelta(minutes=minutes))
        since = f"activityDateTime gt {stamp(start + timedelta(minutes=1))}"
        page = get(sim, AUDIT_URL, **{"$filter": since}).json()
        times = [e["activityDateTime"] for e in page["value"]]
        while page.get("@odata.nextLink"):
            page = get(sim, page["@odata.nextLink"]).json()
            times += [e["activityDateTime"] for e in page["value"]]
        assert times == sorted(times, reverse=True) and len(times) == 3
        ge = get(sim, AUDIT_URL, **{"$filter": f"activityDateTime ge {stamp(start + timedelta(minutes=1))}"})
        assert len(ge.json()["value"]) == 2  # the first page of four
        bad = get(sim, AUDIT_URL, **{"$filter": "activityType eq 'x' or 1 eq 1"})
        assert bad.status_code == 400


def test_scripted_replies_come_in_order_then_normal_answers() -> None:
    with GraphSimulator() as sim:
        sim.script(
            DEVICES, None, Reply.throttled("7"), Reply.error(503, "ServiceUnavailable"), Reply.not_json()
        )
        assert get(sim, DEVICES_URL).status_code == 200
        throttled = get(sim, DEVICES_URL)
        assert throttled.status_code == 429 and throttled.headers["Retry-After"] == "7"
        assert get(sim, DEVICES_URL).status_code == 503
        garbage = get(sim, DEVICES_URL)
        assert garbage.status_code == 200 and garbage.text.startswith("<html>")
        assert get(sim, DEVICES_URL).json()["value"]
        sim.script(AUDIT, Reply.slow(0.3))
        began = time.monotonic()
        assert get(sim, AUDIT_URL).status_code == 200
        assert time.monotonic() - began >= 0.3


def test_graph_limits_answer_429_with_retry_after() -> None:
    with GraphSimulator(rate_limits={DEVICES: ((2, 20.0),)}) as sim:
        answers = [get(sim, DEVICES_URL) for _ in range(3)]
        assert [a.status_code for a in answers] == [200, 200, 429]
        assert 1 <= int(answers[-1].headers["Retry-After"]) <= 20
        assert len(sim.throttled) == 1
        assert get(sim, AUDIT_URL).status_code == 200  # auditing has its own budget


def test_control_routes_act_without_a_token() -> None:
    ws42 = seed_named("WS-0042")
    with GraphSimulator() as sim:
        assert requests.post(f"{sim.url}/sim/devices/{ws42.id}/wipe", timeout=5).status_code == 200
        listed = requests.get(f"{sim.url}/sim/devices", timeout=5).json()["value"]
        assert {d["id"]: d["managementState"] for d in listed}[ws42.id] == "wipePending"
        assert requests.post(f"{sim.url}/sim/devices/nope/wipe", timeout=5).status_code == 404
        assert sim.events[0]["activityType"] == "wipe ManagedDevice"


# ---- the client against it --------------------------------------------------------------


def test_client_reads_with_a_graph_token_and_the_documented_query(
    client: GraphClient,
    graph: GraphSimulator,
    identity: IdentityEndpoint,
) -> None:
    answer = client.managed_devices()
    assert answer.status_code == 200, answer.text
    [call] = graph.route_calls(DEVICES)
    assert call.query == {"$select": ",".join(DEVICE_FIELDS)}
    assert call.headers["User-Agent"].startswith("defender-offboard-function/")
    assert [r for _, r, _ in identity.issued] == [GRAPH_RESOURCE]  # GRAPH_API_SCOPE, not Defender's
    since = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)
    assert client.audit_events(since).status_code == 200
    assert graph.route_calls(AUDIT)[0].query == {"$filter": "activityDateTime gt 2026-12-01T09:30:00.000000Z"}


def test_client_follows_links_only_on_its_own_host(client: GraphClient, graph: GraphSimulator) -> None:
    graph.page_size = 5
    link = client.managed_devices().json()["@odata.nextLink"]
    assert client.follow(link).status_code == 200
    for foreign in (
        "https://evil.example/v1.0/deviceManagement/managedDevices?$skiptoken=x",
        link.replace("http://", "https://"),
        link.replace(f":{graph.port}", f":{graph.port + 1}"),
        "/v1.0/deviceManagement/managedDevices",
    ):
        with pytest.raises(ForeignLink):
            client.follow(foreign)
    assert len(graph.calls) == 2


def test_client_reports_a_slow_answer_as_no_response(client: GraphClient, graph: GraphSimulator) -> None:
    graph.script(DEVICES, Reply.slow(1.5))
    with pytest.raises(NoResponse):
        client.managed_devices()


def test_graph_time_is_utc_with_z() -> None:
    moment = datetime(2026, 12, 1, 10, 30, tzinfo=UTC).astimezone()
    assert graph_time(moment) == "2026-12-01T10:30:00.000000Z"
