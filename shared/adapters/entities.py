"""Table storage, reduced to what this app asks of it, with an in-memory twin.

Every store in the app (request rows, guards, the breaker, budgets, the audit trail) speaks
to `Entities`, never to the SDK: `TableEntities` is the only code that speaks Azure Tables
(Azurite locally), and `MemoryEntities` honours the same contract (ETags, 412 on a stale
write, 409 on a duplicate insert, all-or-nothing transactions in one partition, ordered
queries) so that unit tests run in milliseconds. tests/test_entities.py runs one contract
test suite against both, which is what keeps them the same.

Tables are created on first write: a missing table costs one extra round trip once per
process, instead of a create call before every first use.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from azure.data.tables import TableClient

Entity = dict[str, Any]
_KEYS = ("PartitionKey", "RowKey")


class EntityConflict(Exception):
    """An insert found the entity already there (HTTP 409)."""


class EntityChanged(Exception):
    """A conditional write found another ETag, or no entity at all (HTTP 412 / 404)."""


@dataclass(frozen=True)
class Stored:
    """An entity as read, with the ETag a conditional write must name."""

    entity: Entity
    etag: str

    def __getitem__(self, name: str) -> Any:
        return self.entity[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.entity.get(name, default)


@dataclass(frozen=True)
class Write:
    """One operation of a transaction: insert (fails if present), replace or merge (need
    `etag`; a merge changes only the properties it names), upsert (insert or replace, no
    condition)."""

    kind: Literal["insert", "replace", "merge", "upsert"]
    entity: Entity
    etag: str | None = None

    @classmethod
    def insert(cls, entity: Entity) -> Write:
        return cls("insert", entity)

    @classmethod
    def replace(cls, entity: Entity, etag: str) -> Write:
        return cls("replace", entity, etag)

    @classmethod
    def merge(cls, entity: Entity, etag: str) -> Write:
        return cls("merge", entity, etag)

    @classmethod
    def upsert(cls, entity: Entity) -> Write:
        return cls("upsert", entity)


@dataclass(frozen=True)
class Query:
    """Which entities to read: one partition or a range of them, optionally a RowKey range,
    and equality on other properties. Results come in (PartitionKey, RowKey) order."""

    partition: str | None = None
    partitions: tuple[str, str] | None = None  # inclusive range of PartitionKeys
    rows: tuple[str, str] | None = None  # inclusive range of RowKeys
    where: Mapping[str, str | int | bool] = field(default_factory=dict)
    select: tuple[str, ...] | None = None

    def matches(self, entity: Mapping[str, Any]) -> bool:
        pk, rk = entity["PartitionKey"], entity["RowKey"]
        if self.partition is not None and pk != self.partition:
            return False
        if self.partitions is not None and not self.partitions[0] <= pk <= self.partitions[1]:
            return False
        if self.rows is not None and not self.rows[0] <= rk <= self.rows[1]:
            return False
        return all(entity.get(name) == value for name, value in self.where.items())

    def odata(self) -> tuple[str, dict[str, Any]]:
        """The same query as an OData filter with parameters (never values pasted in)."""
        clauses: list[str] = []
        parameters: dict[str, Any] = {}

        def compare(name: str, op: str, value: Any) -> None:
            key = f"p{len(parameters)}"
            parameters[key] = value
            clauses.append(f"{name} {op} @{key}")

        if self.partition is not None:
            compare("PartitionKey", "eq", self.partition)
        if self.partitions is not None:
            compare("PartitionKey", "ge", self.partitions[0])
            compare("PartitionKey", "le", self.partitions[1])
        if self.rows is not None:
            compare("RowKey", "ge", self.rows[0])
            compare("RowKey", "le", self.rows[1])
        for name, value in self.where.items():
            compare(name, "eq", value)
        return " and ".join(clauses) or "PartitionKey ne ''", parameters


@dataclass(frozen=True)
class Page:
    entities: list[Stored]
    continuation: str | None  # opaque: pass it back to read the next page


class Entities(Protocol):
    """The narrow contract every store relies on."""

    def get(self, partition: str, row: str) -> Stored | None: ...

    def insert(self, entity: Entity) -> str: ...

    def replace(self, entity: Entity, etag: str) -> str: ...

    def merge(self, entity: Entity, etag: str) -> str: ...

    def upsert(self, entity: Entity) -> str: ...

    def delete(self, partition: str, row: str, etag: str | None = None) -> None: ...

    def transact(self, writes: Sequence[Write]) -> list[str]: ...

    def query(self, query: Query) -> Iterator[Stored]: ...

    def page(self, query: Query, size: int, continuation: str | None = None) -> Page: ...


class TableEntities:
    """`Entities` on an azure-data-tables `TableClient` (Azure Table storage or Azurite)."""

    def __init__(self, client: TableClient) -> None:
        self._client = client
        self._created = False
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return str(self._client.table_name)

    def get(self, partition: str, row: str) -> Stored | None:
        from azure.core.exceptions import ResourceNotFoundError

        try:
            return _stored(self._client.get_entity(partition, row))
        except ResourceNotFoundError:  # no entity, or no table yet: nothing there either way
            return None

    def insert(self, entity: Entity) -> str:
        from azure.core.exceptions import ResourceExistsError

        try:
            return str(self._write(lambda: self._client.create_entity(entity)))
        except ResourceExistsError as exc:
            raise EntityConflict(_where(entity)) from exc

    def replace(self, entity: Entity, etag: str) -> str:
        from azure.core import MatchConditions
        from azure.core.exceptions import ResourceModifiedError, ResourceNotFoundError
        from azure.data.tables import UpdateMode

        try:
            return _etag(
                self._client.update_entity(
                    entity, mode=UpdateMode.REPLACE, etag=etag, match_condition=MatchConditions.IfNotModified
                )
            )
        except (ResourceModifiedError, ResourceNotFoundError) as exc:
            raise EntityChanged(_where(entity)) from exc

    def merge(self, entity: Entity, etag: str) -> str:
        # One entity on its own: a plain conditional update costs a fraction of a one-entity
        # transaction (the SDK builds a multipart body, with a thread pool per level).
        from azure.core import MatchConditions
        from azure.core.exceptions import ResourceModifiedError, ResourceNotFoundError
        from azure.data.tables import UpdateMode

        try:
            return _etag(
                self._client.update_entity(
                    entity, mode=UpdateMode.MERGE, etag=etag, match_condition=MatchConditions.IfNotModified
                )
            )
        except (ResourceModifiedError, ResourceNotFoundError) as exc:
            raise EntityChanged(_where(entity)) from exc

    def upsert(self, entity: Entity) -> str:
        from azure.data.tables import UpdateMode

        return str(self._write(lambda: self._client.upsert_entity(entity, mode=UpdateMode.REPLACE)))

    def delete(self, partition: str, row: str, etag: str | None = None) -> None:
        from azure.core import MatchConditions
        from azure.core.exceptions import ResourceModifiedError, ResourceNotFoundError

        try:
            if etag is None:
                self._client.delete_entity(partition, row)
            else:
                self._client.delete_entity(
                    partition, row, etag=etag, match_condition=MatchConditions.IfNotModified
                )
        except ResourceModifiedError as exc:
            raise EntityChanged(f"{partition}/{row}") from exc
        except ResourceNotFoundError:
            pass  # already gone: what a delete wants

    def transact(self, writes: Sequence[Write]) -> list[str]:
        from azure.core import MatchConditions
        from azure.data.tables import TableTransactionError, UpdateMode

        operations: list[Any] = []
        for write in writes:
            if write.kind == "insert":
                operations.append(("create", write.entity))
            elif write.kind == "upsert":
                operations.append(("upsert", write.entity, {"mode": UpdateMode.REPLACE}))
            else:
                options = {
                    "mode": UpdateMode.MERGE if write.kind == "merge" else UpdateMode.REPLACE,
                    "etag": write.etag,
                    "match_condition": MatchConditions.IfNotModified,
                }
                operations.append(("update", write.entity, options))
        try:
            results = self._write(lambda: self._client.submit_transaction(operations))
        except TableTransactionError as exc:
            code = str(getattr(exc, "error_code", "") or "")
            failed = writes[min(exc.index, len(writes) - 1)].entity if writes else {}
            if code == "EntityAlreadyExists":
                raise EntityConflict(_where(failed)) from exc
            if code in ("UpdateConditionNotSatisfied", "ResourceNotFound", "EntityNotFound"):
                raise EntityChanged(_where(failed)) from exc
            raise
        return [_etag(result) for result in results]

    def query(self, query: Query) -> Iterator[Stored]:
        from azure.core.exceptions import ResourceNotFoundError

        text, parameters = query.odata()
        try:
            for entity in self._client.query_entities(text, parameters=parameters, select=_select(query)):
                yield _stored(entity)
        except ResourceNotFoundError:
            return  # no table yet: nothing to find

    def page(self, query: Query, size: int, continuation: str | None = None) -> Page:
        import base64
        import json

        from azure.core.exceptions import ResourceNotFoundError

        text, parameters = query.odata()
        token = json.loads(base64.urlsafe_b64decode(continuation)) if continuation else None
        pages = self._client.query_entities(
            text,
            parameters=parameters,
            results_per_page=size,
            select=_select(query),
        ).by_page(continuation_token=token)
        try:
            found = [_stored(entity) for entity in next(pages)]
        except StopIteration:
            found = []
        except ResourceNotFoundError:
            return Page([], None)
        next_token = pages.continuation_token  # type: ignore[attr-defined]
        encoded = base64.urlsafe_b64encode(json.dumps(next_token).encode()).decode() if next_token else None
        return Page(found, encoded)

    def _write(self, call: Any) -> Any:
        """Runs a write; a missing table is created once and the write tried again."""
        from azure.core.exceptions import HttpResponseError, ResourceExistsError

        try:
            result = call()
        except HttpResponseError as exc:
            # Some SDK paths set error_code, others only carry the service's code in the text.
            if getattr(exc, "error_code", None) != "TableNotFound" and "TableNotFound" not in str(exc):
                raise
            with self._lock, contextlib.suppress(ResourceExistsError):
                self._client.create_table()
            result = call()
        return result if isinstance(result, list) else _etag(result)


class MemoryEntities:
    """`Entities` in a dict: the same contract as `TableEntities`, for fast tests."""

    def __init__(self, name: str = "memory") -> None:
        self.name = name
        self._rows: dict[tuple[str, str], tuple[Entity, str]] = {}
        self._versions = itertools.count(1)
        self._lock = threading.RLock()
        self.requests = 0  # round trips a real table would have made

    def get(self, partition: str, row: str) -> Stored | None:
        with self._lock:
            self.requests += 1
            found = self._rows.get((partition, row))
            return Stored(dict(found[0]), found[1]) if found else None

    def insert(self, entity: Entity) -> str:
        return self.transact([Write.insert(entity)])[0]

    def replace(self, entity: Entity, etag: str) -> str:
        return self.transact([Write.replace(entity, etag)])[0]

    def merge(self, entity: Entity, etag: str) -> str:
        return self.transact([Write.merge(entity, etag)])[0]

    def upsert(self, entity: Entity) -> str:
        return self.transact([Write.upsert(entity)])[0]

    def delete(self, partition: str, row: str, etag: str | None = None) -> None:
        with self._lock:
            self.requests += 1
            found = self._rows.get((partition, row))
            if found is None:
                return
            if etag is not None and found[1] != etag:
                raise EntityChanged(f"{partition}/{row}")
            del self._rows[(partition, row)]

    def transact(self, writes: Sequence[Write]) -> list[str]:
        if len({w.entity["PartitionKey"] for w in writes}) > 1 or len(writes) > 100:
            raise ValueError("a transaction holds at most 100 writes to one partition")
        with self._lock:
            self.requests += 1
            for write in writes:  # check everything first: all or nothing
                key = (write.entity["PartitionKey"], write.entity["RowKey"])
                found = self._rows.get(key)
                if write.kind == "insert" and found is not None:
                    raise EntityConflict(_where(write.entity))
                if write.kind in ("replace", "merge") and (found is None or found[1] != write.etag):
                    raise EntityChanged(_where(write.entity))
            etags = []
            for write in writes:
                etag = f'W/"{next(self._versions)}"'
                key = (write.entity["PartitionKey"], write.entity["RowKey"])
                base = self._rows[key][0] if write.kind == "merge" else {}
                self._rows[key] = ({**base, **write.entity}, etag)
                etags.append(etag)
            return etags

    def query(self, query: Query) -> Iterator[Stored]:
        with self._lock:
            self.requests += 1
            found = [
                Stored(_selected(entity, query.select), etag)
                for key, (entity, etag) in sorted(self._rows.items())
                if query.matches(entity)
            ]
        yield from found

    def page(self, query: Query, size: int, continuation: str | None = None) -> Page:
        found = list(self.query(query))
        start = int(continuation or 0)
        rest = start + size
        return Page(found[start:rest], str(rest) if rest < len(found) else None)


def _select(query: Query) -> list[str] | None:
    # The service returns only what is selected; the keys are always wanted.
    return [*_KEYS, *query.select] if query.select else None


def _stored(entity: Any) -> Stored:
    return Stored(dict(entity), str(entity.metadata["etag"]))


def _etag(metadata: Mapping[str, Any]) -> str:
    return str(metadata["etag"])


def _where(entity: Mapping[str, Any]) -> str:
    return f"{entity.get('PartitionKey')}/{entity.get('RowKey')}"


def _selected(entity: Entity, select: tuple[str, ...] | None) -> Entity:
    if select is None:
        return dict(entity)
    return {k: v for k, v in entity.items() if k in (*_KEYS, *select)}
