"""The HTTP intake: validate what a caller sent, before anything is stored or queued.

Validation is strict because the request ends in a destructive call: anything that is not
unmistakably a Defender machine id is refused before it reaches the queue. Unknown fields
are ignored (callers such as Logic Apps add their own), and that choice is documented.
Duplicate keys are not: `{"dryRun": true, "dryRun": false}` means one thing to one JSON
reader and the opposite to another, so a validator in front of the app could disagree with
it about a destructive request.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from ..domain.errors import InvalidInput, PayloadTooLarge
from ..domain.messages import REQUEST_ID, TENANT_ID
from ..domain.offboard import CONTROL_CHARACTERS, MAX_COMMENT_CHARS, comment_problem

MAX_BODY_BYTES = 64 * 1024
# ASCII only: `[0-9a-fA-F]` never matches look-alike digits or letters from other scripts.
_MACHINE_ID = re.compile(r"[0-9a-fA-F]{40}")
MAX_KEY_CHARS = 200
_KEY = re.compile(rf"[\x20-\x7e]{{1,{MAX_KEY_CHARS}}}")


def read_json(body: bytes) -> Any:
    """The body's JSON, after the size and emptiness checks every route shares."""
    if len(body) > MAX_BODY_BYTES:
        raise PayloadTooLarge("PayloadTooLarge", f"the body is over {MAX_BODY_BYTES} bytes")
    if not body.strip():
        raise InvalidInput("EmptyBody", 'the body is empty; send {"machineId": "<40 hex>"}')
    try:
        payload: Any = json.loads(body, object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        raise InvalidInput("DuplicateKey", f"the key {exc.key!r} appears twice in one object") from None
    except RecursionError:
        # 60,000 `[` fit in 64 KiB and exhaust the parser's recursion: refused for what they are.
        raise InvalidInput("InvalidJson", "the body nests too deeply to be a request") from None
    except (UnicodeDecodeError, ValueError):
        raise InvalidInput("InvalidJson", "the body is not valid JSON") from None
    return payload


def read_object(body: bytes) -> dict[str, Any]:
    """An optional JSON object body (the cancel route's): empty means {}."""
    if not body.strip():
        return {}
    payload = read_json(body)
    if not isinstance(payload, dict):
        raise InvalidInput("InvalidBody", "the body must be a JSON object")
    return payload


def idempotency_key(headers: Mapping[str, str]) -> str | None:
    """The `Idempotency-Key` header, validated; None when absent."""
    return idempotency_key_of(headers.get("idempotency-key"), "Idempotency-Key")


def parse_request_id(value: str | None) -> str:
    text = (value or "").lower()
    if not REQUEST_ID.fullmatch(text):
        raise InvalidInput("InvalidRequestId", "the request id must be the GUID this service returned")
    return text


def parse_batch_id(value: str | None) -> str:
    from ..domain import ids

    text = (value or "").lower()
    if not ids.is_batch_id(text):
        raise InvalidInput("InvalidBatchId", "the batch id must be the id this service returned")
    return text


def machine_id_of(value: Any) -> str:
    if value is None:
        raise InvalidInput("MissingMachineId", "machineId is required")
    if not isinstance(value, str):
        raise InvalidInput("InvalidMachineId", "machineId must be a string")
    if not _MACHINE_ID.fullmatch(value):
        raise InvalidInput(
            "InvalidMachineId",
            "machineId must be exactly 40 hexadecimal characters (the Defender device id)",
        )
    return value.lower()


def tenant_id_of(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not TENANT_ID.fullmatch(value.lower()):
        raise InvalidInput("InvalidTenantId", "tenantId must be a tenant id (a GUID)")
    return value.lower()


def dry_run_of(value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidInput("InvalidDryRun", "dryRun must be true or false")
    return value


def idempotency_key_of(value: Any, name: str = "clientRequestId") -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not _KEY.fullmatch(value):
        raise InvalidInput(
            "InvalidIdempotencyKey", f"{name} must be 1-{MAX_KEY_CHARS} printable ASCII characters"
        )
    return value


def comment_of(value: Any, default: str) -> str:
    if value is None:
        return default
    if not isinstance(value, str):
        raise InvalidInput("InvalidComment", "comment must be a string")
    problem = comment_problem(value)
    if problem:
        raise InvalidInput("InvalidComment", f"comment {problem}")
    return value.strip() or default


def generated_comment(text: str, default: str) -> str:
    """A comment this app composes from a caller's fields (incident title, device name): made
    to fit the comment rules instead of refusing the request for a long incident title."""
    return CONTROL_CHARACTERS.sub("?", text)[:MAX_COMMENT_CHARS].strip() or default


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key[:100]


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result
