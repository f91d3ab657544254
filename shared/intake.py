"""The HTTP intake: validate what a caller sent, before anything is stored or queued.

Validation is strict because the request ends in a destructive call: anything that is not
unmistakably a Defender machine id is refused before it reaches the queue. Unknown fields
are ignored (callers such as Logic Apps add their own), and that choice is documented.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .messages import REQUEST_ID

MAX_BODY_BYTES = 64 * 1024
MAX_COMMENT_CHARS = 1000
# ASCII only: `[0-9a-fA-F]` never matches look-alike digits or letters from other scripts.
_MACHINE_ID = re.compile(r"[0-9a-fA-F]{40}")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_CALLER_LIMIT = 200
MAX_KEY_CHARS = 200
_KEY = re.compile(rf"[\x20-\x7e]{{1,{MAX_KEY_CHARS}}}")


class BadRequest(ValueError):
    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


@dataclass(frozen=True)
class OffboardRequest:
    machine_id: str
    comment: str
    client_request_id: str | None = None
    dry_run: bool = False

    @property
    def fingerprint(self) -> str:
        """What an idempotency key promises stays the same: the machine and the comment."""
        canonical = json.dumps([self.machine_id, self.comment, self.dry_run], separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def parse_offboard_request(body: bytes, default_comment: str) -> OffboardRequest:
    if len(body) > MAX_BODY_BYTES:
        raise BadRequest("PayloadTooLarge", f"the body is over {MAX_BODY_BYTES} bytes", 413)
    if not body.strip():
        raise BadRequest("EmptyBody", 'the body is empty; send {"machineId": "<40 hex>"}')
    try:
        payload: Any = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("InvalidJson", "the body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise BadRequest("InvalidBody", "the body must be a JSON object")
    return OffboardRequest(
        machine_id=_machine_id(payload.get("machineId")),
        comment=parse_comment(payload.get("comment"), default_comment),
        client_request_id=_idempotency_key(payload.get("clientRequestId"), "clientRequestId"),
        dry_run=_dry_run(payload.get("dryRun", False)),
    )


def idempotency_key(headers: Mapping[str, str], request: OffboardRequest) -> str | None:
    """The caller's idempotency key: the `Idempotency-Key` header or `clientRequestId`."""
    header = _idempotency_key(headers.get("idempotency-key"), "Idempotency-Key")
    if header and request.client_request_id and header != request.client_request_id:
        raise BadRequest("InvalidIdempotencyKey", "Idempotency-Key and clientRequestId differ; send one")
    return header or request.client_request_id


def parse_request_id(value: str | None) -> str:
    text = (value or "").lower()
    if not REQUEST_ID.fullmatch(text):
        raise BadRequest("InvalidRequestId", "the request id must be the GUID this service returned")
    return text


def caller_of(headers: Mapping[str, str]) -> str:
    """Who called, as the host tells us: the App Service authentication principal when
    present, else the user agent. Function keys identify no one, so nothing better exists."""
    principal = headers.get("x-ms-client-principal-name") or headers.get("x-ms-client-principal-id")
    if principal:
        return _printable(f"principal:{principal}")
    agent = headers.get("user-agent")
    return _printable(f"agent:{agent}") if agent else "unknown"


def _machine_id(value: Any) -> str:
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


def _dry_run(value: Any) -> bool:
    if not isinstance(value, bool):
        raise BadRequest("InvalidDryRun", "dryRun must be true or false")
    return value


def _idempotency_key(value: Any, name: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not _KEY.fullmatch(value):
        raise BadRequest(
            "InvalidIdempotencyKey", f"{name} must be 1-{MAX_KEY_CHARS} printable ASCII characters"
        )
    return value


def parse_comment(value: Any, default: str) -> str:
    if value is None:
        return default
    if not isinstance(value, str):
        raise BadRequest("InvalidComment", "comment must be a string")
    if len(value) > MAX_COMMENT_CHARS:
        raise BadRequest("InvalidComment", f"comment is over {MAX_COMMENT_CHARS} characters")
    if _CONTROL.search(value):
        raise BadRequest("InvalidComment", "comment contains control characters")
    return value.strip() or default


def _printable(text: str) -> str:
    return _CONTROL.sub("?", text)[:_CALLER_LIMIT]
