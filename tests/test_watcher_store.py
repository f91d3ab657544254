"""The watcher's rows (checkpoint, inventory, ledger) on both implementations of `Entities`:
conditional writes, lost races, and the checkpoint that never goes back."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from azure.data.tables import TableClient

from localdev.azurite import Azurite
from shared.adapters.entities import Entities, MemoryEntities, Query, TableEntities
from shared.domain.devices import Lookup
from shared.watcher import decide
from shared.watcher.decide import Device, InventoryChanges, Retirement, Sighting
from shared.watcher.store import INVENTORY, WATCH, WatchStore, ledger_partition

NOW = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
AAD = "6d5c4b3a-2f1e-4d0c-9b8a-7f6e5d4c3b2a"


@pytest.fixture(params=["memory", "azurite"])
def entities(request: pytest.FixtureRequest) -> Iterator[Entities]:
    if request.param == "memory":
        yield MemoryEntities()
        return
    azurite: Azurite = request.getfixturevalue("azurite")
    yield TableEntities(
        TableClient.from_connection_string(azurite.connection_string, f"w{uuid.uuid4().hex[:12]}")
    )


def ids(count: int) -> list[str]:
    return [str(uuid.UUID(int=i + 1)) for i in range(count)]


def row(intune_id: str, opened: datetime = NOW, mode: decide.Mode = "offboard") -> Retirement:
    sighting = Sighting(
        intune_id, "retire", "audit", opened - timedelta(minutes=1), "a@b.c", aad_device_id=AAD
    )
    return decide.open_retirement(sighting, opened, mode, "default")


def test_the_checkpoint_starts_empty_and_keeps_what_was_saved(entities: Entities) -> None:
    store = WatchStore(entities, "offboard")
    first = store.checkpoint()
    assert (first.at, first.not_before, first.etag) == (None, None, None)
    saved = store.save_checkpoint(
        first, NOW, NOW + timedelta(minutes=5), {"fp": NOW.isoformat()}, "line", NOW
    )
    again = store.checkpoint()
    assert (again.at, again.not_before, dict(again.noted), again.etag) == (
        NOW,
        NOW + timedelta(minutes=5),
        {"fp": NOW.isoformat()},
        saved.etag,
    )
    assert entities.get(WATCH, "checkpoint-offboard")["lastRun"] == "line"  # type: ignore[index]
    assert WatchStore(entities, "report").checkpoint().at is None  # each mode has its own


def test_a_slower_run_cannot_move_the_checkpoint_back(entities: Entities) -> None:
    store = WatchStore(entities, "offboard")
    start = store.save_checkpoint(store.checkpoint(), NOW, None, {}, "", NOW)
    fast = store.save_checkpoint(start, NOW + timedelta(minutes=10), None, {"a": NOW.isoformat()}, "", NOW)
    # The slow run read the checkpoint before the fast one wrote: its ETag is stale.
    slow = store.save_checkpoint(start, NOW + timedelta(minutes=3), None, {"b": NOW.isoformat()}, "", NOW)
    assert slow.at == fast.at == NOW + timedelta(minutes=10)
    assert set(store.checkpoint().noted) == {"a", "b"}  # both runs' recorded skips are kept
    # Two first runs, each believing there is no checkpoint yet.
    other = WatchStore(entities, "report")
    empty = other.checkpoint()
    other.save_checkpoint(empty, NOW + timedelta(minutes=1), None, {}, "", NOW)
    assert other.save_checkpoint(empty, NOW, None, {}, "", NOW).at == NOW + timedelta(minutes=1)


def test_recorded_skips_are_forgotten_after_two_days(entities: Entities) -> None:
    store = WatchStore(entities, "offboard")
    old, new = (NOW - timedelta(days=3)).isoformat(), NOW.isoformat()
    saved = store.save_checkpoint(store.checkpoint(), NOW, None, {"old": old, "new": new}, "", NOW)
    assert set(saved.noted) == {"new"}


def test_the_inventory_writes_only_changes_in_transactions(entities: Entities) -> None:
    store = WatchStore(entities, "offboard")
    devices = [Device(i, f"PC-{n}", AAD, "Windows", "managed") for n, i in enumerate(ids(150))]
    written = store.write_inventory({}, InventoryChanges(tuple(devices)), NOW)
    assert written == 150
    known = store.inventory()
    assert {k: v.device for k, v in known.items()} == {d.intune_id: d for d in devices}
    listed = {d.intune_id: d for d in devices[1:]}
    listed[devices[1].intune_id] = replace(devices[1], state="retirePending")
    changes = decide.inventory_changes(known, listed, complete=True, now=NOW)
    assert (len(changes.upserts), changes.gone) == (1, (devices[0].intune_id,))
    if isinstance(entities, MemoryEntities):
        before = entities.requests
    assert store.write_inventory(known, changes, NOW) == 2
    if isinstance(entities, MemoryEntities):
        assert entities.requests - before == 1  # both in one transaction
    after = store.inventory()
    assert after[devices[0].intune_id].gone_at == NOW
    assert after[devices[1].intune_id].device.state == "retirePending"
    later = NOW + timedelta(days=8)
    removal = decide.inventory_changes(after, listed, complete=True, now=later)
    assert removal.removed == (devices[0].intune_id,)
    assert store.write_inventory(after, removal, later) == 1
    assert devices[0].intune_id not in store.inventory()


def test_an_inventory_write_that_loses_a_race_leaves_the_other_runs_row(entities: Entities) -> None:
    store = WatchStore(entities, "offboard")
    [a, b] = [Device(i, f"PC-{n}") for n, i in enumerate(ids(2))]
    store.write_inventory({}, InventoryChanges((a, b)), NOW)
    stale = store.inventory()
    other = replace(a, name="RENAMED-BY-OTHER")
    store.write_inventory(stale, InventoryChanges((other,)), NOW)
    ours = InventoryChanges((replace(a, name="OURS"), replace(b, name="B-OURS")))
    assert store.write_inventory(stale, ours, NOW) == 1  # b written, a lost
    now = store.inventory()
    assert (now[a.intune_id].device.name, now[b.intune_id].device.name) == ("RENAMED-BY-OTHER", "B-OURS")


def test_ledger_rows_are_opened_once_and_the_second_opener_gets_the_first_ones_row(
    entities: Entities,
) -> None:
    store, rival = WatchStore(entities, "offboard"), WatchStore(entities, "offboard")
    [a, b] = ids(2)
    first, ours = rival.open([row(a)])
    assert ours == {a}
    opened, ours = store.open([row(a, NOW + timedelta(minutes=5)), row(b)])
    assert ours == {b}
    assert opened[a].key == first[a].key == decide.idempotency_key(a, "retire", NOW, "offboard")
    assert opened[b].lookup == Lookup("aadDeviceId", AAD)
    assert set(store.ledger()) == {a, b}
    assert WatchStore(entities, "report").ledger() == {}
    assert {s["PartitionKey"] for s in entities.query(Query(partition=ledger_partition("offboard")))} == {
        "intune-retirement-offboard"
    }


def test_ledger_updates_are_conditional_and_a_lost_one_returns_the_stored_row(entities: Entities) -> None:
    store = WatchStore(entities, "offboard")
    [a] = ids(1)
    opened, _ = store.open([row(a)])
    mine = opened[a]
    theirs = store.update([(mine, replace(mine, request_id="r-theirs", outcome="Queued", settled=True))])[a]
    kept = store.update([(mine, replace(mine, attempts=1, outcome="IdempotentRequestInProgress"))])[a]
    assert (kept.request_id, kept.settled, kept.etag) == ("r-theirs", True, theirs.etag)
    assert store.prune([mine]) == 0  # a stale ETag deletes nothing
    assert store.prune([kept]) == 1 and store.ledger() == {}


def test_the_partitions_are_the_documented_ones(entities: Entities) -> None:
    store = WatchStore(entities, "report")
    store.save_checkpoint(store.checkpoint(), NOW, None, {}, "", NOW)
    store.write_inventory({}, InventoryChanges((Device(ids(1)[0]),)), NOW)
    store.open([row(ids(1)[0], mode="report")])
    partitions = {
        p: [s["RowKey"] for s in entities.query(Query(partition=p))]
        for p in (WATCH, INVENTORY, "intune-retirement-report")
    }
    assert partitions == {WATCH: ["checkpoint-report"], INVENTORY: ids(1), "intune-retirement-report": ids(1)}
