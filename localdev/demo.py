"""The README's run command: the whole pipeline on this machine, no Azure account.

Starts Azurite, the loopback managed-identity endpoint, the Defender simulator and the local
Functions host (`localdev.host`, a subprocess), then sends sample offboard requests over real
HTTP and prints what happens to each. `--serve` keeps everything running for your own curl.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import requests

from .azurite import Azurite
from .defender_sim import DefenderSimulator, Reply
from .host import LOCAL_FUNCTION_KEY
from .identity import IdentityEndpoint

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_MACHINE = "1e5bc9d7e413ddd7902c2932e418702b84d0cc07"  # from the API reference example
THROTTLED_MACHINE = "2f6cd0e8f524eee8a13d3a43f529813c95e1dd18"
MAC_MACHINE = "3a7de1f9a635fff9b24e4b54a63a924da6f2ee29"


def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--serve", action="store_true", help="keep running after the samples (Ctrl-C stops)")
    parser.add_argument("--port", type=int, default=7071, help="local host HTTP port (default 7071)")
    args = parser.parse_args(argv)

    with Azurite() as azurite, IdentityEndpoint() as identity, DefenderSimulator() as defender:
        say(f"Azurite on ports {azurite.ports}")
        say(f"Managed-identity endpoint {identity.url}; Defender simulator {defender.url}")
        env = {
            **os.environ,
            **json.loads((ROOT / "local.settings.sample.json").read_text())["Values"],
            **identity.env,
            "AzureWebJobsStorage": azurite.connection_string,
            "DEFENDER_API_BASE_URL": defender.url,
            "OFFBOARD_RETRY_BASE_SECONDS": "2",
            # Follow the simulated action every second or two instead of every minute.
            "OFFBOARD_CHECK_INITIAL_SECONDS": "1",
            "OFFBOARD_CHECK_MAX_SECONDS": "2",
        }
        host = subprocess.Popen(
            [sys.executable, "-m", "localdev.host", "--port", str(args.port)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
        )
        try:
            assert host.stdout is not None
            ready = json.loads(host.stdout.readline() or b'{"ready": false}')
            if not ready.get("ready"):
                print("The local host did not start; see its log above.", file=sys.stderr)
                return 1
            base = f"http://127.0.0.1:{ready['port']}"
            say(f"Local Functions host serving {base}/api (function key: {LOCAL_FUNCTION_KEY})")
            run_samples(base, defender)
            if args.serve:
                say(
                    "Serving. Try:\n"
                    f"    curl -i -X POST '{base}/api/offboard?code={LOCAL_FUNCTION_KEY}' \\\n"
                    "         -H 'Content-Type: application/json' \\\n"
                    f'         -d \'{{"machineId": "{SAMPLE_MACHINE}"}}\'\n'
                    "    Ctrl-C stops everything."
                )
                with contextlib.suppress(KeyboardInterrupt):
                    host.wait()
        finally:
            host.terminate()
            host.wait(10)
    return 0


def follow(base: str, request_id: str, headers: dict[str, str]) -> None:
    """Poll the status route as a Logic App would, printing each new status."""
    seen = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        response = requests.get(f"{base}/api/offboard/{request_id}", headers=headers, timeout=10)
        state = response.json()
        if state["status"] != seen:
            seen = state["status"]
            extra = state.get("lastError") or state.get("note") or ""
            print(
                f"    GET /api/offboard/{request_id[:8]}...: {response.status_code} {seen} {extra}".rstrip()
            )
        if response.status_code == 200:
            return
        time.sleep(0.3)


def run_samples(base: str, defender: DefenderSimulator) -> None:
    headers = {"x-functions-key": LOCAL_FUNCTION_KEY}
    say(f"POST /api/offboard for machine {SAMPLE_MACHINE}")
    response = requests.post(
        f"{base}/api/offboard",
        json={"machineId": SAMPLE_MACHINE, "comment": "Offboard machine by automation"},
        headers=headers,
        timeout=10,
    )
    print(f"    {response.status_code} Location: {response.headers.get('Location')}")
    print(f"    {response.text}")
    [call] = defender.wait_for_calls(1, SAMPLE_MACHINE)
    print(f"    Defender received: {call.method} {call.path}")
    print(f"    Content-Type: {call.headers.get('Content-Type')}")
    print("    Authorization: Bearer <the token the managed-identity endpoint issued>")
    print(f"    Body: {call.body.decode()}")
    follow(base, response.json()["requestId"], headers)

    say(f"Defender throttles machine {THROTTLED_MACHINE} once (429, Retry-After: 3)")
    defender.script(THROTTLED_MACHINE, Reply.error(429, "TooManyRequests", **{"Retry-After": "3"}))
    requests.post(f"{base}/api/offboard", json={"machineId": THROTTLED_MACHINE}, headers=headers, timeout=10)
    first, second = defender.wait_for_calls(2, THROTTLED_MACHINE, timeout=30)
    waited = second.at - first.at
    print(f"    first call answered 429; re-queued and sent again {waited:.1f}s later, answered 201")

    say(f"A macOS device ({MAC_MACHINE}) is refused by the precheck, before any offboard call")
    defender.add_machine(MAC_MACHINE, osPlatform="macOS", version="14.1")
    response = requests.post(
        f"{base}/api/offboard", json={"machineId": MAC_MACHINE}, headers=headers, timeout=10
    )
    follow(base, response.json()["requestId"], headers)

    say("Bad input is refused before anything is queued")
    response = requests.post(
        f"{base}/api/offboard", json={"machineId": "../admin"}, headers=headers, timeout=10
    )
    print(f"    {response.status_code} {response.text}")
    time.sleep(0.5)  # let the host's log of the last request reach the terminal first
    say("Done: every request reached a recorded outcome.")


if __name__ == "__main__":
    sys.exit(main())
