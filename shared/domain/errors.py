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
