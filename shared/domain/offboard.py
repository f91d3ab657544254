"""What a caller asks for, whatever format it arrived in: one device to offboard, and who asked."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from .devices import Lookup

# Defender records the comment on the machine action; these are the callers' rules for it.
MAX_COMMENT_CHARS = 1000
CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # tab and newlines allowed


def comment_problem(text: str) -> str | None:
    """What is wrong with a comment, or None when Defender may record it as it is."""
    if len(text) > MAX_COMMENT_CHARS:
        return f"is over {MAX_COMMENT_CHARS} characters"
    if CONTROL_CHARACTERS.search(text):
        return "contains control characters"
    return None


@dataclass(frozen=True)
class OffboardRequest:
    """One device to offboard: by Defender machine id, or by a lookup the worker resolves."""

    machine_id: str | None
    comment: str
    lookup: Lookup | None = None
    client_request_id: str | None = None
    dry_run: bool = False
    tenant_id: str | None = None  # None: the home tenant

    @property
    def fingerprint(self) -> str:
        """What an idempotency key promises stays the same: the device, comment, dry run, tenant."""
        device = self.machine_id or (self.lookup.to_dict() if self.lookup else None)
        parts: list[object] = [device, self.comment, self.dry_run]
        if self.tenant_id:
            parts.append(self.tenant_id)  # absent for the home tenant: old fingerprints still match
        canonical = json.dumps(parts, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    @property
    def device_key(self) -> str:
        """What names the device before it is resolved: one unfinished request per key."""
        if self.machine_id:
            return self.machine_id
        assert self.lookup is not None
        return f"{self.lookup.by}:{self.lookup.value}"


@dataclass(frozen=True)
class Caller:
    """Who asked. `label` is what the audit trail shows (the principal's name, else the user
    agent). `principal` is the App Service authentication principal id when authentication
    is on: then a request belongs to its principal, and only it, or an `operator` (a holder of
    OFFBOARD_OPERATOR_ROLE), may read or cancel it. Without authentication, function keys
    identify no one, so every key holder is trusted with every request (docs/security.md)."""

    label: str
    principal: str | None = None
    operator: bool = False
    scoped: bool = False  # App Service authentication is on: requests belong to principals
    # A caller inside the app (the Intune watcher): its idempotency keys live apart from every
    # HTTP caller's, so no caller can replay one by sending the same key.
    namespace: str = ""

    def may_see(self, owner: str | None) -> bool:
        """Whether this caller may read or cancel a request its `owner` created. With
        authentication on, a caller without a principal (the platform let an anonymous
        call through) sees nothing it did not create, which is nothing."""
        if not self.scoped or self.operator:
            return True
        return self.principal is not None and owner == self.principal

    @property
    def scope(self) -> str:
        """What keeps one caller's idempotency keys apart from another's."""
        return self.principal or self.namespace
