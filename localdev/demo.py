"""The README's run command: the whole pipeline on this machine, no Azure account.

Starts Azurite, the loopback managed-identity endpoint, the Defender simulator (with its
fleet, printed at start) and the local Functions host (`localdev.host`, a subprocess), then
sends sample offboard requests over real HTTP and prints what happens to each. `--serve`
keeps everything running for your own curl; `--no-samples` skips the samples.

Settings, lowest to highest precedence (details in `localdev/local_settings.py`):
local.settings.sample.json, the demo's pace (seconds instead of minutes, Tier0 protected),
local.settings.json at the repo root when present, the process environment, and last the
loopback wiring (AzureWebJobsStorage for Azurite, IDENTITY_ENDPOINT and IDENTITY_HEADER,
DEFENDER_API_BASE_URL for the simulator). They are checked with the app's own
Settings.from_env before anything starts: every problem is printed, one a line, and the
exit status is 2.

The local host listens on 127.0.0.1:--port (default 7071); a port already in use is
reported before anything starts (exit status 2).

SIGTERM, SIGINT (Ctrl-C) and SIGHUP stop Azurite and the local host (the identity endpoint
and the simulator are threads of this process), with or without a terminal. The exit status
is then 0 if the samples had finished, else 128 + the signal's number.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import requests

from shared.settings import SettingsError

from .azurite import Azurite
from .defender_sim import DefenderSimulator, Reply
from .fleet import FLEET, SAMPLE_MACHINE, SHARED_NAME, fleet_table
from .graph_sim import SEEDS, GraphSimulator
from .host import LOCAL_FUNCTION_KEY, LOCAL_MASTER_KEY
from .identity import IdentityEndpoint
from .local_settings import layered, validate, wired

ROOT = Path(__file__).resolve().parent.parent
UNKNOWN_MACHINE = "2f6cd0e8f524eee8a13d3a43f529813c95e1dd18"  # not in the fleet: Defender answers 404
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def fleet_id(name: str) -> str:
    [machine_id] = [m.id for m in FLEET if m.computer_dns_name == name]
    return machine_id


THROTTLED_MACHINE = fleet_id("desktop-7f3k2.contoso.com")
MAC13_MACHINE = fleet_id("mac-finance-02.contoso.com")
TIER0_MACHINE = fleet_id("dc-02.corp.contoso.com")
BATCH = ("srv-files-01.corp.contoso.com", "lnx-build-11.corp.contoso.com")
GRAPH_SEEDS = {seed.device_name: seed.id for seed in SEEDS}


def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


class Stop(Exception):
    """A stop signal arrived; raised where the main thread was, so every `with` unwinds."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopOnSignals:
    """Turns the first SIGTERM, SIGINT or SIGHUP into `Stop`. Later ones are ignored, so a
    second Ctrl-C cannot cut the clean-up short and leave Azurite or the host running."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignals:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum
            raise Stop(signum)

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def port_number(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (0-65535)")
    return port


def port_problem(port: int) -> str | None:
    """Why the local host could not listen on 127.0.0.1:port, or None."""
    if port == 0:
        return None  # the host picks a free port
    with socket.socket() as sock:
        # As the host's HTTP server binds: a port left in TIME_WAIT is free, a listener is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"port {port} is in use; choose another with --port"
            return f"cannot listen on port {port} ({exc.strerror}); choose another with --port"
    return None


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Progress:
    samples_done: bool = False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/run-local", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--serve", action="store_true", help="keep running after the samples (Ctrl-C stops)")
    parser.add_argument("--no-samples", action="store_true", help="send no sample requests")
    parser.add_argument(
        "--port",
        type=port_number,
        default=7071,
        help="the local host's HTTP port on 127.0.0.1 (default 7071; 0 picks a free one)",
    )
    args = parser.parse_args(argv)

    azurite = Azurite()  # chooses its ports; nothing runs until start()
    try:
        env = layered()
        validate(env, azurite.connection_string)
    except SettingsError as exc:
        print("run-local: the settings are not valid:", file=sys.stderr)
        for line in exc.problems:
            print(f"  {line}", file=sys.stderr)
        return 2
    problem = port_problem(args.port)
    if problem:
        print(problem, file=sys.stderr)
        return 2

    progress = Progress()
    with StopOnSignals():
        try:
            return run(args, env, azurite, progress)
        except RuntimeError as exc:  # Azurite or a host did not start; the message says why
            print(f"run-local: {exc}", file=sys.stderr)
            return 1
        except Stop as stop:
            # Everything run() started has been stopped by the time the exception gets here.
            print(f"\n==> {stop}: stopped Azurite, the local host and the fakes", flush=True)
            return 0 if progress.samples_done else 128 + stop.signum


def run(args: argparse.Namespace, env: dict[str, str], azurite: Azurite, progress: Progress) -> int:
    with contextlib.ExitStack() as stack:
        stack.callback(azurite.stop)  # registered first: a signal during start() still stops it
        azurite.start()
        identity = stack.enter_context(IdentityEndpoint())
        # Only tokens the identity endpoint issued are accepted, as Defender would.
        defender = stack.enter_context(DefenderSimulator(accept_token=lambda token: token in identity.tokens))
        graph = stack.enter_context(GraphSimulator(accept_token=lambda token: token in identity.tokens))
        say(f"Azurite on ports {azurite.ports}")
        say(f"Managed-identity endpoint {identity.url}")
        say(f"Defender simulator {defender.url}, with its fleet (any other machine id answers 404):")
        print("\n".join(f"    {line}" for line in fleet_table().splitlines()), flush=True)
        say(f"Microsoft Graph simulator {graph.url}, with Intune devices matching the fleet")
        wiring = {
            **identity.env,
            "AzureWebJobsStorage": azurite.connection_string,
            "DEFENDER_API_BASE_URL": defender.url,
            "GRAPH_API_BASE_URL": graph.url,
        }
        host = subprocess.Popen(
            [sys.executable, "-m", "localdev.host", "--port", str(args.port)],
            cwd=ROOT,
            env=wired(env, wiring),
            stdout=subprocess.PIPE,
        )
        stack.callback(stop_process, host)
        assert host.stdout is not None
        ready = json.loads(host.stdout.readline() or b'{"ready": false}')
        if not ready.get("ready"):
            print("The local host did not start; see its log above.", file=sys.stderr)
            return 1
        base = f"http://127.0.0.1:{ready['port']}"
        say(
            f"Local Functions host serving {base}/api "
            f"(function key: {LOCAL_FUNCTION_KEY}, master key: {LOCAL_MASTER_KEY})"
        )
        if not args.no_samples:
            run_samples(base, defender, graph)
        progress.samples_done = True
        if args.serve:
            serve(base, graph.url)
            status = host.wait()
            print(f"The local host exited by itself (status {status}); see its log above.", file=sys.stderr)
            return 1
    return 0


def serve(base: str, graph: str) -> None:
    say(
        "Serving. Try:\n"
        f"    curl -i -X POST '{base}/api/offboard?code={LOCAL_FUNCTION_KEY}' \\\n"
        "         -H 'Content-Type: application/json' \\\n"
        f'         -d \'{{"machineId": "{SAMPLE_MACHINE}"}}\'\n'
        "    Any machine id or name from the fleet above works, e.g. "
        '\'{"deviceName": "srv-files-01.corp.contoso.com"}\'.\n'
        "    Retire a device in the simulated Intune; the watcher offboards it within ten seconds:\n"
        f"    curl -X POST {graph}/sim/devices/{GRAPH_SEEDS['WS-0117']}/retire\n"
        "    Run a timer function now (the admin API, master key):\n"
        f"    curl -i -X POST '{base}/admin/functions/<name>' -H 'x-functions-key: {LOCAL_MASTER_KEY}' \\\n"
        "         -H 'Content-Type: application/json' -d '{\"input\": \"\"}'\n"
        "    Ctrl-C (or SIGTERM, SIGHUP) stops everything."
    )


def follow(base: str, request_id: str, headers: dict[str, str]) -> None:
    """Poll the status route as a Logic App would, printing each new status."""
    seen = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        response = requests.get(f"{base}/api/offboard/{request_id}", headers=headers, timeout=10)
        state = response.json()
        if state["status"] != seen:
            seen = state["status"]
            error = state.get("lastError")
            extra = f"{error['code']}: {error['message']}" if error else state.get("note") or ""
            print(
                f"    GET /api/offboard/{request_id[:8]}...: {response.status_code} {seen} {extra}".rstrip()
            )
        if response.status_code == 200:
            return
        time.sleep(0.3)


def follow_batch(base: str, batch_id: str, headers: dict[str, str]) -> None:
    """Poll a batch's route, printing its counts by status whenever they change."""
    seen = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        response = requests.get(f"{base}/api/offboard/batches/{batch_id}", headers=headers, timeout=10)
        counts = response.json()["counts"]
        if counts != seen:
            seen = counts
            print(f"    GET /api/offboard/batches/{batch_id[:8]}...: {response.status_code} {counts}")
        if response.status_code == 200:
            return
        time.sleep(0.3)


