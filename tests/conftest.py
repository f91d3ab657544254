"""Shared fixtures: real Azurite, the real credential against a loopback identity endpoint,
the loopback Defender simulator, and the local Functions host as a subprocess."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import logging
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from azure.core.exceptions import ResourceExistsError
from azure.storage.queue import QueueClient

from localdev.azurite import Azurite
from localdev.defender_sim import DefenderSimulator
from localdev.host import LOCAL_FUNCTION_KEY, launch
from localdev.identity import IdentityEndpoint
from shared.adapters.defender import DefenderClient
from shared.adapters.entities import MemoryEntities
from shared.adapters.queues import MemoryQueue, WorkQueue
from shared.adapters.request_store import NewRequest
from shared.adapters.tokens import TokenProvider
from shared.domain import ids
from shared.domain.messages import OffboardMessage
from shared.domain.records import RequestRecord
from shared.runtime import Services
from shared.settings import Settings
from shared.worker.worker import Worker

ROOT = Path(__file__).resolve().parent.parent
# The SDKs log every HTTP exchange at INFO; the app's own records are what tests read.
logging.getLogger("azure").setLevel(logging.WARNING)
MACHINE = "1e5bc9d7e413ddd7902c2932e418702b84d0cc07"  # the id in the API reference example


@pytest.fixture(scope="session")
def azurite() -> Iterator[Azurite]:
    with Azurite() as emulator:
        yield emulator


@pytest.fixture
def identity() -> Iterator[IdentityEndpoint]:
    with IdentityEndpoint() as endpoint:
        yield endpoint


@pytest.fixture
def defender(identity: IdentityEndpoint) -> Iterator[DefenderSimulator]:
    # Only tokens the identity endpoint really issued are accepted, as Defender would. Tests
    # post random machine ids: any well-formed one is an onboarded PC (the fleet is there too).
    with DefenderSimulator(accept_token=lambda token: token in identity.tokens, accept_any=True) as sim:
        yield sim


@pytest.fixture
def queue_name() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
def app_env(
    azurite: Azurite, identity: IdentityEndpoint, defender: DefenderSimulator, queue_name: str
) -> dict[str, str]:
    """The app's settings for one test: its own queue, fast retries, every fake wired in."""
    return {
        **azurite.app_storage(queue_name),  # each test its own requests and Defender budget
        "OFFBOARD_CHECK_INITIAL_SECONDS": "1",
        "OFFBOARD_CHECK_MAX_SECONDS": "2",
        "DEFENDER_API_BASE_URL": defender.url,
        "DEFENDER_API_SCOPE": "https://api.securitycenter.microsoft.com/.default",
        "OFFBOARD_MAX_ATTEMPTS": "3",
        "OFFBOARD_RETRY_BASE_SECONDS": "1",
        "OFFBOARD_RETRY_MAX_SECONDS": "2",
        "OFFBOARD_CONFIG_RETRY_SECONDS": "60",
        "DEFENDER_CONNECT_TIMEOUT_SECONDS": "2",
        "DEFENDER_READ_TIMEOUT_SECONDS": "1",
        # Timer triggers name their schedule by setting (%INTUNE_WATCH_SCHEDULE%), and the
        # local host, like the real one, refuses to start a function whose setting is unset.
        "INTUNE_WATCH_SCHEDULE": "0 */5 * * * *",
        **identity.env,
    }


