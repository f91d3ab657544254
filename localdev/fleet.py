"""The Defender simulator's fleet: a small, fixed tenant that shows every path of the app.

Each machine is there for one reason (its `purpose`): a platform the offboard API supports,
one it does not, a protected device, two records that share a DNS name. The ids, names and
Entra ID device ids are fixed, so the README, `scripts/run-local` and tests can name them.
Names and GUIDs used by the README's examples (`ws-0042`, `desktop-7f3k2`,
`srv-files-01.corp`) belong to fleet machines, so those examples resolve when pasted into a
`scripts/run-local --serve` session.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

# The machine id from Microsoft's API reference example, a Windows 11 PC here.
SAMPLE_MACHINE = "1e5bc9d7e413ddd7902c2932e418702b84d0cc07"
# The name two fleet records share (a re-imaged PC), for AmbiguousDevice.
SHARED_NAME = "ws-0117.contoso.com"


@dataclass(frozen=True)
class FleetMachine:
    id: str
    computer_dns_name: str
    aad_device_id: str | None
    os_platform: str
    version: str | None
    os_build: int | None
    rbac_group_id: int
    rbac_group_name: str
    purpose: str
    machine_tags: tuple[str, ...] = ()
    health_status: str = "Active"
    last_seen_days_ago: int = 0
    # The offboard API's standing answer for this device, when it refuses it: a 400
    # OsPlatformNotSupported with this message (None: the offboard is accepted).
    refusal: str | None = None

    def entity(self, now: datetime | None = None) -> dict[str, Any]:
        """The machine as `GET /api/machines/{id}` returns it."""
        now = now or datetime.now(UTC)
        last_seen = now - timedelta(days=self.last_seen_days_ago, hours=1)
        return {
            "id": self.id,
            "computerDnsName": self.computer_dns_name,
            "firstSeen": _stamp(last_seen - timedelta(days=400)),
            "lastSeen": _stamp(last_seen),
            "osPlatform": self.os_platform,
            "version": self.version,
            "osBuild": self.os_build,
            "osProcessor": "x64",
            "healthStatus": self.health_status,
            "onboardingStatus": "Onboarded",
            "rbacGroupId": self.rbac_group_id,
            "rbacGroupName": self.rbac_group_name,
            "aadDeviceId": self.aad_device_id,
            "isAadJoined": self.aad_device_id is not None,
            "machineTags": list(self.machine_tags),
        }


def _stamp(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


FLEET: tuple[FleetMachine, ...] = (
    FleetMachine(
        SAMPLE_MACHINE,
        "ws-0042.contoso.com",
        "6d5c4b3a-2f1e-4d0c-9b8a-7f6e5d4c3b2a",
        "Windows11",
        "23H2",
        22631,
        11,
        "Workstations",
        "Windows 11, the API reference's sample id: offboarded",
    ),
    FleetMachine(
        "6ab827c861c2d41e961548762a82bf1b0df9ac0b",
        "desktop-7f3k2.contoso.com",
        "b004050f-f94d-454b-ab55-8d67e188ea7a",
        "Windows10",
        "22H2",
        19045,
        11,
        "Workstations",
        "Windows 10 22H2: offboarded",
    ),
    FleetMachine(
        "bd5a5148fb0e7ff0dccf0dcfff4a32e6a91bacc0",
        "srv-files-01.corp.contoso.com",
        "f151c141-98e1-407a-b93b-a3471f2a3b2a",
        "WindowsServer2022",
        "21H2",
        20348,
        12,
        "Servers",
        "Windows Server 2022: offboarded",
    ),
    FleetMachine(
        "bcef7b7e0e0a43c1ee6e6d93891a4b7b796721c0",
        "srv-legacy-03.corp.contoso.com",
        None,
        "WindowsServer2016",
        "1607",
        14393,
        12,
        "Servers",
        "Server 2016 on the legacy agent: passes the precheck, Defender refuses it",
        refusal="The device runs the legacy Microsoft Monitoring Agent; offboarding needs the unified agent",
    ),
    FleetMachine(
        "9aea3d4ac35d78385a7002836a8eb226f2dd63ad",
        "mac-design-07.contoso.com",
        "65f93710-ecc9-4f29-8b70-64b90725296f",
        "macOS",
        "14.6.1",
        None,
        13,
        "macOS",
        "macOS 14: offboarded",
    ),
    FleetMachine(
        "c5e7f2528af415462bf25c54a323ecb03b1b2e2b",
        "mac-finance-02.contoso.com",
        "49c7df65-2ae0-4ab4-bab8-848e7cba6036",
        "macOS",
        "13.6.9",
        None,
        13,
        "macOS",
        "macOS 13: refused, OsPlatformNotSupported (by Defender too)",
        refusal="macOS 13 is not supported by the offboard API; macOS 14 and later are",
    ),
    FleetMachine(
        "0b75f3d38d2117bae169a04f71647b8ab2e4b738",
        "lnx-build-11.corp.contoso.com",
        None,
        "Linux",
        "22.04",
        None,
        14,
        "Linux servers",
        "Ubuntu 22.04: offboarded",
    ),
    FleetMachine(
        "946384940ef87c1143b8d1d9e50892d6cb40cd60",
        "dc-02.corp.contoso.com",
        None,
        "WindowsServer2022",
        "21H2",
        20348,
        1,
        "Tier 0",
        "domain controller tagged Tier0: refused, ProtectedDevice, when Tier0 is protected",
        machine_tags=("Tier0",),
    ),
    FleetMachine(
        "32e7a9af1a9833e9deaea8481652a9ae6b593361",
        SHARED_NAME,
        "f6f0a8e7-8a25-4912-9b76-4774acf4a9f8",
        "Windows11",
        "22H2",
        22621,
        11,
        "Workstations",
        "re-imaged PC, old record (inactive): by name, AmbiguousDevice",
        health_status="Inactive",
        last_seen_days_ago=41,
    ),
    FleetMachine(
        "595183dc6204dac01b61571acd6ad64d17f5ef0d",
        SHARED_NAME,
        "af9242da-ca60-47ed-b0e7-cc2ab7c18228",
        "Windows11",
        "23H2",
        22631,
        11,
        "Workstations",
        "re-imaged PC, new record: offboard it by this id",
    ),
)


def fleet_table() -> str:
    """The fleet as aligned text lines (id, name, platform, what it is for), for a terminal."""
    rows = [
        (m.id, m.computer_dns_name, f"{m.os_platform} {m.version or ''}".strip(), m.purpose) for m in FLEET
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(
        f"{mid:{widths[0]}}  {name:{widths[1]}}  {platform:{widths[2]}}  {purpose}"
        for mid, name, platform, purpose in rows
    )
