"""The Intune watcher's runs on in-memory storage (the same contracts as Azurite's), with
the real credential, the Graph simulator and the Defender simulator over loopback: what it
offboards, and what it does with paging, throttling, failures, bad input, crashes,
overlapping runs, report mode and the breaker."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from localdev.defender_sim import DefenderSimulator
from localdev.fleet import FLEET
from localdev.graph_sim import AUDIT, DEVICES, GraphSimulator, Reply, audit_event, seed_named
from localdev.identity import IdentityEndpoint
from shared.adapters.entities import Query
from shared.domain.offboard import Caller
from shared.domain.statuses import Status
from shared.watcher import decide
from shared.watcher.run import Watcher
from tests.conftest import Memory
from tests.watcher_support import Watch, graph_for, watch_maker

WS42, DESKTOP, MAC14 = seed_named("WS-0042"), seed_named("DESKTOP-7F3K2"), seed_named("mac-design-07")
MAC13, LINUX = seed_named("mac-finance-02"), seed_named("lnx-build-11.corp.contoso.com")
UNKNOWN, KIOSK = seed_named("WS-0999"), seed_named("Lobby kiosk #3")


@pytest.fixture
def graph(identity: IdentityEndpoint) -> Iterator[GraphSimulator]:
    with graph_for(identity) as sim:
        yield sim


@pytest.fixture
def watch(
    memory: Callable[..., Memory], graph: GraphSimulator, defender: DefenderSimulator
) -> Callable[..., Watch]:
    return watch_maker(memory, graph, defender)


def machine(dns_name: str) -> str:
    [found] = [m.id for m in FLEET if m.computer_dns_name == dns_name]
    return found


M_WS42, M_DESKTOP = machine("ws-0042.contoso.com"), machine("desktop-7f3k2.contoso.com")
M_MAC14, M_LINUX = machine("mac-design-07.contoso.com"), machine("lnx-build-11.corp.contoso.com")


def rejected(w: Watch) -> list[dict[str, Any]]:
    rows = w.services.audit.query(Query(partitions=("rejected-", "rejected-~")))
    return [r.entity for r in rows]


def watcher_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("Intune watcher (")]


# ---- what it offboards -----------------------------------------------------------------


def test_retired_wiped_and_deleted_devices_are_offboarded_exactly_once_each(
    watch: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    w: Watch = watch("offboard")
    assert w.run().found == 0  # the first run learns the fleet (the inventory)
    w.graph.retire(WS42.id, actor="alice@contoso.com")
    w.graph.wipe(DESKTOP.id)
    w.graph.delete(MAC14.id)  # its record is gone at once; its event names it only by Intune id
    report = w.run()
    assert (report.found, report.opened, report.outcomes["Queued"]) == (3, 3, 3)
    [batch_id] = report.batches  # named in the log line: operators follow it on the batch route
    batch = w.services.listing().batch(batch_id, Caller("operator"))
    assert (batch["format"], batch["caller"], batch["total"]) == ("intune-watcher", "intune-watcher", 3)
    assert f"(batch {batch_id})" in report.line()
    w.deliver()
    assert sorted(w.offboarded()) == sorted([M_WS42, M_DESKTOP, M_MAC14])
    records = {r.comment.split(" (managed")[0]: r for r in w.records()}
    assert set(records) == {
        "Intune retire of WS-0042",
        "Intune wipe of DESKTOP-7F3K2",
        "Intune delete of mac-design-07",
    }
    retire = records["Intune retire of WS-0042"]
    assert retire.caller == "intune-watcher" and "by alice@contoso.com at " in retire.comment
    assert retire.status == Status.SUBMITTED
    # The delete was resolved through the inventory's Entra device id, not the short name.
    assert '"aadDeviceId"' in (records["Intune delete of mac-design-07"].lookup or "")
    for _ in range(3):  # retired and wiped devices stay listed until they check in
        assert w.run().submitted == 0
    w.deliver()
    assert len(w.offboarded()) == 3 and len(w.records()) == 3
    # One INFO line per run that saw something new; the quiet ones are DEBUG.
    lines = watcher_lines(caplog)
    assert len(lines) == 2 and "3 leaving (3 new)" in lines[1]


def test_a_device_with_no_entra_id_is_resolved_by_its_exact_dns_name(watch: Any) -> None:
    w: Watch = watch("offboard")
    w.graph.retire(LINUX.id)
    w.run()
    w.deliver()
    assert w.offboarded() == [M_LINUX]
    assert '"deviceName", "value": "lnx-build-11.corp.contoso.com"' in (w.records()[0].lookup or "")


def test_a_device_defender_does_not_know_fails_alone_with_its_reason(watch: Any) -> None:
    w: Watch = watch("offboard")
    w.graph.retire(UNKNOWN.id)
    w.graph.retire(WS42.id)
    assert w.run().outcomes["Queued"] == 2
    w.deliver()
    by_comment = {r.comment.split(" (")[0]: r for r in w.records()}
    assert by_comment["Intune retire of WS-0999"].status == Status.FAILED
    assert by_comment["Intune retire of WS-0999"].last_error_code == "DeviceNotFound"
    assert by_comment["Intune retire of WS-0042"].status == Status.SUBMITTED
    assert w.run().submitted == 0  # not retried: the request is final, its row settled


def test_a_device_with_no_usable_identifier_is_recorded_once_and_skipped(
    watch: Any, caplog: pytest.LogCaptureFixture
) -> None:
    w: Watch = watch("offboard")
    w.graph.wipe(KIOSK.id)
    w.graph.wipe(WS42.id)
    report = w.run()
    assert report.skipped == {"NoDeviceIdentifier": 1} and report.outcomes["Queued"] == 1
    [row] = rejected(w)
    assert (row["caller"], row["outcome"]) == ("intune-watcher", "NoDeviceIdentifier")
    assert KIOSK.id in row["detail"] and "'Lobby kiosk #3' is not a DNS name" in row["detail"]
    assert any("skipped" in m and "NoDeviceIdentifier" in m for m in caplog.messages)
    assert w.ledger()[KIOSK.id].settled
    again = w.run()
    assert (again.submitted, sum(again.skipped.values()), len(rejected(w))) == (0, 0, 1)
    # ... and it does not hold the checkpoint back.
    assert again.checkpoint_to is not None and again.checkpoint_to >= report.started - decide.LOOKBACK


def test_retire_then_delete_of_one_device_is_one_request(watch: Any) -> None:
    w: Watch = watch("offboard")
    w.graph.retire(WS42.id)
    w.run()
    w.graph.delete(WS42.id)
    assert w.run().submitted == 0
    assert len(w.records()) == 1
    assert w.ledger()[WS42.id].actions == ("retire", "delete")


def test_seen_in_the_listing_before_its_audit_event_is_one_request(watch: Any) -> None:
    w: Watch = watch("offboard")
    w.graph.retire(WS42.id, log_event=False)  # the audit event shows up later
    first = w.run()
    assert first.outcomes["Queued"] == 1
    assert "managementState retirePending" in w.records()[0].comment
    w.graph.add_event(audit_event("retire", w.graph.devices[WS42.id]))
    assert w.run().submitted == 0 and len(w.records()) == 1


def test_a_second_real_retirement_months_later_offboards_again(watch: Any) -> None:
    w: Watch = watch("report")
    start = datetime.now(UTC)
    clock = [start]
    w.watcher.clock = lambda: clock[0]
    w.graph.retire(WS42.id, at=start)
    w.run()
    w.deliver()
    [first] = w.records()
    assert first.status == Status.DRY_RUN
    w.graph.check_in(WS42.id)  # retired: its record goes
    clock[0] = start + timedelta(days=3)
    assert w.run().pruned == 1  # nothing can show that retirement again
    later = start + timedelta(days=90)
    clock[0] = later
    w.graph.add_device(WS42.id, WS42.device_name, WS42.azure_ad_device_id)  # enrolled again, same id
    w.graph.retire(WS42.id, at=later)
    assert w.run().outcomes["Queued"] == 1
    w.deliver()
    assert len(w.records()) == 2 and all(r.status == Status.DRY_RUN for r in w.records())


# ---- report mode, the breaker ------------------------------------------------------------


def test_report_mode_makes_every_retirement_a_dry_run_and_offboards_nothing(watch: Any) -> None:
    w: Watch = watch("report")
    w.run()
    w.graph.retire(WS42.id)
    w.graph.wipe(DESKTOP.id)
    w.graph.delete(MAC14.id)
    assert w.run().outcomes["Queued"] == 3
    w.deliver()
    records = w.records()
    assert len(records) == 3 and all(r.dry_run and r.status == Status.DRY_RUN for r in records)
    assert all(r.would_send for r in records)
    assert w.offboarded() == []
    assert [k.key.endswith(":report") for k in w.ledger().values()] == [True] * 3
    # Switched to offboard: what is still leaving (and the delete, within the look-back) is
    # offboarded for real, once.
    offboard = Watch(w.memory, w.graph, w.defender, w.another())
    offboard.watcher.mode = "offboard"
    offboard.watcher.store = type(w.watcher.store)(w.services.state, "offboard")
    assert offboard.run().outcomes["Queued"] == 3
    w.deliver()
    assert sorted(w.offboarded()) == sorted([M_WS42, M_DESKTOP, M_MAC14])


def test_the_breaker_holds_a_mass_wipe(watch: Any, caplog: pytest.LogCaptureFixture) -> None:
    w: Watch = watch("offboard", OFFBOARD_BREAKER_LIMIT="3")
    fleet = []
    for n in range(12):
        aad, machine_id = str(uuid.uuid4()), uuid.uuid4().hex + uuid.uuid4().hex[:8]
        w.defender.add_machine(machine_id, f"pc-{n:02}.contoso.com", aad)
        fleet.append((w.graph.add_device(str(uuid.uuid4()), f"PC-{n:02}", aad)["id"], machine_id))
    w.run()
    for intune_id, _ in fleet:
        w.graph.wipe(intune_id)
    report = w.run()
    assert (report.outcomes["Queued"], report.outcomes["Held"]) == (3, 9)
    assert any("Blast-radius breaker tripped" in m for m in caplog.messages)
    w.deliver()
    assert len(w.offboarded()) == 3
    held = [r for r in w.records() if r.status == Status.HELD]
    assert len(held) == 9 and all(r.held_code == "BreakerTripped" for r in held)
    assert w.run().submitted == 0  # held is an answer: not submitted again
    assert len(w.records()) == 12


# ---- paging, throttling, failures ---------------------------------------------------------


def test_every_page_is_read(watch: Any) -> None:
    w: Watch = watch("offboard")
    w.graph.page_size, w.graph.audit_page_size = 2, 2
    for seed in (WS42, DESKTOP, MAC14, LINUX):
        w.graph.retire(seed.id)
    report = w.run()
    assert (report.devices, report.events, report.found) == (8, 4, 4)
    assert report.calls == 4 + 2
    followed = [c for c in w.graph.calls if "$skiptoken" in c.query]
    assert len(followed) == 3 + 1
    assert report.outcomes["Queued"] == 4


def test_a_429_waits_its_retry_after_and_the_run_goes_on(watch: Any) -> None:
    w: Watch = watch("offboard")
    w.graph.page_size = 4
    w.graph.retire(LINUX.id)  # on the second page
    w.graph.script(DEVICES, None, Reply.throttled("1"))
    began = time.monotonic()
    report = w.run()
    assert time.monotonic() - began >= 1.0
    assert (report.throttled, report.retried, report.stops) == (1, 1, [])
    assert report.outcomes["Queued"] == 1 and report.devices == 8


def test_a_429_without_retry_after_backs_off_exponentially(watch: Any) -> None:
    w: Watch = watch("offboard")
    w.graph.script(AUDIT, Reply.throttled(None), Reply.throttled(None))
    w.graph.retire(WS42.id)
    report = w.run()
    assert (report.throttled, report.stops, report.outcomes["Queued"]) == (2, [], 1)


def test_graph_throttling_for_real_is_waited_out(watch: Any) -> None:
    w: Watch = watch("offboard")
    w.graph.page_size = 1
    w.graph._budgets[DEVICES] = type(w.graph._budgets[DEVICES])(((4, 1.0),))  # 4 a second
    report = w.run()
    assert report.devices == 8 and report.throttled >= 1 and report.stops == []


def test_a_long_retry_after_ends_the_read_and_every_run_waits_for_it(watch: Any) -> None:
    w: Watch = watch("offboard")
    start = datetime.now(UTC)
    clock = [start]
    w.watcher.clock = lambda: clock[0]
    w.graph.retire(WS42.id, log_event=False)
    w.graph.delete(MAC14.id)
    w.graph.script(AUDIT, Reply.throttled("600"))
    first = w.run()
    assert first.outcomes["Queued"] == 1  # the listing's retirement does not wait
    assert first.checkpoint_to is None and first.waiting_until is not None
    assert "incomplete: audit events: TooManyRequests" in first.line()
    calls = len(w.graph.calls)
    clock[0] = start + timedelta(seconds=300)
    waiting = w.another()
    waiting.clock = lambda: clock[0]
    assert waiting.run().calls == 0 and len(w.graph.calls) == calls  # another instance waits too
    clock[0] = start + timedelta(seconds=601)
    resumed = w.run()
    assert resumed.events == 1 and resumed.found == 2 and resumed.opened == 1  # the delete


@pytest.mark.parametrize(
    "failure",
    [Reply.error(503, "ServiceUnavailable"), Reply.error(500, "InternalServerError"), Reply.slow(1.5)],
    ids=["503", "500", "timeout"],
)
def test_server_errors_and_timeouts_are_retried(watch: Any, failure: Reply) -> None:
    w: Watch = watch("offboard")
    w.graph.script(DEVICES, failure)
    w.graph.script(AUDIT, failure)
    w.graph.wipe(DESKTOP.id)
    report = w.run()
    assert (report.retried, report.stops, report.outcomes["Queued"]) == (2, [], 1)


def test_a_graph_outage_mid_run_resumes_next_run_and_duplicates_nothing(watch: Any) -> None:
    w: Watch = watch("offboard")
    w.run()
    w.graph.page_size = 3
    w.graph.retire(WS42.id)
    w.graph.delete(MAC14.id)
    w.graph.script(DEVICES, None, *[Reply.error(503, "ServiceUnavailable")] * 5)
    w.graph.script(AUDIT, *[Reply.error(502, "BadGateway")] * 5)
    failed = w.run()
    assert len(failed.stops) == 2
    assert failed.outcomes["Queued"] == 1  # the retirement on the page read is not held back
    assert failed.checkpoint_to == failed.checkpoint_from  # held
    # The devices of the page read are not marked gone: the listing was incomplete.
    assert all(k.gone_at is None for k in w.watcher.store.inventory().values())
    resumed = w.run()
    assert (resumed.stops, resumed.outcomes["Queued"]) == ([], 1)  # the delete
    assert w.run().submitted == 0 and len(w.records()) == 2


def test_a_missing_permission_is_named_and_the_other_read_goes_on(
    watch: Any, caplog: pytest.LogCaptureFixture
) -> None:
    w: Watch = watch("offboard")
    w.graph.script(AUDIT, Reply.error(403, "Forbidden", "Application is not authorized"))
    w.graph.retire(WS42.id)
    report = w.run()
    assert report.outcomes["Queued"] == 1 and report.checkpoint_to is None
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("DeviceManagementApps.Read.All" in m for m in errors)


# ---- bad input ---------------------------------------------------------------------------


def test_a_page_that_is_not_json_is_recorded_and_the_rest_of_the_run_goes_on(watch: Any) -> None:
    w: Watch = watch("offboard")
    w.graph.retire(WS42.id)
    w.graph.script(AUDIT, *[Reply.not_json()] * 5)
    report = w.run()
    assert report.outcomes["Queued"] == 1 and report.checkpoint_to is None
    assert [r["outcome"] for r in rejected(w)] == ["InvalidGraphPage"]
    w.graph.script(AUDIT, *[Reply.not_json()] * 5)
    w.run()
    assert len(rejected(w)) == 1  # recorded once a day, logged every run
    w.graph.delete(MAC14.id)
    assert w.run().opened == 1  # Graph is back: the audit events are read


def test_items_that_cannot_be_used_are_recorded_once_and_skipped(watch: Any) -> None:
    w: Watch = watch("offboard")
    w.graph.devices["not-a-guid"] = {"id": "not-a-guid", "deviceName": "x", "managementState": "wipePending"}
    w.graph.add_event("not an event")
    w.graph.add_event({"id": "e-1", "activityType": "wipe ManagedDevice", "activityDateTime": "soon"})
    w.graph.retire(WS42.id)
    report = w.run()
    assert report.outcomes["Queued"] == 1
    assert sorted(r["outcome"] for r in rejected(w)) == [
        "InvalidAuditEvent",
        "InvalidAuditEvent",
        "InvalidManagedDevice",
    ]
    w.run()
    assert len(rejected(w)) == 3


# ---- crashes and overlapping runs ---------------------------------------------------------


class Crash(Exception):
    pass


@pytest.mark.parametrize("where", ["after accepting", "before the checkpoint"])
def test_a_crash_between_accept_and_checkpoint_duplicates_nothing(
    watch: Any, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    w: Watch = watch("offboard")
    w.run()
    w.graph.retire(WS42.id)
    w.graph.wipe(DESKTOP.id)
    w.graph.delete(MAC14.id)
    store = w.watcher.store

    def crash(*args: Any, **kwargs: Any) -> Any:
        raise Crash(where)

    monkeypatch.setattr(store, "update" if where == "after accepting" else "save_checkpoint", crash)
    with pytest.raises(Crash):
        w.run()
    assert len(w.records()) == 3
    restarted = w.another()  # a new process (its own store object, unpatched): nothing in memory
    report = restarted.run()
    expected = {"Replayed": 3} if where == "after accepting" else {}
    assert dict(report.outcomes) == expected
    assert len(w.records()) == 3 and all(r.settled for r in w.ledger().values())
    w.deliver()
    assert sorted(w.offboarded()) == sorted([M_WS42, M_DESKTOP, M_MAC14])


def test_storage_failing_while_accepting_holds_the_checkpoint_and_loses_nothing(watch: Any) -> None:
    w: Watch = watch("offboard")
    w.run()
    deleted = decide.parse_time(w.graph.delete(MAC14.id)["activityDateTime"])
    w.memory.work.fail_next = 10  # the queue refuses every message of this run
    report = w.run()
    assert report.deferred == 1 and "submitting: storage unavailable" in report.stops
    assert report.checkpoint_to is not None and deleted is not None
    assert report.checkpoint_to < deleted  # held just before the delete
    assert not w.ledger()[MAC14.id].settled
    w.memory.work.fail_next = 0
    assert w.run().outcomes["Queued"] == 1
    w.deliver()
    assert w.offboarded() == [M_MAC14]


def test_two_overlapping_runs_make_one_request_per_retirement(watch: Any) -> None:
    w: Watch = watch("offboard")
    w.run()
    for seed in (WS42, DESKTOP, MAC14, LINUX, MAC13):
        w.graph.retire(seed.id)
    # Every Graph answer a little late, so both runs read at the same time, then submit.
    w.graph.script(DEVICES, *[Reply.slow(0.3)] * 2)
    w.graph.script(AUDIT, *[Reply.slow(0.3)] * 2)
    runners = [w.watcher, w.another()]
    reports: list[Any] = []
    errors: list[BaseException] = []

    def run(watcher: Watcher) -> None:
        try:
            reports.append(watcher.run())
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(r,)) for r in runners]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == [] and len(reports) == 2
    a, b = sorted(reports, key=lambda r: r.started)
    assert b.started < a.started + timedelta(seconds=a.seconds)  # they did overlap
    assert sum(r.opened for r in reports) == 5  # each row opened by one run
    records = w.records()
    assert len(records) == 5 and len({r.comment for r in records}) == 5
    # Whichever run was slower, the checkpoint is the later of the two.
    saved = w.watcher.store.checkpoint().at
    assert saved == max(r.checkpoint_to for r in reports if r.checkpoint_to)
    w.run()  # a later run settles whatever one of them left to it
    assert all(row.settled for row in w.ledger().values())
    assert len(w.records()) == 5
    w.deliver()
    assert len(w.offboarded()) == 4  # the macOS 13 device is refused by the precheck, not offboarded
