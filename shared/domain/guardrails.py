"""Guardrails for a destructive call: what a machine's own record says before we offboard it.

Pure functions over the machine entity Defender returns (`GET /api/machines/{id}`), so each
rule is a plain unit test. The worker fetches the machine, asks `verdict()`, and makes the
offboard call only when the answer is `None`.

Platforms: the precheck refuses only what is certainly unsupported. Where the record cannot
tell (which agent a Windows Server 2016 runs, a Linux distribution we have not listed),
Defender decides: its `OsPlatformNotSupported` answer fails the request with the reason.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

# What the offboard API supports, after Microsoft Learn's "Offboard machine API" page (see
# docs/how-it-works.md, "The platform table"), keyed by Defender's `osPlatform` (lower case).
# A rule is `allow`, `refuse`, `defender` (let Defender decide) or `min:<version>`. A platform
# not listed here is `defender`. OFFBOARD_PLATFORM_RULES overrides or adds rows.
PLATFORM_RULES: Mapping[str, str] = {
    "windows11": "allow",
    "windows10": "min:1703",
    "windowsserver2025": "allow",
    "windowsserver2022": "allow",
    "windowsserver2019": "allow",
    # Supported with the unified agent only, which the machine record does not show.
    "windowsserver2016": "defender",
    "windowsserver2012r2": "defender",
    "windowsserver2012": "refuse",
    "windowsserver2008r2": "refuse",
    "windows8.1": "refuse",
    "windows8": "refuse",
    "windows7": "refuse",
    "macos": "min:14",
    "linux": "allow",
    "ios": "refuse",
    "android": "refuse",
    "unknown": "refuse",
    "": "refuse",  # no platform at all: Defender itself does not know the device
}
_RULE = re.compile(r"allow|refuse|defender|min:(\d+(?:\.\d+)*|\d{2}h[12])")
# Windows 10 releases by build, for records that carry a build but no version.
_WINDOWS_10_BUILDS = (
    (10240, "1507"),
    (10586, "1511"),
    (14393, "1607"),
    (15063, "1703"),
    (16299, "1709"),
    (17134, "1803"),
    (17763, "1809"),
    (18362, "1903"),
    (18363, "1909"),
    (19041, "2004"),
    (19042, "20H2"),
    (19043, "21H1"),
    (19044, "21H2"),
    (19045, "22H2"),
)


def parse_platform_rule(raw: str) -> str:
    """A platform rule in its canonical form; ValueError naming what a rule can be."""
    rule = raw.strip().lower()
    if not _RULE.fullmatch(rule):
        raise ValueError(f"{raw!r} is not a rule: allow, refuse, defender or min:<version> (e.g. min:14)")
    return rule


@dataclass(frozen=True)
class Protection:
    """Devices never offboarded by automation, from settings (compared case-insensitively),
    and the platform table in force."""

    tags: frozenset[str] = frozenset()
    group_ids: frozenset[int] = frozenset()
    deny: frozenset[str] = frozenset()  # machine ids or DNS names
    platforms: Mapping[str, str] = field(default_factory=lambda: dict(PLATFORM_RULES))

    @classmethod
    def of(
        cls,
        tags: Iterable[str] = (),
        group_ids: Iterable[int] = (),
        deny: Iterable[str] = (),
        platform_overrides: Iterable[tuple[str, str]] = (),
    ) -> Protection:
        return cls(
            frozenset(t.lower() for t in tags),
            frozenset(group_ids),
            frozenset(d.lower() for d in deny),
            {**PLATFORM_RULES, **dict(platform_overrides)},
        )


@dataclass(frozen=True)
class Verdict:
    """Why the offboard call is not made. `done` means there is nothing to do (success)."""

    code: str
    message: str
    done: bool = False


def verdict(machine: dict[str, Any], protection: Protection) -> Verdict | None:
    """None when the machine may be offboarded (or Defender must decide); otherwise why not."""
    machine_id = str(machine.get("id", "")).lower()
    name = str(machine.get("computerDnsName") or "").lower()
    if machine_id in protection.deny or (name and name in protection.deny):
        return Verdict("ProtectedDevice", f"{name or machine_id} is on the deny list (OFFBOARD_DENY_LIST)")
    protected_tags = sorted(
        {str(t) for t in machine.get("machineTags") or [] if str(t).lower() in protection.tags}
    )
    if protected_tags:
        return Verdict(
            "ProtectedDevice", f"the machine carries the protected tag(s) {', '.join(protected_tags)}"
        )
    group = machine.get("rbacGroupId")
    if isinstance(group, int) and group in protection.group_ids:
        return Verdict("ProtectedDevice", f"the machine is in protected device group {group}")
    status = machine.get("onboardingStatus")
    # Defender answers "Onboarded"; Learn's Machine resource page writes "onboarded".
    if isinstance(status, str) and status and status.lower() != "onboarded":
        return Verdict(
            "AlreadyOffboarded", f"Defender reports the machine as {status}; nothing to do", done=True
        )
    refusal = platform_refusal(machine, protection.platforms)
    if refusal is not None:
        return Verdict("OsPlatformNotSupported", refusal)
    return None


def platform_refusal(machine: dict[str, Any], rules: Mapping[str, str]) -> str | None:
    """Why the offboard API certainly does not support this machine's platform, or None
    (supported, or not knowable from the record: then Defender decides)."""
    platform = str(machine.get("osPlatform") or "")
    rule = rules.get(platform.lower(), "defender")
    shown = platform or "an unknown platform"
    if rule == "refuse":
        return f"{shown} is not supported by the offboard API (the precheck's platform table refuses it)"
    if not rule.startswith("min:"):
        return None
    minimum = _comparable(rule.removeprefix("min:"))
    found = _version_of(machine)
    if found is None or minimum is None:
        return None  # the record does not say: Defender decides
    if found[0] < minimum:
        return (
            f"{shown} {found[1]} is not supported by the offboard API, which needs "
            f"{rule.removeprefix('min:')} or later"
        )
    return None


def _version_of(machine: dict[str, Any]) -> tuple[tuple[int, ...], str] | None:
    """The machine's OS version as a comparable tuple and as shown, from `version` (e.g.
    "1703", "22H2", "14.1") or, for Windows 10, from `osBuild`."""
    raw = machine.get("version")
    if isinstance(raw, str) and (comparable := _comparable(raw)) is not None:
        return comparable, raw
    build = machine.get("osBuild")
    if str(machine.get("osPlatform") or "").lower() == "windows10" and isinstance(build, int):
        known = [release for first, release in _WINDOWS_10_BUILDS if build >= first]
        if known and (comparable := _comparable(known[-1])) is not None:
            return comparable, f"{known[-1]} (build {build})"
    return None


def _comparable(version: str) -> tuple[int, ...] | None:
    # "20H2" is Windows 10's name for the release after 2004: month 09 of 2020, and H1 is 03.
    half = re.fullmatch(r"(\d{2})[Hh]([12])", version.strip())
    if half:
        return (int(half.group(1)) * 100 + (3 if half.group(2) == "1" else 9),)
    if re.fullmatch(r"\d+(?:\.\d+)*", version.strip()):
        return tuple(int(part) for part in version.strip().split("."))
    return None
