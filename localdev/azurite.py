"""Starts the project's pinned Azurite (node_modules, from `npm ci`) on free loopback ports."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Azurite's published development account; it only ever exists on this machine.
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports: every socket stays bound until all are chosen, because a
    port closed at once may be handed out again by the very next bind (it was, in CI)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


class Azurite:
    def __init__(self) -> None:
        self.ports = self._choose_ports()
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as Azurite
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def connection_string(self) -> str:
        endpoints = ";".join(
            f"{kind.title()}Endpoint=http://127.0.0.1:{port}/{ACCOUNT}" for kind, port in self.ports.items()
        )
        return f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};{endpoints}"

    def app_storage(self, name: str) -> dict[str, str]:
        """The app's storage settings for one run of its own: this Azurite, and a queue and
        tables named from `name`, so that runs sharing the emulator never see each other's
        requests or spend each other's Defender budget."""
        return {
            "AzureWebJobsStorage": self.connection_string,
            "OFFBOARD_QUEUE_NAME": name,
            "OFFBOARD_STATE_TABLE_NAME": f"{name}state",
            "OFFBOARD_AUDIT_TABLE_NAME": f"{name}audit",
            "RATE_LIMIT_TABLE_NAME": name,
        }

    @staticmethod
    def _choose_ports() -> dict[str, int]:
        return dict(zip(("blob", "queue", "table"), free_ports(3), strict=True))

    def start(self, timeout: float = 30.0, attempts: int = 3) -> Azurite:
        """Starts Azurite; a port taken by another process between choosing it and Azurite's
        bind (parallel test workers start their own) is retried on fresh ports."""
        for attempt in range(attempts):
            try:
                return self._start_once(timeout)
            except _PortTaken:
                if attempt == attempts - 1:
                    raise
                self.ports = self._choose_ports()
        raise AssertionError("unreachable")

    def _start_once(self, timeout: float) -> Azurite:
        self._log.seek(0)
        self._log.truncate()
        binary = ROOT / "node_modules" / ".bin" / "azurite"
        if not binary.exists():
            raise RuntimeError(f"{binary} is missing: run `npm ci` (scripts/bootstrap does)")
        self._process = subprocess.Popen(
            [
                str(binary),
                "--silent",
                "--skipApiVersionCheck",  # the current SDKs send a newer service version
                "--disableTelemetry",  # otherwise it tries to reach an outside host
                "--inMemoryPersistence",
                "--blobHost",
                "127.0.0.1",
                "--blobPort",
                str(self.ports["blob"]),
                "--queueHost",
                "127.0.0.1",
                "--queuePort",
                str(self.ports["queue"]),
                "--tableHost",
                "127.0.0.1",
                "--tablePort",
                str(self.ports["table"]),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        deadline = time.monotonic() + timeout
        for port in self.ports.values():
            while not _listening(port):
                if self._process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise self._failure()
                time.sleep(0.05)
        if self._process.poll() is not None:  # every port answered, one of them someone else's
            raise self._failure()
        return self

    def _failure(self) -> RuntimeError:
        self._log.seek(0)
        log = self._log.read()[-2000:].decode(errors="replace")
        kind = _PortTaken if "EADDRINUSE" in log else RuntimeError
        return kind(f"Azurite did not start: {log}")

    def stop(self) -> None:
        if self._process and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()  # reaped here: no zombie left for a parent that exits

    def __enter__(self) -> Azurite:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _PortTaken(RuntimeError):
    """Azurite could not bind a port it was given: worth another try on fresh ones."""


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0
