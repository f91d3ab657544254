"""One HTTP transport for every storage client of the process, and a count of its requests.

Each azure-core client otherwise builds its own `requests.Session`, and `requests` then scans
the process environment for proxy and certificate settings on every call (about 0.5 ms of
CPU, more with every app setting). One shared transport keeps one connection pool per host
and turns the scan off. A CA bundle (`REQUESTS_CA_BUNDLE`, `CURL_CA_BUNDLE`) is read once,
at start. When the environment names a proxy the scan stays on, so `HTTPS_PROXY` and
`NO_PROXY` keep working exactly as the SDK documents them (Functions apps rarely have one:
VNet integration routes traffic, it does not proxy it).

The app's own HTTP calls (Defender, Graph, the hold webhook) get one `requests.Session` each,
with the same two settings (`api_session()`), so a CA bundle is trusted by every call or none.

The count (`storage_requests()`) is what the benchmark reports per offboarded request.
"""

from __future__ import annotations

import os
import threading
from functools import lru_cache
from typing import Any

import requests
from azure.core.pipeline.transport import RequestsTransport

_PROXY_SETTINGS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
_lock = threading.Lock()
_requests = 0


class _CountingTransport(RequestsTransport):  # type: ignore[misc]  # azure-core is untyped here
    def send(self, request: Any, **kwargs: Any) -> Any:
        global _requests
        with _lock:
            _requests += 1
        return super().send(request, **kwargs)


def needs_environment() -> bool:
    """Whether the process environment names a proxy that HTTP calls must honour."""
    return any(name.lower() in _PROXY_SETTINGS for name in os.environ)


def ca_bundle() -> str | bool:
    """The CA bundle the environment names, read once (True: the default trust store)."""
    return os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True


def api_session(user_agent: str | None = None) -> requests.Session:
    """A session for one of the app's API clients: its connections are reused across calls;
    the environment is scanned only when it names a proxy, and the CA bundle it names is
    trusted even when it is not scanned (`requests` reads the bundle only while scanning)."""
    session = requests.Session()
    if user_agent:
        session.headers["User-Agent"] = user_agent
    session.trust_env = needs_environment()
    session.verify = ca_bundle()
    return session


@lru_cache(maxsize=1)
def shared_transport() -> RequestsTransport:
    """The process's one storage transport (built on first use, never at import)."""
    return _CountingTransport(use_env_settings=needs_environment(), connection_verify=ca_bundle())


def storage_requests() -> int:
    """HTTP requests this process has sent to storage so far."""
    with _lock:
        return _requests
