"""Domain refusals become HTTP answers here, and only here (as azure-core maps statuses to
its named errors in one place)."""

from __future__ import annotations

from ..domain.errors import (
    DefenderUnavailable,
    IdempotencyKeyReused,
    InvalidInput,
    PayloadTooLarge,
    Refusal,
    RequestConflict,
    RequestNotFound,
    ServiceUnavailable,
)

# Most specific first: PayloadTooLarge is an InvalidInput with its own status.
_STATUS: tuple[tuple[type[Refusal], int], ...] = (
    (PayloadTooLarge, 413),
    (InvalidInput, 400),
    (RequestNotFound, 404),
    (RequestConflict, 409),
    (IdempotencyKeyReused, 422),
    (DefenderUnavailable, 502),
    (ServiceUnavailable, 503),
)


def status_of(refusal: Refusal) -> int:
    return next((status for kind, status in _STATUS if isinstance(refusal, kind)), 400)
