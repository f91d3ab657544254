"""The HTTP intake: validate an offboard request and put it on the work queue.

Validation is strict because the request ends in a destructive call: anything that is not
unmistakably a Defender machine id is refused before it reaches the queue. Unknown fields
are ignored (callers such as Logic Apps add their own), and that choice is documented.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .devices import Lookup
from .messages import OffboardMessage, utc_now_iso
from .queues import WorkQueue

MAX_BODY_BYTES = 64 * 1024
MAX_COMMENT_CHARS = 1000
# ASCII only: `[0-9a-fA-F]` never matches look-alike digits or letters from other scripts.
_MACHINE_ID = re.compile(r"[0-9a-fA-F]{40}")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_CALLER_LIMIT = 200


class BadRequest(ValueError):
    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


@dataclass(frozen=True)
class OffboardRequest:
    """One device to offboard: by Defender machine id, or by a lookup the worker resolves."""

    machine_id: str | None
    comment: str
    lookup: Lookup | None = None


def parse_offboard_request(body: bytes, default_comment: str) -> OffboardRequest:
    payload = read_json(body)
    if not isinstance(payload, dict):
        raise BadRequest("InvalidBody", "the body must be a JSON object")
    return OffboardRequest(
        machine_id=machine_id_of(payload.get("machineId")),
        comment=comment_of(payload.get("comment"), default_comment),
    )


def read_json(body: bytes) -> Any:
    """The body's JSON, after the size and emptiness checks every caller format shares."""
    if len(body) > MAX_BODY_BYTES:
        raise BadRequest("PayloadTooLarge", f"the body is over {MAX_BODY_BYTES} bytes", 413)
    if not body.strip():
        raise BadRequest("EmptyBody", 'the body is empty; send {"machineId": "<40 hex>"}')
    try:
        payload: Any = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("InvalidJson", "the body is not valid JSON") from None
    return payload


def enqueue(request: OffboardRequest, caller: str, queue: WorkQueue) -> OffboardMessage:
    message = OffboardMessage(
        request_id=str(uuid.uuid4()),
        machine_id=request.machine_id,
        comment=request.comment,
        enqueued_at=utc_now_iso(),
        caller=caller,
        lookup=request.lookup,
    )
    queue.send(message)
    return message


def caller_of(headers: Mapping[str, str]) -> str:
    """Who called, as the host tells us: the App Service authentication principal when
    present, else the user agent. Function keys identify no one, so nothing better exists."""
    principal = headers.get("x-ms-client-principal-name") or headers.get("x-ms-client-principal-id")
    if principal:
        return _printable(f"principal:{principal}")
    agent = headers.get("user-agent")
    return _printable(f"agent:{agent}") if agent else "unknown"


def machine_id_of(value: Any) -> str:
    if value is None:
        raise BadRequest("MissingMachineId", "machineId is required")
    if not isinstance(value, str):
        raise BadRequest("InvalidMachineId", "machineId must be a string")
    if not _MACHINE_ID.fullmatch(value):
        raise BadRequest(
            "InvalidMachineId",
            "machineId must be exactly 40 hexadecimal characters (the Defender device id)",
        )
    return value.lower()


def comment_of(value: Any, default: str) -> str:
    if value is None:
        return default
    if not isinstance(value, str):
        raise BadRequest("InvalidComment", "comment must be a string")
    if len(value) > MAX_COMMENT_CHARS:
        raise BadRequest("InvalidComment", f"comment is over {MAX_COMMENT_CHARS} characters")
    if _CONTROL.search(value):
        raise BadRequest("InvalidComment", "comment contains control characters")
    return value.strip() or default


def generated_comment(text: str, default: str) -> str:
    """A comment this app composes from a caller's fields (incident title, device name): made
    to fit the comment rules instead of refusing the request for a long incident title."""
    return _printable(text, MAX_COMMENT_CHARS).strip() or default


def _printable(text: str, limit: int = _CALLER_LIMIT) -> str:
    return _CONTROL.sub("?", text)[:limit]