def offboard(base: str, body: dict[str, str], headers: dict[str, str]) -> requests.Response:
    return requests.post(f"{base}/api/offboard", json=body, headers=headers, timeout=10)


def run_samples(base: str, defender: DefenderSimulator, graph: GraphSimulator) -> None:
    headers = {"x-functions-key": LOCAL_FUNCTION_KEY}
    say(f"POST /api/offboard for machine {SAMPLE_MACHINE} (ws-0042, Windows 11)")
    response = offboard(
        base, {"machineId": SAMPLE_MACHINE, "comment": "Offboard machine by automation"}, headers
    )
    print(f"    {response.status_code} Location: {response.headers.get('Location')}")
    print(f"    {response.text}")
    [call] = defender.wait_for_calls(1, SAMPLE_MACHINE)
    print(f"    Defender received: {call.method} {call.path}")
    print(f"    Content-Type: {call.headers.get('Content-Type')}")
    print("    Authorization: Bearer <the token the managed-identity endpoint issued>")
    print(f"    Body: {call.body.decode()}")
    follow(base, response.json()["requestId"], headers)

    say(f"Defender throttles machine {THROTTLED_MACHINE} (desktop-7f3k2) once (429, Retry-After: 3)")
    throttled = Reply.error(
        429, "TooManyRequests", "Rate limit is exceeded. Try again later.", **{"Retry-After": "3"}
    )
    defender.script(THROTTLED_MACHINE, throttled)
    offboard(base, {"machineId": THROTTLED_MACHINE}, headers)
    first, second = defender.wait_for_calls(2, THROTTLED_MACHINE, timeout=30)
    waited = second.at - first.at
    print(f"    first call answered 429; re-queued and sent again {waited:.1f}s later, answered 201")

    say(f"A macOS 13 device ({MAC13_MACHINE}, mac-finance-02) meets the precheck")
    follow(base, offboard(base, {"machineId": MAC13_MACHINE}, headers).json()["requestId"], headers)
    print(f"    offboard calls Defender received for it: {len(defender.offboard_calls(MAC13_MACHINE))}")

    say(f"A domain controller tagged Tier0 ({TIER0_MACHINE}, dc-02), with OFFBOARD_PROTECTED_TAGS")
    follow(base, offboard(base, {"machineId": TIER0_MACHINE}, headers).json()["requestId"], headers)

    say(f"By name, {SHARED_NAME}, a name two Defender records share (a re-imaged PC)")
    follow(base, offboard(base, {"deviceName": SHARED_NAME}, headers).json()["requestId"], headers)

    say(f"A machine id Defender does not know ({UNKNOWN_MACHINE}): it answers 404")
    follow(base, offboard(base, {"machineId": UNKNOWN_MACHINE}, headers).json()["requestId"], headers)

    say("A batch: two devices in one call, followed through its batch route")
    batch = {"requests": [{"deviceName": BATCH[0]}, {"deviceName": BATCH[1]}], "comment": "CHG-2024: retired"}
    answer = requests.post(f"{base}/api/offboard", json=batch, headers=headers, timeout=10).json()
    print(f"    202 batchId {answer['batchId']}: {[r['status'] for r in answer['results']]}")
    follow_batch(base, answer["batchId"], headers)

    say("Intune: an administrator retires mac-design-07; the watcher (every 10 s) offboards it")
    graph.retire(GRAPH_SEEDS["mac-design-07"], actor="intune-admin@contoso.com")
    retired = fleet_id("mac-design-07.contoso.com")
    [call] = defender.wait_for_calls(1, retired, timeout=40)
    listed = requests.get(f"{base}/api/offboard", params={"machineId": retired}, headers=headers, timeout=10)
    [request] = listed.json()["requests"]
    print(f"    request {request['requestId'][:8]}... by {request['caller']}: {request['comment']}")
    follow(base, request["requestId"], headers)

    say("Bad input is refused before anything is queued")
    response = offboard(base, {"machineId": "../admin"}, headers)
    print(f"    {response.status_code} {response.text}")
    time.sleep(0.5)  # let the host's log of the last request reach the terminal first
    say("Done: every request reached a recorded outcome.")


if __name__ == "__main__":
    sys.exit(main())
