"""Which service to talk to, and with which key.

`--url` / `OFFBOARD_URL` is the app's base URL (https://<app>.azurewebsites.net). `--local`
is the stack `scripts/run-local --serve` starts: http://127.0.0.1:7071 (or `--port`) with
the local host's fixed keys, which are no secret (localdev/host.py; a test keeps these
equal to it). Keys come from `OFFBOARD_KEY` / `OFFBOARD_ADMIN_KEY` or a prompt (keys.py).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from .errors import UsageError
from .keys import Secret, read_key

LOCAL_HOST = "127.0.0.1"
LOCAL_PORT = 7071
LOCAL_FUNCTION_KEY = "local-function-key"
LOCAL_MASTER_KEY = "local-master-key"
_TOKEN = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class Where:
    """The base URL and how keys are obtained (not the keys: they are read when needed)."""

    base_url: str
    local: bool
    prompt: bool  # --key: type the key even if the environment has it

    def function_key(self, environ: Mapping[str, str]) -> Secret:
        if self.local:
            return Secret(LOCAL_FUNCTION_KEY)
        return read_key("OFFBOARD_KEY", "function key", environ, prompt=self.prompt)

    def token(self, environ: Mapping[str, str]) -> Secret | None:
        """OFFBOARD_TOKEN: an Entra ID access token for the app, when App Service
        authentication is on (docs/security.md); sent besides the key, which is still needed."""
        value = environ.get("OFFBOARD_TOKEN", "").strip()
        if not value:
            return None
        if not _TOKEN.fullmatch(value):
            raise UsageError(
                "OFFBOARD_TOKEN is not an access token (a JWT: letters, digits, '-', '_', '.'), "
                "e.g. az account get-access-token --resource api://<app id> --query accessToken -o tsv"
            )
        return Secret(value)

    def master_key(self, environ: Mapping[str, str]) -> Secret:
        if self.local:
            return Secret(LOCAL_MASTER_KEY)
        return read_key("OFFBOARD_ADMIN_KEY", "master key", environ, prompt=self.prompt)


def where(url: str | None, local: bool, port: int | None, prompt: bool, environ: Mapping[str, str]) -> Where:
    if local and url:
        raise UsageError("--local and --url name two different services; give one")
    if port is not None and not local:
        raise UsageError("--port goes with --local; otherwise put the port in --url")
    if local:
        if port is not None and not 1 <= port <= 65535:
            raise UsageError(f"--port must be 1-65535, not {port}")
        if prompt:
            raise UsageError("--key is not needed with --local: the local host's keys are fixed")
        return Where(f"http://{LOCAL_HOST}:{port or LOCAL_PORT}", local=True, prompt=False)
    source = "--url" if url else "OFFBOARD_URL"
    raw = (url or environ.get("OFFBOARD_URL", "")).strip()
    if not raw:
        raise UsageError("no service: give --url URL, set OFFBOARD_URL, or use --local")
    return Where(base_url_of(raw, source), local=False, prompt=prompt)


def base_url_of(raw: str, source: str = "--url") -> str:
    """`https://host[:port]` (a trailing `/` or `/api` is dropped). Plain http only to a
    loopback host, since the key travels with every request. A query or user info is
    refused without being quoted: that is where a key pasted by mistake would be."""
    try:
        parts = urlsplit(raw)
        port = parts.port
    except ValueError:
        raise UsageError(f"{source} is not a URL") from None
    if parts.query or parts.fragment or parts.username or parts.password or "@" in parts.netloc:
        raise UsageError(
            f"{source} must be the app's base URL only, with no ?query, #fragment or user: "
            "the key goes in OFFBOARD_KEY, never in a URL"
        )
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"{source} must look like https://<app>.azurewebsites.net, not {raw!r}")
    path = parts.path.rstrip("/")
    if path.lower() == "/api":
        path = ""
    if path:
        raise UsageError(f"{source} must be the app's base URL (no path such as {parts.path!r})")
    if parts.scheme == "http" and not _loopback(parts.hostname):
        raise UsageError(f"{source} must be https:// (plain http only for 127.0.0.1 or localhost)")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}{f':{port}' if port else ''}"


def _loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
