"""What a caller adapter turns a request into: a handshake to answer as is, or items.

Each item is one device: accepted as an internal offboard request, rejected with an error
code (bad data in that item only), or ignored with the reason (valid, but nothing to do, such
as an Intune device that is not being retired). One bad item never sinks the others.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ...domain.offboard import OffboardRequest

# The most devices one call may name. Defender allows 100 offboards a minute; a bigger
# batch only waits in the queue, and a caller that sends more is more likely a mistake.
MAX_ITEMS = 50
# The event type Event Grid and CloudEvents senders use for "offboard this device".
OFFBOARD_EVENT_TYPE = "Defender.Offboard.Requested"
FORMATS_UNDERSTOOD = (
    'native {"machineId"|"aadDeviceId"|"deviceName", "comment"}, native batch {"requests": [...]}, '
    'a Microsoft Sentinel incident or alert trigger body or {"Entities": [...]}, '
    "Event Grid events, CloudEvents 1.0 (structured or binary), Microsoft Graph change "
    "notifications, an Intune managedDevice, an Azure Monitor common alert schema alert"
)


@dataclass(frozen=True)
class Inbound:
    """The parts of an HTTP request the adapters look at; header names lower-case."""

    method: str
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, method: str, body: bytes, headers: Mapping[str, str], params: Mapping[str, str]) -> Inbound:
        return cls(method.upper(), body, {k.lower(): v for k, v in headers.items()}, dict(params))


@dataclass(frozen=True)
class Handshake:
    """A subscription-validation answer, sent back exactly as it is; nothing is queued."""

    kind: str
    status: int
    body: str
    mimetype: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Accepted:
    item: str  # which part of the payload, for the caller: "requests[2]", "entity 1 (host x)"
    request: OffboardRequest


@dataclass(frozen=True)
class Rejected:
    item: str
    code: str
    message: str


@dataclass(frozen=True)
class Ignored:
    item: str
    reason: str


Item = Accepted | Rejected | Ignored


@dataclass(frozen=True)
class Items:
    format: str  # "native", "native-batch", "sentinel-incident", "eventgrid", ...
    items: list[Item]
    # The original single-request form keeps its original response (202 with Location).
    single: bool = False