@pytest.fixture
def make_services(app_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Callable[..., Services]:
    """The app's services built exactly as the app builds them, in this process."""

    def make(**overrides: str) -> Services:
        env = {**app_env, **overrides}
        for name in ("IDENTITY_ENDPOINT", "IDENTITY_HEADER"):
            monkeypatch.setenv(name, env[name])  # read by ManagedIdentityCredential
        return Services.build(Settings.from_env(env))

    return make


@pytest.fixture
def services(make_services: Callable[..., Services]) -> Services:
    return make_services()


@pytest.fixture
def make_worker(make_services: Callable[..., Services]) -> Callable[..., Worker]:
    """A worker built exactly as the app builds it, with setting overrides."""
    return lambda **overrides: make_services(**overrides).worker()


@dataclass
class Queues:
    """Reads the test's queues the way an operator would, decoding base64 JSON."""

    connection_string: str
    name: str

    def client(self, suffix: str = "") -> QueueClient:
        return QueueClient.from_connection_string(self.connection_string, self.name + suffix)

    def count(self, suffix: str = "") -> int:
        try:
            return int(self.client(suffix).get_queue_properties().approximate_message_count or 0)
        except Exception:  # the queue does not exist yet
            return 0

    def peek(self, suffix: str = "") -> list[Any]:
        try:
            messages = self.client(suffix).peek_messages(max_messages=32)
        except Exception:
            return []
        return [json.loads(base64.b64decode(m.content)) for m in messages]

    def wait_for(self, suffix: str, count: int = 1, timeout: float = 20.0) -> list[Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.peek(suffix)
            if len(found) >= count:
                return found
            time.sleep(0.1)
        raise TimeoutError(
            f"expected {count} messages on {self.name}{suffix}, found {len(self.peek(suffix))}"
        )

    def send_raw(self, text: str) -> None:
        client = self.client()
        with contextlib.suppress(ResourceExistsError):
            client.create_queue()
        client.send_message(base64.b64encode(text.encode()).decode())


@pytest.fixture
def queues(azurite: Azurite, queue_name: str) -> Queues:
    return Queues(azurite.connection_string, queue_name)


@dataclass
class RunningHost:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def post(
        self, path: str, body: Any = None, *, data: bytes | None = None, key: bool = True, **kwargs: Any
    ) -> requests.Response:
        headers = {"x-functions-key": LOCAL_FUNCTION_KEY} if key else {}
        headers.update(kwargs.pop("headers", {}))
        if data is None and body is not None:
            data = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        return requests.post(self.url + path, data=data, headers=headers, timeout=10, **kwargs)

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        headers = {"x-functions-key": LOCAL_FUNCTION_KEY, **kwargs.pop("headers", {})}
        return requests.get(self.url + path, headers=headers, timeout=10, **kwargs)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def local_host(app_env: dict[str, str]) -> Iterator[Callable[..., RunningHost]]:
    """Starts `python -m localdev.host` with the test's settings (plus overrides). Schedules
    do not run unless `timers=True`, so no timer fires in the middle of a test; timer
    functions still run on demand (POST /admin/functions/{name} with the master key)."""
    started: list[RunningHost] = []

    def start(*args: str, timers: bool = False, **overrides: str) -> RunningHost:
        flags = args if timers else (*args, "--no-timers")
        process, port, log = launch({**os.environ, **app_env, **overrides}, *flags)
        host = RunningHost(f"http://127.0.0.1:{port}", process, log)
        started.append(host)
        return host

    yield start
    for host in started:
        host.process.terminate()
        host.process.wait(10)
        if os.environ.get("SHOW_HOST_LOGS"):
            print(host.log())
        host.log_path.unlink(missing_ok=True)


def new_request_id() -> str:
    return ids.request_id(ids.new_batch_id(), 1)


def offboard_message(**fields: Any) -> OffboardMessage:
    defaults: dict[str, Any] = {
        "request_id": new_request_id(),
        "machine_id": MACHINE,
        "comment": "Offboard machine by automation",
        "enqueued_at": "2026-11-23T10:00:00+00:00",
        "caller": "agent:pytest",
    }
    return OffboardMessage(**{**defaults, **fields})


def adopt(services: Services, **fields: Any) -> OffboardMessage:
    """A message whose request row exists, as the HTTP intake leaves them: the row written,
    and the message carrying its ETag."""
    message = offboard_message(**fields)
    record = RequestRecord(
        message.request_id,
        message.machine_id,
        message.caller,
        message.comment,
        dry_run=message.dry_run,
        tenant_id=message.tenant_id,
        lookup=__import__("json").dumps(message.lookup.to_dict()) if message.lookup else None,
    )
    written, failed = services.store.accept([NewRequest(record, ())])
    assert not failed, failed
    return dataclasses.replace(message, etag=written[message.request_id].etag)


def events(services: Services, request_id: str) -> list[str]:
    return [row["event"] for row in services.store.events(request_id)]


@dataclass
class Memory:
    """The app's services on in-memory storage (the same contracts as Azurite's, ETags and
    412s included), with the real credential and the Defender simulator over loopback."""

    services: Services
    work: MemoryQueue
    poison: MemoryQueue
    state: MemoryEntities

    def deliver(self, worker: Worker | None = None, rounds: int = 1) -> int:
        """Hands every due message to the worker, as the host would; how many it handled."""
        worker = worker or self.services.worker()
        handled = 0
        for _ in range(rounds):
            for message in self.work.due():
                worker.handle(message.text.encode(), f"m-{uuid.uuid4().hex[:8]}")
                handled += 1
        return handled


@pytest.fixture
def memory(
    identity: IdentityEndpoint, defender: DefenderSimulator, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Memory]:
    def make(**overrides: str) -> Memory:
        env = {
            "AzureWebJobsStorage": "UseDevelopmentStorage=true",
            "DEFENDER_API_BASE_URL": defender.url,
            "OFFBOARD_MAX_ATTEMPTS": "3",
            "OFFBOARD_RETRY_BASE_SECONDS": "1",
            "OFFBOARD_RETRY_MAX_SECONDS": "2",
            "DEFENDER_READ_TIMEOUT_SECONDS": "1",
            "DEFENDER_CONNECT_TIMEOUT_SECONDS": "2",
            **overrides,
        }
        for name, value in identity.env.items():
            monkeypatch.setenv(name, value)
        settings = Settings.from_env(env)
        work, poison, state = MemoryQueue(), MemoryQueue(), MemoryEntities("state")
        tokens = TokenProvider(settings.defender_scope, settings.managed_identity_client_id)
        client = DefenderClient(
            settings.defender_base_url,
            tokens,
            connect_timeout=settings.connect_timeout_seconds,
            read_timeout=settings.read_timeout_seconds,
        )
        services = Services(
            settings,
            state,
            MemoryEntities("audit"),
            MemoryEntities("budgets"),
            WorkQueue(work, poison),
            client,
        )
        return Memory(services, work, poison, state)

    return make
