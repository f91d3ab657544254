"""The HTTP intake: validate what a caller sent, before anything is stored or queued.

Validation is strict because the request ends in a destructive call: anything that is not
unmistakably a Defender machine id is refused before it reaches the queue. Unknown fields
are ignored (callers such as Logic Apps add their own), and that choice is documented.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..domain.devices import Lookup
from ..domain.messages import REQUEST_ID

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
    """One device to offboard: by Defender machine id, or by a lookup the worker resolves."""

    machine_id: str | None
    comment: str
    lookup: Lookup | None = None
    client_request_id: str | None = None
    dry_run: bool = False

    @property
    def fingerprint(self) -> str:
        """What an idempotency key promises stays the same: the device, comment and dry run."""
        device = self.machine_id or (self.lookup.to_dict() if self.lookup else None)
        canonical = json.dumps([device, self.comment, self.dry_run], separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    @property
    def device_key(self) -> str:
        """What names the device before it is resolved: one unfinished request per key."""
        if self.machine_id:
            return self.machine_id
        assert self.lookup is not None
        return f"{self.lookup.by}:{self.lookup.value}"


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


def idempotency_key(headers: Mapping[str, str]) -> str | None:
    """The `Idempotency-Key` header, validated; None when absent."""
    return idempotency_key_of(headers.get("idempotency-key"), "Idempotency-Key")


def parse_request_id(value: str | None) -> str:
    text = (value or "").lower()
    if not REQUEST_ID.fullmatch(text):
        raise BadRequest("InvalidRequestId", "the request id must be the GUID this service returned")
    return text


def caller_of(headers: Mapping[str, str], environ: Mapping[str, str] = os.environ) -> str:
    """Who called, as the host tells us: the App Service authentication principal, else the
    user agent. Function keys identify no one, so nothing better exists. The principal headers
    are believed only when App Service authentication is on (it sets them, and strips any a
    caller sent); otherwise any key holder could write a name of their choosing."""
    authenticated = environ.get("WEBSITE_AUTH_ENABLED", "").lower() == "true"
    principal = authenticated and (
        headers.get("x-ms-client-principal-name") or headers.get("x-ms-client-principal-id")
    )
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


def dry_run_of(value: Any) -> bool:
    if not isinstance(value, bool):
        raise BadRequest("InvalidDryRun", "dryRun must be true or false")
    return value


def idempotency_key_of(value: Any, name: str = "clientRequestId") -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not _KEY.fullmatch(value):
        raise BadRequest(
            "InvalidIdempotencyKey", f"{name} must be 1-{MAX_KEY_CHARS} printable ASCII characters"
        )
    return value


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
