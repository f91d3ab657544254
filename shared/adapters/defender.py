"""A small client for the Defender for Endpoint machine API.

It only makes calls and reports transport failures as typed errors; deciding what an answer
means is `outcome.classify`'s job. Every call names its tenant (None: the home tenant), whose
token it carries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import requests

from ..domain.messages import ACTION_ID, MACHINE_ID
from .bearer import bearer_request
from .tokens import TokenProvider
from .transport import api_session

USER_AGENT = "defender-offboard-function/1.0"


class DefenderClient:
    def __init__(
        self,
        base_url: str,
        tokens: TokenProvider,
        *,
        connect_timeout: float,
        read_timeout: float,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._tokens = tokens
        self._timeout = (connect_timeout, read_timeout)
        # One session per process: connections to Defender are reused across messages.
        self._session = api_session(USER_AGENT)

    def warm_up(self, tenant: str | None = None) -> None:
        """Fetch (or reuse) the token now, so a call made right after starts on time."""
        self._tokens.token(tenant)

    def offboard(self, machine_id: str, comment: str, tenant: str | None = None) -> requests.Response:
        """POST /api/machines/{id}/offboard, exactly as the API reference shows it."""
        return self._call("POST", self.offboard_path(machine_id), {"Comment": comment}, tenant=tenant)

    @staticmethod
    def offboard_path(machine_id: str) -> str:
        return f"/api/machines/{_checked_machine_id(machine_id)}/offboard"

    def get_machine(self, machine_id: str, tenant: str | None = None) -> requests.Response:
        """GET /api/machines/{id}: the machine's platform, tags, group and onboarding status."""
        return self._call("GET", f"/api/machines/{_checked_machine_id(machine_id)}", tenant=tenant)

    def find_machines(self, odata_filter: str, tenant: str | None = None) -> requests.Response:
        """GET /api/machines?$filter=... (needs Machine.Read.All); answers `{"value": [...]}`.

        The filter must come from `devices.Lookup.odata_filter()`, which builds it only from
        validated values; this client sends it as one query parameter, URL-encoded."""
        return self._call("GET", "/api/machines", params={"$filter": odata_filter}, tenant=tenant)

    def tag_machines(
        self, machine_ids: Sequence[str], tag: str, tenant: str | None = None
    ) -> requests.Response:
        """POST /api/machines/AddOrRemoveTagForMultipleMachines: one tag on up to 500 machines
        (Machine.ReadWrite.All), so people can see why devices left Defender."""
        body = {"Value": tag, "Action": "Add", "MachineIds": [_checked_machine_id(m) for m in machine_ids]}
        return self._call("POST", "/api/machines/AddOrRemoveTagForMultipleMachines", body, tenant=tenant)

    def find_offboard_actions(self, machine_id: str, tenant: str | None = None) -> requests.Response:
        """GET /api/machineactions?$filter=...: the machine's offboard actions (Machine.Read.All)."""
        odata_filter = f"machineId eq '{_checked_machine_id(machine_id)}' and type eq 'Offboard'"
        return self._call("GET", "/api/machineactions", params={"$filter": odata_filter}, tenant=tenant)

    def get_action(self, action_id: str, tenant: str | None = None) -> requests.Response:
        """GET /api/machineactions/{id}: the current status of one MachineAction."""
        return self._call("GET", f"/api/machineactions/{_checked_action_id(action_id)}", tenant=tenant)

    def cancel_action(self, action_id: str, comment: str, tenant: str | None = None) -> requests.Response:
        """POST /api/machineactions/{id}/cancel: stop an action Defender has not carried out yet."""
        return self._call(
            "POST",
            f"/api/machineactions/{_checked_action_id(action_id)}/cancel",
            {"Comment": comment},
            tenant=tenant,
        )

    def _call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        params: dict[str, str] | None = None,
        tenant: str | None = None,
    ) -> requests.Response:
        token = self._tokens.token(tenant)
        # requests sets Content-Type: application/json when there is a body
        return bearer_request(
            self._session, method, self._base_url + path, token, self._timeout, json=body, params=params
        )


def _checked_machine_id(machine_id: str) -> str:
    # Defence in depth: an id reaches a URL path only after this check.
    if not MACHINE_ID.fullmatch(machine_id):
        raise ValueError("machine id must be 40 lowercase hex characters")
    return machine_id


def _checked_action_id(action_id: str) -> str:
    if not ACTION_ID.fullmatch(action_id):
        raise ValueError("action id must be a GUID")
    return action_id
