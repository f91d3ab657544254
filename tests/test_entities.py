"""One contract, two implementations: Azure Tables (on Azurite) and the in-memory twin must
answer every call the same way, ETags, 412s and 409s included."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from azure.data.tables import TableClient

from localdev.azurite import Azurite
from shared.adapters.entities import (
    Entities,
    EntityChanged,
    EntityConflict,
    MemoryEntities,
    Query,
    TableEntities,
    Write,
)


@pytest.fixture(params=["memory", "azurite"])
def entities(request: pytest.FixtureRequest) -> Iterator[Entities]:
    if request.param == "memory":
        yield MemoryEntities()
        return
    azurite: Azurite = request.getfixturevalue("azurite")
    name = f"e{uuid.uuid4().hex[:12]}"
    yield TableEntities(TableClient.from_connection_string(azurite.connection_string, name))


def row(pk: str = "p", rk: str = "r", **values: object) -> dict[str, object]:
    return {"PartitionKey": pk, "RowKey": rk, **values}


def test_a_missing_table_reads_as_empty_and_is_created_on_first_write(entities: Entities) -> None:
    assert entities.get("p", "r") is None
    assert list(entities.query(Query(partition="p"))) == []
    etag = entities.insert(row(n=1))
    stored = entities.get("p", "r")
    assert stored is not None and stored["n"] == 1 and stored.etag == etag


def test_insert_refuses_a_second_insert(entities: Entities) -> None:
    entities.insert(row())
    with pytest.raises(EntityConflict):
        entities.insert(row(n=2))


def test_replace_needs_the_current_etag(entities: Entities) -> None:
    first = entities.insert(row(n=1))
    second = entities.replace(row(n=2), first)
    assert second != first
    with pytest.raises(EntityChanged):
        entities.replace(row(n=3), first)
    with pytest.raises(EntityChanged):
        entities.replace(row(rk="absent", n=3), first)
    stored = entities.get("p", "r")
    assert stored is not None and stored["n"] == 2


def test_replace_removes_properties_left_out(entities: Entities) -> None:
    etag = entities.insert(row(a=1, b=2))
    entities.replace(row(a=1), etag)
    stored = entities.get("p", "r")
    assert stored is not None and "b" not in stored.entity


def test_upsert_and_delete(entities: Entities) -> None:
    entities.upsert(row(n=1))
    etag = entities.upsert(row(n=2))
    with pytest.raises(EntityChanged):
        entities.delete("p", "r", etag='W/"stale"')
    entities.delete("p", "r", etag)
    entities.delete("p", "r")  # already gone: fine
    assert entities.get("p", "r") is None


def test_a_transaction_is_all_or_nothing(entities: Entities) -> None:
    etag = entities.insert(row(rk="a", n=1))
    with pytest.raises(EntityConflict):
        entities.transact([Write.insert(row(rk="b")), Write.insert(row(rk="a"))])
    with pytest.raises(EntityChanged):
        entities.transact([Write.insert(row(rk="b")), Write.replace(row(rk="a", n=2), 'W/"stale"')])
    assert entities.get("p", "b") is None
    etags = entities.transact([Write.insert(row(rk="b")), Write.replace(row(rk="a", n=2), etag)])
    stored = entities.get("p", "a")
    assert len(etags) == 2 and stored is not None and stored["n"] == 2 and stored.etag == etags[1]


def test_queries_come_in_key_order_with_ranges_and_equality(entities: Entities) -> None:
    for pk in ("b-2", "b-1", "c", "a"):
        for rk in ("y", "x"):
            entities.insert(row(pk, rk, kind="request" if rk == "x" else "audit", n=len(pk)))
    found = [(s["PartitionKey"], s["RowKey"]) for s in entities.query(Query(partitions=("b-", "b-~")))]
    assert found == [("b-1", "x"), ("b-1", "y"), ("b-2", "x"), ("b-2", "y")]
    requests = entities.query(Query(partitions=("b-", "b-~"), where={"kind": "request"}, select=("n",)))
    assert [(s["PartitionKey"], s.entity.get("kind"), s["n"]) for s in requests] == [
        ("b-1", None, 3),
        ("b-2", None, 3),
    ]
    assert [s["RowKey"] for s in entities.query(Query(partition="c", rows=("y", "y~")))] == ["y"]


def test_pages_continue_where_they_stopped(entities: Entities) -> None:
    entities.transact([Write.insert(row(rk=f"r{i:02}")) for i in range(7)])
    seen: list[str] = []
    continuation = None
    while True:
        page = entities.page(Query(partition="p"), 3, continuation)
        seen += [s["RowKey"] for s in page.entities]
        continuation = page.continuation
        if continuation is None:
            break
    assert seen == [f"r{i:02}" for i in range(7)]


def test_a_merge_changes_only_what_it_names_and_needs_the_etag(entities: Entities) -> None:
    etag = entities.insert(row(a=1, b=2))
    [merged] = entities.transact([Write.merge(row(b=3, c=4), etag)])
    stored = entities.get("p", "r")
    assert stored is not None and stored.etag == merged
    assert {k: stored[k] for k in ("a", "b", "c")} == {"a": 1, "b": 3, "c": 4}
    with pytest.raises(EntityChanged):
        entities.transact([Write.merge(row(b=5), etag)])
