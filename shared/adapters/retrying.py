"""One loop for optimistic concurrency: try, and on a lost race (a 412 or 409 from another
instance's write) read again and retry, a bounded number of times. Each caller states its
own bound where it calls, with the reason."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

from .entities import EntityChanged, EntityConflict

T = TypeVar("T")


class Contended(Exception):
    """A shared row kept changing under us; nothing was written."""


def retry_on_conflict(attempt: Callable[[bool], T], attempts: int, what: str, *, jitter: float = 0.0) -> T:
    """`attempt(fresh)` until it wins; `fresh` is True after a lost race, when cached state
    must be read again. `jitter` > 0 pauses a random, growing while between tries (up to
    jitter * 32 seconds), so racing instances stop colliding."""
    for tried in range(attempts):
        try:
            return attempt(tried > 0)
        except (EntityChanged, EntityConflict):
            if jitter:
                time.sleep(random.uniform(0, jitter * 2 ** min(tried, 5)))
    raise Contended(f"{what} changed {attempts} times while we tried to write it")
