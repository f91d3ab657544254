"""The Intune watcher end to end: real Azurite, the real credential against the loopback
identity endpoint, the Graph simulator and the Defender simulator; in this process with
services built as the app builds them, and through the local Functions host, whose timer
runs `intune_retirements` on its schedule."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
from azure.storage.queue import QueueClient, TextBase64DecodePolicy

from localdev.defender_sim import DefenderSimulator
from localdev.fleet import FLEET
from localdev.graph_sim import GraphSimulator, seed_named
from localdev.host import LOCAL_MASTER_KEY
from localdev.identity import IdentityEndpoint
from shared.domain.statuses import Status
from shared.runtime import Services
from shared.watcher import build
from shared.watcher.run import Watcher
from tests.conftest import Queues, RunningHost
from tests.watcher_support import fast, graph_for, watch_env

WS42, DESKTOP, MAC14 = seed_named("WS-0042"), seed_named("DESKTOP-7F3K2"), seed_named("mac-design-07")
KIOSK, LINUX = seed_named("Lobby kiosk #3"), seed_named("lnx-build-11.corp.contoso.com")
PERIOD = 4  # seconds between the local host's timer runs in these tests


def machine(dns_name: str) -> str:
    [found] = [m.id for m in FLEET if m.computer_dns_name == dns_name]
    return found


TARGETS = {
    machine("ws-0042.contoso.com"),
    machine("desktop-7f3k2.contoso.com"),
    machine("mac-design-07.contoso.com"),
}


@pytest.fixture
def graph(identity: IdentityEndpoint) -> Iterator[GraphSimulator]:
    with graph_for(identity) as sim:
        yield sim


def offboards(defender: DefenderSimulator) -> list[Any]:
    return [c for c in defender.calls if c.method == "POST" and c.path.endswith("/offboard")]


def deliver(services: Services, queues: Queues, rounds: int = 3) -> int:
    """What the host's queue listener does, in this process: receive, handle, delete."""
    client = QueueClient.from_connection_string(
        queues.connection_string, queues.name, message_decode_policy=TextBase64DecodePolicy()
    )
    worker, handled = services.worker(), 0
    for _ in range(rounds):
        try:
            messages = list(client.receive_messages(max_messages=32, visibility_timeout=30))
        except Exception:  # the queue does not exist yet
            return handled
        for message in messages:
            worker.handle(message.content.encode(), message.id, message.dequeue_count or 1)
            client.delete_message(message)
            handled += 1
    return handled


# ---- in this process, on Azurite ----------------------------------------------------------


@pytest.fixture
def on_azurite(
    make_services: Callable[..., Services], graph: GraphSimulator
) -> Callable[..., tuple[Services, Watcher]]:
    """Services on the test's Azurite tables and queue, built as the app builds them, and a
    watcher on them (a new pair is another instance on the same storage)."""

    def make(mode: str = "offboard", **overrides: str) -> tuple[Services, Watcher]:
        services = make_services(**watch_env(graph, mode, **overrides))
        return services, fast(build(services))

    return make


def test_on_azurite_retire_wipe_and_delete_offboard_exactly_those_devices(
    on_azurite: Callable[..., tuple[Services, Watcher]],
    graph: GraphSimulator,
    defender: DefenderSimulator,
    queues: Queues,
) -> None:
    services, watcher = on_azurite("offboard")
    watcher.run()  # the inventory
    graph.retire(WS42.id)
    graph.wipe(DESKTOP.id)
    graph.delete(MAC14.id)
    graph.wipe(KIOSK.id)  # no usable identifier: recorded, skipped
    report = watcher.run()
    assert (report.outcomes["Queued"], report.skipped["NoDeviceIdentifier"]) == (3, 1)
    assert deliver(services, queues) >= 3
    assert {c.path.split("/")[3] for c in offboards(defender)} == TARGETS
    assert len(offboards(defender)) == 3
    _, again = on_azurite("offboard")  # another instance, same storage
    assert again.run().submitted == 0
    deliver(services, queues)
    assert len(offboards(defender)) == 3
    rows = watcher.store.ledger()
    assert {r.outcome for r in rows.values()} == {"Queued", "NoDeviceIdentifier"}
    assert all(r.settled for r in rows.values())


