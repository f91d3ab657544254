"""The blast-radius breaker: more than N offboards accepted within a window stops the rest.

A mistake in automation (a query that matches every device, a loop) must not become a
fleet-wide offboard. The breaker counts accepted offboards in one Table storage row shared by
every instance (ETag concurrency); once the window holds `limit` of them, further requests
are held for an operator instead of queued.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import TableClient, UpdateMode

from .request_store import StaleRecord

log = logging.getLogger(__name__)
_KEY = {"PartitionKey": "breaker", "RowKey": "offboard"}


@dataclass(frozen=True)
class Admission:
    admitted: bool
    count: int  # offboards accepted in the window, this one included when admitted


class BlastRadiusBreaker:
    def __init__(
        self, table: TableClient, limit: int, window_seconds: float, clock: Callable[[], float] = time.time
    ) -> None:
        self._table = table
        self.limit = limit
        self.window_seconds = window_seconds
        self._clock = clock

    def admit(self) -> Admission:
        """Count one more accepted offboard if the window has room for it."""
        for _ in range(20):  # ETag races between instances: re-read and try again
            try:
                row = self._table.get_entity(_KEY["PartitionKey"], _KEY["RowKey"])
                accepted, etag = json.loads(row["acceptedAt"]), row.metadata["etag"]
            except ResourceNotFoundError:
                accepted, etag = [], None
            now = self._clock()
            accepted = [t for t in accepted if t > now - self.window_seconds]
            if len(accepted) >= self.limit:
                return Admission(False, len(accepted))
            accepted.append(round(now, 3))
            entity = {**_KEY, "acceptedAt": json.dumps(accepted, separators=(",", ":"))}
            try:
                if etag is None:
                    self._table.create_entity(entity)
                else:
                    self._table.update_entity(
                        entity,
                        mode=UpdateMode.REPLACE,
                        etag=etag,
                        match_condition=MatchConditions.IfNotModified,
                    )
            except (ResourceExistsError, ResourceModifiedError):
                continue
            return Admission(True, len(accepted))
        raise StaleRecord("breaker")
