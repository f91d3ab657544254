"""A small client for the Microsoft Graph calls of the Intune watcher (Graph v1.0).

Like defender.py it only makes calls and reports transport failures as typed errors
(domain/errors.py: no token, no connection, no answer in time); what an answer means, and
whether to wait and ask again, is decided in watcher/decide.py. One `requests.Session` per
process, explicit connect and read timeouts, no redirects (a redirect is not part of this
API and following one could carry the token elsewhere), and a paging link is followed only
when it stays on GRAPH_API_BASE_URL's own scheme, host and port. Tokens come from
`TokenProvider(GRAPH_API_SCOPE, MANAGED_IDENTITY_CLIENT_ID)`; settings.py already refuses a
base URL that is not https (plain http only for loopback hosts: tests).

The two reads (application permissions of the app's managed identity):
- `GET /v1.0/deviceManagement/managedDevices?$select=id,deviceName,azureADDeviceId,
  managementState,operatingSystem,lastSyncDateTime`: every managed device, paged with
  `@odata.nextLink`. Permission `DeviceManagementManagedDevices.Read.All`. There is no
  `$filter` on managementState: the managedDevice reference documents only "limited support
  for $filter: only properties whose descriptions mention support for $filter may be used",
  managementState's does not, and an unsupported filter may be silently ignored (every
  device would then look like a retiring one). So every device is listed and the watcher
  decides, and the same listing refreshes its inventory.
- `GET /v1.0/deviceManagement/auditEvents?$filter=activityDateTime gt <ISO 8601>`: Intune's
  audit events since a time, paged the same way. The v1.0 page documents no query parameters
  for this call; the filter on activityDateTime is what Intune's own audit log view sends, and
  the watcher checks every event's time itself, so a filter ignored costs reading, never a
  wrong decision. Permission
  `DeviceManagementApps.Read.All` (what Graph v1.0 lists for auditEvents: exactly
  DeviceManagementApps.Read.All or ReadWrite.All). No `$orderby`: the order is not relied on,
  the watcher sorts what it read.

National clouds: `https://graph.microsoft.us` (GCC High), `https://dod-graph.microsoft.us`
(DoD), with the scope `<root>/.default` (GRAPH_API_SCOPE).
"""

from __future__ import annotations

from datetime import UTC, datetime
from urllib.parse import urlsplit

import requests

from .bearer import bearer_request
from .tokens import TokenProvider
from .transport import api_session

USER_AGENT = "defender-offboard-function/1.0 (intune-watcher)"
MANAGED_DEVICES = "/v1.0/deviceManagement/managedDevices"
AUDIT_EVENTS = "/v1.0/deviceManagement/auditEvents"
DEVICE_FIELDS = (
    "id",
    "deviceName",
    "azureADDeviceId",
    "managementState",
    "operatingSystem",
    "lastSyncDateTime",
)
# The least application permission each read needs, named in the watcher's log when Graph
# answers 403.
DEVICES_PERMISSION = "DeviceManagementManagedDevices.Read.All"
AUDIT_PERMISSION = "DeviceManagementApps.Read.All"


class ForeignLink(ValueError):
    """A paging link that leaves the configured Graph host: never sent a token."""


class GraphClient:
    def __init__(
        self,
        base_url: str,
        tokens: TokenProvider,
        *,
        connect_timeout: float,
        read_timeout: float,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._origin = _origin(self.base_url)
        self._tokens = tokens
        self._timeout = (connect_timeout, read_timeout)
        self._session = api_session(USER_AGENT)
        self._session.headers["Accept"] = "application/json"

    def managed_devices(self) -> requests.Response:
        """The first page of every managed device, with only the fields the watcher uses."""
        return self._get(self.base_url + MANAGED_DEVICES, {"$select": ",".join(DEVICE_FIELDS)})

    def audit_events(self, since: datetime) -> requests.Response:
        """The first page of the audit events after `since` (UTC)."""
        return self._get(
            self.base_url + AUDIT_EVENTS, {"$filter": f"activityDateTime gt {graph_time(since)}"}
        )

    def follow(self, link: str) -> requests.Response:
        """The page an `@odata.nextLink` names, as given (it carries its own query)."""
        if not self.same_origin(link):
            raise ForeignLink("the paging link leaves GRAPH_API_BASE_URL's host")
        return self._get(link, None)

    def same_origin(self, link: str) -> bool:
        try:
            return _origin(link) == self._origin
        except ValueError:
            return False

    def _get(self, url: str, params: dict[str, str] | None) -> requests.Response:
        return bearer_request(self._session, "GET", url, self._tokens.token(), self._timeout, params=params)


def graph_time(moment: datetime) -> str:
    """A DateTimeOffset literal as Graph's `$filter` takes it: UTC, unquoted, `Z`."""
    text = moment.astimezone(UTC).isoformat(timespec="microseconds")
    return text.replace("+00:00", "Z")


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    if not parts.scheme or not parts.hostname:
        raise ValueError("not an absolute URL")
    port = parts.port or {"https": 443, "http": 80}.get(parts.scheme)
    return parts.scheme.lower(), parts.hostname.lower(), port
