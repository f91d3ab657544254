"""A request's status, as callers see it and as its row stores it (the strings are the
contract: they are stored exactly as they read)."""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    QUEUED = "Queued"  # accepted, waiting for its turn (or for a slot in Defender's budget)
    THROTTLED = "Throttled"  # Defender answered 429; tried again after Retry-After
    HELD = "Held"  # stopped by the breaker or the approval rule until an operator releases it
    SUBMITTED = "Submitted"  # Defender accepted the offboard
    PENDING = "Pending"  # Defender's MachineAction statuses, from here on
    IN_PROGRESS = "InProgress"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    CANCELLED = "Cancelled"
    TIME_OUT = "TimeOut"
    REJECTED = "Rejected"  # a guardrail refused it; nothing was sent
    EXPIRED = "Expired"  # held and not released in time
    DRY_RUN = "DryRun"  # everything but the offboard call


NOT_SENT = frozenset({Status.QUEUED, Status.THROTTLED})
TERMINAL = frozenset(
    {
        Status.SUCCEEDED,
        Status.FAILED,
        Status.CANCELLED,
        Status.TIME_OUT,
        Status.REJECTED,
        Status.EXPIRED,
        Status.DRY_RUN,
    }
)
# Defender's MachineAction statuses map one to one onto ours.
ACTION_STATUSES = frozenset(
    {Status.PENDING, Status.IN_PROGRESS, Status.SUCCEEDED, Status.FAILED, Status.TIME_OUT, Status.CANCELLED}
)


def status_of(text: str) -> Status | None:
    """The status a string names, or None when it names none (a filter, an action's status)."""
    try:
        return Status(text)
    except ValueError:
        return None
