"""Device identifiers other than a Defender machine id, and the OData filter that finds them.

A request that names a device by its Entra ID (Azure AD) device id or its DNS name is
resolved by the worker with `GET /api/machines?$filter=...`. The filter is built only from
values that already passed a strict pattern (a GUID; a hostname/FQDN of letters, digits,
hyphens and dots), so nothing a caller sends can change the filter's meaning; the literal is
still quoted and escaped the OData way as a second line of defence.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

LookupBy = Literal["aadDeviceId", "deviceName"]
LOOKUP_KINDS: tuple[LookupBy, ...] = ("aadDeviceId", "deviceName")
MAX_DNS_NAME = 253
# ASCII only, like the machine id rule: look-alike characters from other scripts never match.
GUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
# RFC 1123 labels (1-63 chars, letters/digits/hyphens, no hyphen at either end), dot-separated,
# an optional trailing dot not accepted (Defender's computerDnsName never has one).
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
DNS_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
# Intune and Entra ID use the all-zero GUID for "not registered": it identifies nothing.
EMPTY_GUID = "00000000-0000-0000-0000-000000000000"
# The Defender machine property each lookup filters on.
FILTER_FIELD: dict[LookupBy, str] = {"aadDeviceId": "aadDeviceId", "deviceName": "computerDnsName"}


class InvalidLookup(ValueError):
    """The identifier is not one this app will ever put into a filter."""


@dataclass(frozen=True)
class Lookup:
    """A device named by something other than its Defender machine id."""

    by: LookupBy
    value: str

    @classmethod
    def of(cls, by: str, value: object) -> Lookup:
        """A validated lookup; raises InvalidLookup naming what is wrong."""
        if by == "aadDeviceId":
            if not isinstance(value, str) or not GUID.fullmatch(value):
                raise InvalidLookup("aadDeviceId must be a GUID (the Entra ID device id)")
            if value == EMPTY_GUID:
                raise InvalidLookup("aadDeviceId is the all-zero GUID, which names no device")
            return cls("aadDeviceId", value.lower())
        if by == "deviceName":
            if not isinstance(value, str) or not value:
                raise InvalidLookup("deviceName must be a non-empty string")
            if len(value) > MAX_DNS_NAME or not DNS_NAME.fullmatch(value):
                raise InvalidLookup(
                    "deviceName must be a host name or FQDN: letters, digits, hyphens and dots, "
                    f"at most {MAX_DNS_NAME} characters"
                )
            # Defender compares names case-insensitively; one spelling keeps logs comparable.
            return cls("deviceName", value.lower())
        raise InvalidLookup(f"unknown lookup kind {by!r}; use one of {', '.join(LOOKUP_KINDS)}")

    def to_dict(self) -> dict[str, str]:
        return {"by": self.by, "value": self.value}

    def odata_filter(self) -> str:
        """`$filter` for `GET /api/machines`: one exact `eq` comparison, never a substring."""
        checked = Lookup.of(self.by, self.value)  # re-validated: this is where it becomes a query
        return f"{FILTER_FIELD[checked.by]} eq {odata_literal(checked.value)}"


def odata_literal(value: str) -> str:
    """An OData string literal: single-quoted, a quote inside doubled (`o'brien` -> `'o''brien'`).

    Anything that is not a printable ASCII character is refused rather than escaped: no
    filter this app builds needs one, and refusing leaves nothing to get wrong.
    """
    if not all(" " <= ch <= "~" for ch in value):
        raise InvalidLookup("the value has characters that cannot appear in a filter literal")
    return "'" + value.replace("'", "''") + "'"
