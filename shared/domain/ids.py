"""Request and batch ids: GUIDs that say where their rows live.

Every call that accepts requests is a batch (a single request is a batch of one), and a
batch's rows share one Table storage partition: its requests' state rows and their audit
events, so that accepting a batch, updating a request and writing its audit event are single
transactions, and a batch's status is one query.

A batch id is an RFC 9562 version 8 ("vendor-specific") UUID:

    tttttttt-tttt-8rrr-vrrr-rrrrrrrrr000
    └ 48 bits: (2^48 - 1) minus the creation time in ms, so newer batches sort first

and a request id is its batch's id with the item's number (1-4095) in the last three hex
digits. So `batch_of(request_id)` needs no lookup, and a range of partitions is a range of
creation times (the list route reads newest first). Requests created before this layout have
random version 4 ids; `is_batched()` tells them apart (their rows keep the old layout).
"""

from __future__ import annotations

import re
import secrets
import time

GUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_TIME_MAX = (1 << 48) - 1
MAX_ITEMS = 0xFFF


def new_batch_id(now: float | None = None) -> str:
    millis = int((time.time() if now is None else now) * 1000)
    inverted = _TIME_MAX - millis
    variant = 0x8 | secrets.randbits(2)  # 10xx: the RFC 9562 variant
    text = f"{inverted:012x}8{secrets.randbits(12):03x}{variant:x}{secrets.randbits(12):03x}"
    text += f"{secrets.randbits(36):09x}000"  # 62 random bits in all
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def request_id(batch_id: str, item: int) -> str:
    """The id of a batch's `item`-th request (from 1)."""
    if not 1 <= item <= MAX_ITEMS:
        raise ValueError(f"a batch has items 1..{MAX_ITEMS}")
    return f"{batch_id[:-3]}{item:03x}"


def is_batched(request_or_batch_id: str) -> bool:
    """Whether the id is of this layout (version 8) rather than an older random one."""
    return bool(GUID.fullmatch(request_or_batch_id)) and request_or_batch_id[14] == "8"


def batch_of(request_id: str) -> str:
    return f"{request_id[:-3]}000"


def is_batch_id(value: str) -> bool:
    return is_batched(value) and value.endswith("000")


def created_at(batch_or_request_id: str) -> float:
    """Epoch seconds the batch was created, from its id."""
    inverted = int(batch_or_request_id[:8] + batch_or_request_id[9:13], 16)
    return (_TIME_MAX - inverted) / 1000


def time_prefix(epoch_seconds: float) -> str:
    """The first 13 characters of the ids of batches created in that millisecond: ids of
    later batches sort before it, of earlier ones after it."""
    text = f"{_TIME_MAX - int(epoch_seconds * 1000):012x}"
    return f"{text[:8]}-{text[8:12]}"
