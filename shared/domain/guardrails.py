"""Guardrails for a destructive call: what a machine's own record says before we offboard it.

Pure functions over the machine entity Defender returns (`GET /api/machines/{id}`), so each
rule is a plain unit test. The worker fetches the machine, asks `verdict()`, and makes the
offboard call only when the answer is `None`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

# The offboard API supports Windows 10 1703 and later, and Windows Server 2019 and later.
_WINDOWS_10_1703_BUILD = 15063
_SUPPORTED_ALWAYS = frozenset({"windows11", "windowsserver2019", "windowsserver2022", "windowsserver2025"})
_SERVER_YEAR = re.compile(r"windowsserver(\d{4})")


@dataclass(frozen=True)
class Protection:
    """Devices never offboarded by automation, from settings (compared case-insensitively)."""

    tags: frozenset[str] = frozenset()
    group_ids: frozenset[int] = frozenset()
    deny: frozenset[str] = frozenset()  # machine ids or DNS names

    @classmethod
    def of(
        cls, tags: Iterable[str] = (), group_ids: Iterable[int] = (), deny: Iterable[str] = ()
    ) -> Protection:
        return cls(
            frozenset(t.lower() for t in tags), frozenset(group_ids), frozenset(d.lower() for d in deny)
        )


@dataclass(frozen=True)
class Verdict:
    """Why the offboard call is not made. `done` means there is nothing to do (success)."""

    code: str
    message: str
    done: bool = False


def verdict(machine: dict[str, Any], protection: Protection) -> Verdict | None:
    """None when the machine may be offboarded; otherwise why not."""
    machine_id = str(machine.get("id", "")).lower()
    name = str(machine.get("computerDnsName") or "").lower()
    if machine_id in protection.deny or (name and name in protection.deny):
        return Verdict("ProtectedDevice", f"{name or machine_id} is on the deny list (OFFBOARD_DENY_LIST)")
    tags = {str(t).lower() for t in machine.get("machineTags") or []}
    protected_tags = sorted(tags & protection.tags)
    if protected_tags:
        return Verdict(
            "ProtectedDevice", f"the machine carries the protected tag(s) {', '.join(protected_tags)}"
        )
    group = machine.get("rbacGroupId")
    if isinstance(group, int) and group in protection.group_ids:
        return Verdict("ProtectedDevice", f"the machine is in protected device group {group}")
    status = machine.get("onboardingStatus")
    if status and status != "Onboarded":
        return Verdict(
            "AlreadyOffboarded", f"Defender reports the machine as {status}; nothing to do", done=True
        )
    if not os_supported(machine):
        platform = machine.get("osPlatform") or "an unknown platform"
        version = machine.get("version") or machine.get("osBuild") or "?"
        return Verdict(
            "OsPlatformNotSupported",
            f"{platform} (version {version}) is not supported by the offboard API: only Windows 10 1703+, "
            "Windows 11 and Windows Server 2019+",
        )
    return None


def os_supported(machine: dict[str, Any]) -> bool:
    platform = str(machine.get("osPlatform") or "").lower()
    if platform in _SUPPORTED_ALWAYS:
        return True
    server = _SERVER_YEAR.fullmatch(platform)
    if server:
        return int(server.group(1)) >= 2019
    if platform != "windows10":
        return False  # macOS, Linux, older Windows, mobile, unknown
    build = machine.get("osBuild")
    if isinstance(build, int):
        return build >= _WINDOWS_10_1703_BUILD
    version = str(machine.get("version") or "")
    if re.fullmatch(r"\d{4}", version):
        return int(version) >= 1703
    # "20H2", "21H2", "22H2": the half-year names began after 2004, well past 1703.
    return bool(re.fullmatch(r"\d{2}H\d", version))