def test_on_azurite_report_mode_and_a_crash_before_the_checkpoint(
    on_azurite: Callable[..., tuple[Services, Watcher]],
    graph: GraphSimulator,
    defender: DefenderSimulator,
    queues: Queues,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, watcher = on_azurite("report")
    graph.retire(WS42.id)
    graph.retire(LINUX.id)

    def crash(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the process died")

    monkeypatch.setattr(watcher.store, "save_checkpoint", crash)
    with pytest.raises(RuntimeError):
        watcher.run()
    services, restarted = on_azurite("report")
    assert restarted.run().submitted == 0  # the ledger knew both
    deliver(services, queues)
    ledger = restarted.store.ledger().values()
    records = [services.store.get(r.request_id) for r in ledger if r.request_id]
    assert len(records) == 2
    assert all(r is not None and r.status == Status.DRY_RUN and r.dry_run for r in records)
    assert offboards(defender) == []


# ---- through the local Functions host, on its timer ----------------------------------------


def invoke(host: RunningHost, name: str = "intune_retirements") -> requests.Response:
    return requests.post(
        f"{host.url}/admin/functions/{name}",
        json={"input": ""},
        headers={"x-functions-key": LOCAL_MASTER_KEY},
        timeout=30,
    )


def wait_for(check: Callable[[], bool], timeout: float) -> float:
    began = time.monotonic()
    while not check():
        if time.monotonic() - began > timeout:
            raise TimeoutError("not reached")
        time.sleep(0.1)
    return time.monotonic() - began


def test_through_the_local_host_the_timer_offboards_each_retired_device_once_within_a_period(
    local_host: Callable[..., RunningHost], graph: GraphSimulator, defender: DefenderSimulator
) -> None:
    host = local_host(
        timers=True,
        **watch_env(graph, "offboard", INTUNE_WATCH_SCHEDULE=f"*/{PERIOD} * * * * *"),
    )
    # The first run learns the fleet (the inventory), so the delete can be resolved.
    wait_for(lambda: len(graph.route_calls("managedDevices")) >= 1, timeout=PERIOD + 5)
    time.sleep(0.5)
    acted = time.time()
    graph.retire(WS42.id)
    graph.wipe(DESKTOP.id)
    graph.delete(MAC14.id)
    wait_for(lambda: len(offboards(defender)) >= 3, timeout=2 * PERIOD + 10)
    latest = max(c.at for c in offboards(defender)) - acted
    print(f"offboarded {latest:.2f}s after the actions (schedule every {PERIOD}s)")
    assert latest <= PERIOD + 3, f"offboarded {latest:.1f}s after the actions"
    assert {c.path.split("/")[3] for c in offboards(defender)} == TARGETS
    runs = len(graph.route_calls("managedDevices"))
    # One more tick on the schedule, then once more on demand, through the admin API.
    wait_for(lambda: len(graph.route_calls("managedDevices")) >= runs + 1, timeout=2 * PERIOD)
    answer = invoke(host)
    assert answer.status_code == 202 and answer.headers["X-Local-Function-Outcome"] == "Succeeded"
    time.sleep(1)
    assert len(offboards(defender)) == 3  # exactly those devices, once each
    assert "Intune watcher (offboard):" in host.log()


def test_through_the_local_host_a_disabled_watcher_reads_nothing(
    local_host: Callable[..., RunningHost], graph: GraphSimulator
) -> None:
    host = local_host(**watch_env(graph, "offboard", INTUNE_WATCH_ENABLED="false"))
    answer = invoke(host)
    assert answer.status_code == 202 and answer.headers["X-Local-Function-Outcome"] == "Succeeded"
    assert graph.calls == []
