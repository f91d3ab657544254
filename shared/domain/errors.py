"""What can go wrong on the way to Defender, split by whether Defender saw the request.

"Never sent" failures (no token, no connection) are always safe to retry. A timeout after
sending leaves the outcome unknown; retrying is still safe because a second offboard of the
same machine is answered with ActiveRequestAlreadyExists, which counts as success.
"""

from __future__ import annotations


class DefenderCallError(Exception):
    """Base: the call produced no HTTP response."""


class RequestNotSent(DefenderCallError):
    """Defender never received the request."""


class TokenUnavailable(RequestNotSent):
    """The managed identity could not provide a token (configuration or identity endpoint)."""


class ConnectionFailed(RequestNotSent):
    """No connection to Defender could be made."""


class NoResponse(DefenderCallError):
    """The request may have reached Defender, but no answer came back in time."""


# ---- what a caller asked for cannot be done ----------------------------------------------
# Named by what happened; the HTTP side maps each to a status in one place (http/errors.py),
# as azure-core maps status codes to ResourceNotFoundError and friends.


class Refusal(Exception):
    """The request cannot be done as asked. `code` is the contract's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class InvalidInput(Refusal):
    """What was sent is not something this service accepts."""


class PayloadTooLarge(InvalidInput):
    """The body is over the size limit."""


class RequestNotFound(Refusal):
    """No such request (or none the caller may see)."""


class RequestConflict(Refusal):
    """The request's state does not allow this (yet): finished, being sent, not held..."""


class IdempotencyKeyReused(Refusal):
    """An idempotency key came back with a different request."""


class DefenderUnavailable(Refusal):
    """Defender could not be reached, or refused, for a call made on the caller's behalf."""


class ServiceUnavailable(Refusal):
    """Storage could not be reached or kept changing: nothing was accepted; try again."""
