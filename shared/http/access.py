"""Who is calling, as the platform tells us.

Function keys identify no one. When App Service authentication (Easy Auth, Entra ID) is on,
the platform authenticates the caller and passes its principal in `X-MS-CLIENT-PRINCIPAL*`
headers, which callers cannot set themselves ("External requests aren't allowed to set these
headers, so they're present only if set by App Service", Learn: "Work with user identities in
App Service authentication"). Only then are they believed: otherwise any key holder could
claim a name of their choosing.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Mapping
from typing import Any

from ..domain.offboard import Caller

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # CR and LF too: a folded header must not split a line
_LABEL_LIMIT = 200
# The role claim's type: Entra's app-only tokens carry `roles`; the platform may map it to the
# WS-Federation name, and says which in `role_typ`.
_ROLE_TYPES = ("roles", "http://schemas.microsoft.com/ws/2008/06/identity/claims/role")


def caller_of(
    headers: Mapping[str, str], operator_role: str, environ: Mapping[str, str] = os.environ
) -> Caller:
    """The caller, with its principal and whether it holds `operator_role` when authentication
    is on; a user-agent label and no principal when it is off."""
    lowered = {k.lower(): v for k, v in headers.items()}
    if environ.get("WEBSITE_AUTH_ENABLED", "").lower() != "true":
        agent = lowered.get("user-agent")
        return Caller(printable(f"agent:{agent}") if agent else "unknown")
    principal_id = lowered.get("x-ms-client-principal-id") or None
    name = lowered.get("x-ms-client-principal-name") or principal_id
    roles = _roles(lowered.get("x-ms-client-principal"))
    return Caller(
        printable(f"principal:{name}") if name else "unknown",
        principal=principal_id,
        operator=operator_role in roles,
        scoped=True,
    )


def printable(text: str, limit: int = _LABEL_LIMIT) -> str:
    """Caller-supplied text as the audit trail and the logs may show it: one line, bounded."""
    return _CONTROL.sub("?", text)[:limit]


def _roles(encoded: str | None) -> set[str]:
    if not encoded:
        return set()
    try:
        principal: Any = json.loads(base64.b64decode(encoded, validate=False))
    except (binascii.Error, ValueError):
        return set()
    if not isinstance(principal, dict) or not isinstance(principal.get("claims"), list):
        return set()
    types = {*_ROLE_TYPES, str(principal.get("role_typ") or "roles")}
    return {
        str(claim.get("val"))
        for claim in principal["claims"]
        if isinstance(claim, dict) and claim.get("typ") in types
    }
