"""The operator command end to end: the real local Functions host over real HTTP, on real
Azurite, with the Defender simulator and the managed-identity endpoint. The command runs as
a subprocess (`python -m offboard_cli`, and `scripts/offboard`) or in-process through its
`main()`, never with any of its parts replaced.

Two hosts serve the whole module (each test uses its own machines): `service`, whose
breaker is out of the way, and `holding`, where OFFBOARD_APPROVAL=always holds every request
for an operator. Every run is checked for the keys: they never appear in what it prints.
One test starts `scripts/run-local --serve` itself, for the banner an operator reads first.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import pty
import re
import secrets
import select
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
import requests

from localdev.azurite import Azurite, free_port
from localdev.defender_sim import DefenderSimulator
from localdev.host import LOCAL_FUNCTION_KEY, LOCAL_MASTER_KEY, launch
from localdev.identity import IdentityEndpoint
from localdev.loopback import LoopbackServer, QuietHandler
from offboard_cli.cli import main
from offboard_cli.commands import AUDIT_COLUMNS
from offboard_cli.submit import RESULT_COLUMNS
from shared.domain.statuses import Status

ROOT = Path(__file__).resolve().parent.parent
WRONG_KEY = "not-the-key-Zq81x0Pw=="  # what an operator might mistype; never to be shown
KEYS = (LOCAL_FUNCTION_KEY, LOCAL_MASTER_KEY, WRONG_KEY)
ESCAPE = "\x1b"


@dataclass
class Host:
    url: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path


@dataclass
class Stack:
    defender: DefenderSimulator
    service: Host
    holding: Host


def _start(azurite: Azurite, identity: IdentityEndpoint, defender: DefenderSimulator, **extra: str) -> Host:
    name = f"cli{uuid.uuid4().hex[:12]}"
    settings = {
        **azurite.app_storage(name),
        "DEFENDER_API_BASE_URL": defender.url,
        "DEFENDER_API_SCOPE": "https://api.securitycenter.microsoft.com/.default",
        # Follow the simulated actions every second or two (tests/conftest.py's app_env).
        "OFFBOARD_CHECK_INITIAL_SECONDS": "1",
        "OFFBOARD_CHECK_MAX_SECONDS": "2",
        "OFFBOARD_RETRY_BASE_SECONDS": "1",
        "OFFBOARD_RETRY_MAX_SECONDS": "2",
        "DEFENDER_READ_TIMEOUT_SECONDS": "2",
        "INTUNE_WATCH_SCHEDULE": "0 */5 * * * *",  # a timer's schedule setting must be set
        **identity.env,
        **extra,
    }
    process, port, log = launch({**os.environ, **settings}, "--no-timers", log_prefix="cli-host-")
    assert port is not None
    return Host(f"http://127.0.0.1:{port}", port, process, log)


@pytest.fixture(scope="module")
def stack(azurite: Azurite) -> Iterator[Stack]:
    # Random machine ids are onboarded Windows 11 PCs (accept_any), as in tests/conftest.py.
    with (
        IdentityEndpoint() as identity,
        DefenderSimulator(accept_token=lambda t: t in identity.tokens, accept_any=True) as defender,
    ):
        hosts: list[Host] = []
        try:
            hosts.append(_start(azurite, identity, defender, OFFBOARD_BREAKER_LIMIT="1000"))
            hosts.append(_start(azurite, identity, defender, OFFBOARD_APPROVAL="always"))
            yield Stack(defender, *hosts)
        finally:
            for host in hosts:
                host.process.terminate()
                host.process.wait(10)
                if os.environ.get("SHOW_HOST_LOGS"):
                    print(host.log.read_text(errors="replace"))
                host.log.unlink(missing_ok=True)


# ---- running the command ---------------------------------------------------------------------


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)

    @property
    def text(self) -> str:
        return self.stdout + self.stderr


def no_keys(*texts: str) -> None:
    for text in texts:
        for key in KEYS:
            assert key not in text, "a key was shown"


def env_for(host: Host, **extra: str) -> dict[str, str]:
    return {"OFFBOARD_URL": host.url, "OFFBOARD_KEY": LOCAL_FUNCTION_KEY, **extra}


def cli(host: Host | None, *args: str, stdin: bytes = b"", **env: str) -> Run:
    """The command in this process, through its main()."""
    out, err = io.StringIO(), io.StringIO()
    environ = {**(env_for(host) if host else {}), **env}
    code = main(list(args), environ=environ, stdin=io.BytesIO(stdin), stdout=out, stderr=err)
    run = Run(code, out.getvalue(), err.getvalue())
    no_keys(run.stdout, run.stderr)
    assert "Traceback" not in run.stderr
    return run


def process_env(host: Host | None, **extra: str) -> dict[str, str]:
    # Colour forced on, as some CI runners do: off a terminal the output must stay plain anyway.
    env = {k: v for k, v in os.environ.items() if not k.startswith("OFFBOARD_")}
    env.update({"FORCE_COLOR": "1", "TERM": "xterm-256color", "PYTHONPATH": str(ROOT)})
    if host is not None:
        env.update(env_for(host))
    env.update(extra)
    return env


def cli_process(host: Host | None, *args: str, stdin: bytes = b"", launcher: bool = False, **env: str) -> Run:
    """The command as a subprocess, with no terminal (a new session: no /dev/tty to prompt on)."""
    command = (
        ["bash", str(ROOT / "scripts" / "offboard")] if launcher else [sys.executable, "-m", "offboard_cli"]
    )
    done = subprocess.run(
        [*command, *args],
        cwd=ROOT,
        env=process_env(host, **env),
        input=stdin,
        capture_output=True,
        timeout=90,
        start_new_session=True,
    )
    run = Run(done.returncode, done.stdout.decode(), done.stderr.decode())
    no_keys(run.stdout, run.stderr)
    assert ESCAPE not in run.stdout and ESCAPE not in run.stderr, "escape codes off a terminal"
    assert "Traceback" not in run.stderr
    return run


def machine() -> str:
    return secrets.token_hex(20)


def results(path: Path) -> list[dict[str, str]]:
    text = path.read_text()
    no_keys(text)
    lines = list(csv.reader(io.StringIO(text)))
    assert tuple(lines[0]) == RESULT_COLUMNS
    return [dict(zip(RESULT_COLUMNS, line, strict=True)) for line in lines[1:]]


# ---- submit ----------------------------------------------------------------------------------


def test_a_csv_is_submitted_once_and_running_it_again_creates_nothing_new(
    stack: Stack, tmp_path: Path
) -> None:
    first, second, named = machine(), machine(), machine()
    name = f"pc-{named[:8]}.contoso.com"
    stack.defender.add_machine(named, computer_dns_name=name)
    devices = tmp_path / "devices.csv"
    devices.write_text(
        f"machineId,deviceName,comment\n{first.upper()},,row comment\n,{name},\n{second},,\n",
        encoding="utf-8",
    )
    out = tmp_path / "results.csv"

    run = cli(stack.service, "submit", str(devices), "--comment", "IR-7: lost laptops", "--out", str(out))
    assert run.code == 0, run.text
    rows = results(out)
    assert [(r["row"], r["input"], r["status"]) for r in rows] == [
        ("2", first.upper(), "Queued"),
        ("3", name, "Queued"),
        ("4", second, "Queued"),
    ]
    assert rows[0]["machineId"] == first and rows[1]["machineId"] == ""  # resolved later, by name
    request_ids = [r["requestId"] for r in rows]
    assert len(set(request_ids)) == 3

    again = cli(
        stack.service, "--json", "submit", str(devices), "--comment", "IR-7: lost laptops", "--out", str(out)
    )
    assert again.code == 0, again.text
    document = again.json()
    # No request was created: the run's one batch lists the first run's requests.
    [replayed_batch] = document["batchIds"]
    listed = cli(stack.service, "--json", "status", replayed_batch).json()["requests"]
    assert sorted(v["requestId"] for v in listed) == sorted(request_ids)
    assert [r["replayed"] for r in document["rows"]] == [True] * 3
    statuses = {s.value for s in Status}
    assert all(r["status"] in statuses for r in document["rows"]), document["rows"]  # not `replayed`
    assert [r["requestId"] for r in results(out)] == request_ids
    assert all(r["status"] in statuses for r in results(out))

    shown = cli(stack.service, "--json", "status", *request_ids).json()["requests"]
    assert [v["comment"] for v in shown] == ["row comment", "IR-7: lost laptops", "IR-7: lost laptops"]
    assert {v["batchId"] for v in shown} == {request_ids[0][:-3] + "000"}


def test_a_re_run_shows_each_replayed_rows_current_status(stack: Stack, tmp_path: Path) -> None:
    """The service answers a replay with the first answer (Queued, the name as named); the
    command reads the current views, one call per batch, and invents no transition."""
    device, named = machine(), machine()
    name = f"pc-{named[:8]}.contoso.com"
    stack.defender.add_machine(named, computer_dns_name=name)
    devices = tmp_path / "devices.txt"
    devices.write_text(f"{device}\n{name}\n")
    first = cli(stack.service, "submit", str(devices), "--dry-run", "--wait", "--interval", "0.5")
    assert first.code == 0 and "final: 2 DryRun\n" in first.stdout, first.text

    with AnswerLosingProxy(stack.service.url, lose=0) as proxy:
        where: dict[str, Any] = {"OFFBOARD_URL": proxy.url, "OFFBOARD_KEY": LOCAL_FUNCTION_KEY}
        out = tmp_path / "results.csv"
        again = cli(None, "--json", "submit", str(devices), "--dry-run", "--out", str(out), **where)
        reads = [path for method, path, _ in proxy.seen if method == "GET"]
    assert again.code == 0, again.text
    rows = again.json()["rows"]
    assert [(r["status"], r["requestStatus"], r["final"], r["replayed"]) for r in rows] == [
        ("DryRun", "DryRun", True, True)
    ] * 2
    assert [r["machineId"] for r in rows] == [device, named]  # the name's machine, once resolved
    assert again.json()["counts"] == {"DryRun": 2}
    assert [(r["status"], r["machineId"]) for r in results(out)] == [("DryRun", device), ("DryRun", named)]
    [batch_id] = again.json()["batchIds"]
    assert reads == [f"/api/offboard/batches/{batch_id}"]  # one call for the batch, none per request

    waited = cli(stack.service, "submit", str(devices), "--dry-run", "--wait")
    assert waited.code == 0, waited.text
    assert " -> " not in waited.stdout  # nothing changed during this run
    assert "waiting for" not in waited.stdout  # nothing left to wait for
    assert "batch 1/1: 2 replayed\n" in waited.stdout
    assert "final: 2 DryRun; 2 replayed (sent by an earlier run of this file, no new request)\n" in (
        waited.stdout
    )
    table = [line for line in waited.stdout.splitlines() if line.startswith(("1 ", "2 "))]
    assert len(table) == 2
    assert all(" DryRun " in line and "replayed: an earlier run sent it" in line for line in table)


def test_a_device_named_twice_in_a_file_is_a_bad_row(stack: Stack, tmp_path: Path) -> None:
    device, named = machine(), machine()
    name = f"pc-{named[:8]}.contoso.com"
    stack.defender.add_machine(named, computer_dns_name=name)
    devices = tmp_path / "devices.csv"
    devices.write_text(f"machineId,deviceName\n{device},\n,{name}\n{device.upper()},\n,{name.upper()}\n")
    refused = cli(stack.service, "submit", str(devices))
    assert refused.code == 2
    assert f"line 4: DuplicateDevice: the same device as line 2 (input '{device.upper()}')" in refused.stderr
    assert f"line 5: DuplicateDevice: the same device as line 3 (input '{name.upper()}')" in refused.stderr
    assert "2 of 4 rows cannot be sent; nothing was sent" in refused.stderr

    out = tmp_path / "results.csv"
    skipped = cli(stack.service, "submit", str(devices), "--skip-invalid", "--out", str(out))
    assert skipped.code == 1
    assert [(r["row"], r["status"], r["errorCode"]) for r in results(out)] == [
        ("2", "Queued", ""),
        ("3", "Queued", ""),
        ("4", "Invalid", "DuplicateDevice"),
        ("5", "Invalid", "DuplicateDevice"),
    ]
    assert "DuplicateRequest" not in skipped.text and "RequestBeingAccepted" not in skipped.text


def test_stdin_with_wait_prints_one_plain_line_per_change_and_succeeds(stack: Stack, tmp_path: Path) -> None:
    device, named = machine(), machine()
    name = f"ws-{named[:6]}.corp.contoso.com"
    stack.defender.add_machine(named, computer_dns_name=name)
    listing = f"# from the CMDB\n{device}\n\n{name}   # Bob's laptop\n".encode()
    out = tmp_path / "results.csv"

    run = cli_process(
        stack.service, "submit", "-", "--wait", "--interval", "1", "--out", str(out), stdin=listing
    )
    assert run.code == 0, run.text
    changes = [line for line in run.stdout.splitlines() if " -> " in line]
    assert any(f"line 2 {device}: Queued -> " in line for line in changes), run.stdout
    assert any(line.endswith("-> Succeeded") and f"line 4 {named}" in line for line in changes), run.stdout
    assert "final: 2 Succeeded\n" in run.stdout
    assert [(r["row"], r["status"]) for r in results(out)] == [("2", "Succeeded"), ("4", "Succeeded")]
    assert results(out)[1]["machineId"] == named
    assert len(stack.defender.offboard_calls(device)) == len(stack.defender.offboard_calls(named)) == 1


def test_a_file_with_bad_rows_is_refused_whole_with_their_line_numbers(stack: Stack, tmp_path: Path) -> None:
    good = machine()
    listing = tmp_path / "hosts.txt"
    listing.write_text(f"{good}\n\nbad name!\n{good[:-1]}\n00000000-0000-0000-0000-000000000000\n")

    refused = cli(stack.service, "submit", str(listing))
    assert refused.code == 2
    errors = refused.stderr.splitlines()
    assert any("line 3: UnknownIdentifier" in e and "'bad name!'" in e for e in errors), refused.stderr
    assert any("line 4: UnknownIdentifier: 39 hexadecimal characters" in e for e in errors)
    assert any("line 5: InvalidAadDeviceId" in e for e in errors)
    assert "3 of 4 rows cannot be sent; nothing was sent" in refused.stderr

    # With --json the bad rows are in the document too, not only on stderr.
    as_json = cli(stack.service, "--json", "submit", str(listing))
    assert as_json.code == 2
    error = as_json.json()["error"]
    assert error["code"] == "InvalidRows" and "3 of 4 rows cannot be sent" in error["message"]
    assert [(r["row"], r["input"], r["errorCode"]) for r in error["rows"]] == [
        (3, "bad name!", "UnknownIdentifier"),
        (4, good[:-1], "UnknownIdentifier"),
        (5, "00000000-0000-0000-0000-000000000000", "InvalidAadDeviceId"),
    ]
    assert all(r["errorMessage"] for r in error["rows"])

    out = tmp_path / "results.csv"
    skipped = cli(stack.service, "submit", str(listing), "--skip-invalid", "--out", str(out))
    assert skipped.code == 1  # not every row was accepted
    assert [(r["row"], r["status"], r["errorCode"]) for r in results(out)] == [
        ("1", "Queued", ""),  # not `replayed`: the refused run sent nothing
        ("3", "Invalid", "UnknownIdentifier"),
        ("4", "Invalid", "UnknownIdentifier"),
        ("5", "Invalid", "InvalidAadDeviceId"),
    ]


def test_rows_the_service_refuses_exit_1_and_say_why(stack: Stack, tmp_path: Path) -> None:
    """Dry runs (quick to end): the service checks them as it checks real requests."""
    devices = tmp_path / "devices.txt"
    devices.write_text(f"{machine()}\nnowhere-{machine()[:6]}.contoso.com\n")
    dry = ("submit", str(devices), "--dry-run")
    assert cli(stack.service, *dry, "--comment", "first").code == 0

    # The same file with another comment: the same idempotency keys for other requests.
    # Refused at intake, so no request: `Refused`, not a request's `Rejected`.
    refused = tmp_path / "refused.csv"
    other = cli(stack.service, *dry, "--comment", "second", "--out", str(refused))
    assert other.code == 1
    assert other.stdout.count("IdempotencyKeyReused") == 2
    assert [(r["status"], r["requestId"]) for r in results(refused)] == [("Refused", "")] * 2
    assert "sent: 2 Refused\n" in other.stdout
    # The note names only what can cause it: the key holds the file and the dry-run mode.
    assert "sent before as other requests: with another --comment" in other.stderr
    assert "OFFBOARD_DRY_RUN" in other.stderr and "tenant" not in other.stderr

    # Followed to the end: a name Defender does not know fails, and so does the run.
    out = tmp_path / "results.csv"
    waited = cli(stack.service, *dry, "--comment", "first", "--wait", "--interval", "0.5", "--out", str(out))
    assert waited.code == 1
    done, failed = results(out)
    assert done["status"] == "DryRun"
    assert (failed["status"], failed["errorCode"]) == ("Failed", "DeviceNotFound")
    assert "no Defender machine" in failed["errorMessage"]


def test_a_batch_whose_answer_was_lost_is_sent_again_and_makes_no_second_request(
    stack: Stack, tmp_path: Path
) -> None:
    """A proxy forwards the first POST to the service, then answers the command 502 (a gateway
    that lost the answer): the command retries with the same keys and gets the same requests."""
    with AnswerLosingProxy(stack.service.url, lose=1) as proxy:
        devices = tmp_path / "devices.txt"
        device = machine()
        devices.write_text(f"{device}\n")
        run = cli(
            None, "submit", str(devices), "--json", OFFBOARD_URL=proxy.url, OFFBOARD_KEY=LOCAL_FUNCTION_KEY
        )
    assert run.code == 0, run.text
    assert proxy.posts == 2 and proxy.lost == 1
    # The key travels in its header only, never in a URL. The replayed row's current view is
    # read from its batch.
    assert proxy.seen == [
        *[("POST", "/api/offboard", LOCAL_FUNCTION_KEY)] * 2,
        ("GET", f"/api/offboard/batches/{run.json()['batchIds'][0]}", LOCAL_FUNCTION_KEY),
    ]
    [row] = run.json()["rows"]
    assert row["replayed"] is True  # the service had it from the lost answer
    listed = cli(stack.service, "--json", "status", row["requestId"]).json()["requests"]
    assert [v["machineId"] for v in listed] == [device]


def fake_jwt(claims: dict[str, str]) -> str:
    """A token shaped like a JWT (header.claims.signature), signed by no one: built here, so
    that nothing committed looks like a real token."""

    def part(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).decode().rstrip("=")

    header = json.dumps({"typ": "JWT"}).encode()
    return ".".join((part(header), part(json.dumps(claims).encode()), part(secrets.token_bytes(16))))


def test_behind_app_service_authentication_the_token_goes_with_every_call_and_is_never_shown(
    stack: Stack, tmp_path: Path
) -> None:
    token = fake_jwt({"aud": "api://offboard"})
    devices = tmp_path / "devices.txt"
    devices.write_text(f"{machine()}\n")
    with AnswerLosingProxy(stack.service.url, lose=0, token=token) as gate:
        where: dict[str, Any] = {"OFFBOARD_URL": gate.url, "OFFBOARD_KEY": LOCAL_FUNCTION_KEY}
        refused = cli(None, "submit", str(devices), **where)
        assert refused.code == 3  # no token: the platform refuses before the app sees it
        run = cli(None, "submit", str(devices), "--wait", **where, OFFBOARD_TOKEN=token)
        bad = cli(None, "held", **where, OFFBOARD_TOKEN="not a token")
    assert run.code == 0, run.text
    assert token not in run.text and token not in refused.text
    assert bad.code == 2 and "OFFBOARD_TOKEN is not an access token" in bad.stderr


# ---- exit 3 ----------------------------------------------------------------------------------


def test_a_wrong_key_exits_3_and_is_never_shown(stack: Stack, tmp_path: Path) -> None:
    devices = tmp_path / "devices.txt"
    devices.write_text(f"{machine()}\n")
    out = tmp_path / "results.csv"
    run = cli(stack.service, "submit", str(devices), "--out", str(out), OFFBOARD_KEY=WRONG_KEY)
    assert run.code == 3
    assert "refused the function key (401)" in run.stderr
    assert [r["status"] for r in results(out)] == ["NotSent"]
    as_json = cli_process(stack.service, "--json", "status", str(uuid.uuid4()), OFFBOARD_KEY=WRONG_KEY)
    assert as_json.code == 3 and as_json.json()["error"]["code"] == "KeyRefused"


def test_an_unreachable_service_exits_3_and_says_how_to_resume(tmp_path: Path) -> None:
    devices = tmp_path / "devices.txt"
    devices.write_text(f"{machine()}\n")
    port = free_port()  # nothing listens there
    run = cli(None, "submit", str(devices), "--local", "--port", str(port), "--retries", "1", "--wait")
    assert run.code == 3
    assert f"could not reach http://127.0.0.1:{port}: Connection refused (after 2 tries)" in run.stderr
    assert f"scripts/offboard submit {devices} --local --port {port} --retries 1 --wait" in run.stderr


# ---- held requests: Ctrl-C, release, resume --------------------------------------------------


def test_ctrl_c_stops_waiting_and_the_same_command_resumes_after_release(
    stack: Stack, tmp_path: Path
) -> None:
    devices = tmp_path / "devices.txt"
    wanted = [machine(), machine()]
    devices.write_text("".join(f"{m}\n" for m in wanted))
    args = ["submit", str(devices), "--wait", "--interval", "0.5", "--out", str(tmp_path / "results.csv")]
    waiting = subprocess.Popen(
        [sys.executable, "-m", "offboard_cli", *args],
        cwd=ROOT,
        env=process_env(stack.holding),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    assert waiting.stdout is not None
    seen = []
    for line in waiting.stdout:
        seen.append(line.decode())
        if line.startswith(b"waiting for 2 requests"):
            break
    assert "2 Held" in seen[-1], seen  # OFFBOARD_APPROVAL=always: an operator must release them
    time.sleep(1)
    waiting.send_signal(signal.SIGINT)
    rest, errors = waiting.communicate(timeout=20)
    assert waiting.returncode == 130
    said = "".join(seen) + rest.decode() + errors.decode()
    no_keys(said)
    assert "Stopped waiting; nothing was cancelled." in said
    assert "not final: 2 still Held\n" in said and "final: 2 Held" not in said
    assert "2 requests held: an operator releases them" in said
    assert "scripts/offboard " + " ".join(args) in said
    held_ids = [r["requestId"] for r in results(tmp_path / "results.csv")]
    assert [r["status"] for r in results(tmp_path / "results.csv")] == ["Held", "Held"]

    # Releasing takes the master key: a function key is refused, and not shown.
    refused = cli(stack.holding, "release", "--all", OFFBOARD_ADMIN_KEY=LOCAL_FUNCTION_KEY)
    assert refused.code == 3 and "refused the master key (401)" in refused.stderr
    released = cli(stack.holding, "--json", "release", "--all", OFFBOARD_ADMIN_KEY=LOCAL_MASTER_KEY)
    assert released.code == 0, released.text
    assert set(held_ids) <= set(released.json()["released"])

    resumed = cli(stack.holding, *args)
    assert resumed.code == 0, resumed.text
    assert "replayed: an earlier run sent it" in resumed.stdout
    assert [r["status"] for r in results(tmp_path / "results.csv")] == ["Succeeded", "Succeeded"]
    assert [r["requestId"] for r in results(tmp_path / "results.csv")] == held_ids
    for device in wanted:
        assert len(stack.defender.offboard_calls(device)) == 1


def test_release_one_request_by_id(stack: Stack, tmp_path: Path) -> None:
    devices = tmp_path / "devices.txt"
    devices.write_text(f"{machine()}\n")
    [row] = cli(stack.holding, "--json", "submit", str(devices)).json()["rows"]
    assert row["status"] == "Held"
    released = cli(stack.holding, "release", row["requestId"], OFFBOARD_ADMIN_KEY=LOCAL_MASTER_KEY)
    assert released.code == 0 and f"released {row['requestId']}" in released.stdout
    again = cli(stack.holding, "release", row["requestId"], OFFBOARD_ADMIN_KEY=LOCAL_MASTER_KEY)
    assert again.code == 1 and "RequestNotHeld" in again.stderr
    status = cli(stack.holding, "--json", "status", row["requestId"]).json()["requests"][0]
    assert status["releasedBy"] and status["status"] != "Held"


# ---- reading back ----------------------------------------------------------------------------


def test_status_and_audit(stack: Stack, tmp_path: Path) -> None:
    devices = tmp_path / "devices.txt"
    devices.write_text(f"{machine()}\n")
    [row] = cli(stack.service, "--json", "submit", str(devices), "--dry-run").json()["rows"]
    request_id, batch_id = row["requestId"], row["requestId"][:-3] + "000"
    assert row["clientRequestId"].startswith("cli-dry:")

    status = cli(stack.service, "status", request_id)
    assert status.code == 0 and request_id in status.stdout
    batch = cli(stack.service, "--json", "status", batch_id).json()
    assert [v["requestId"] for v in batch["requests"]] == [request_id]
    assert batch["batches"][0]["total"] == 1
    missing = cli(stack.service, "status", request_id[:-3] + "fff")
    assert missing.code == 1 and "RequestNotFound" in missing.stderr
    assert cli(stack.service, "status", "not-a-request").code == 2

    trail = cli(stack.service, "--json", "audit", "--request", request_id).json()
    assert trail["requestId"] == request_id
    assert [e["event"] for e in trail["events"]][:2] == ["Received", "Queued"]
    assert all(e["caller"].startswith("agent:offboard-cli/") for e in trail["events"] if "caller" in e)
    table = cli(stack.service, "audit", "--request", request_id)
    assert table.code == 0 and "Received" in table.stdout

    out = tmp_path / "audit.csv"
    since = cli_process(stack.service, "audit", "--since", "10m", "--out", str(out))
    assert since.code == 0, since.text
    text = out.read_text()
    no_keys(text)
    lines = list(csv.reader(io.StringIO(text)))
    assert tuple(lines[0]) == AUDIT_COLUMNS
    assert any(line[1] == request_id and line[2] == "Received" for line in lines[1:])


def test_list_with_filters(stack: Stack, tmp_path: Path) -> None:
    device = machine()
    devices = tmp_path / "devices.txt"
    devices.write_text(f"{device}\n")
    [row] = cli(stack.service, "--json", "submit", str(devices)).json()["rows"]
    by_machine = cli(stack.service, "--json", "list", "--machine", device)
    assert by_machine.code == 0, by_machine.text
    assert [v["requestId"] for v in by_machine.json()["requests"]] == [row["requestId"]]
    by_batch = cli(stack.service, "list", "--batch", row["requestId"][:-3] + "000", "--since", "1h")
    assert by_batch.code == 0 and row["requestId"] in by_batch.stdout
    assert by_batch.stdout.startswith("1 request, newest first\n")
    # No match: the answer names the window it looked in.
    other = machine()
    none = cli(stack.service, "list", "--machine", other)
    assert none.code == 0
    assert none.stdout == (
        f"no requests match: machineId={other}, created in the last 7 days "
        "(--since for longer, e.g. --since 30d)\n"
    )
    since = cli(stack.service, "list", "--status", "Expired", "--since", "2026-01-01T00:00:00Z")
    assert "no requests match: status=Expired, created since 2026-01-01T00:00:00Z\n" in since.stdout


def test_held_shows_why_over_every_page(stack: Stack, tmp_path: Path) -> None:
    """More held requests than one page of the list route (100): `next` is followed."""
    devices = tmp_path / "devices.txt"
    devices.write_text("".join(f"{machine()}\n" for _ in range(101)))
    sent = cli(stack.holding, "--json", "submit", str(devices)).json()["rows"]
    assert {r["status"] for r in sent} == {"Held"}
    held = cli(stack.holding, "--json", "held")
    assert held.code == 0, held.text
    listed = {v["requestId"]: v for v in held.json()["requests"]}
    assert {r["requestId"] for r in sent} <= set(listed)
    assert listed[sent[0]["requestId"]]["heldReason"]["code"]
    table = cli(stack.holding, "held")
    assert sent[0]["requestId"] in table.stdout and "why held" in table.stdout


def test_held_shows_who_asked_the_comment_and_why(stack: Stack, tmp_path: Path) -> None:
    """An approver decides from the `held` table alone: the request's caller, its comment,
    and the reason it is held."""
    devices = tmp_path / "devices.csv"
    comment = f"IR-{secrets.token_hex(3)}: leaver, laptop not returned"
    devices.write_text(f'machineId,comment\n{machine()},"{comment}"\n')
    [row] = cli(stack.holding, "--json", "submit", str(devices)).json()["rows"]
    table = cli(stack.holding, "held")
    assert table.code == 0, table.text
    header = table.stdout.splitlines()[1]
    assert header.split() == ["requestId", "device", "held", "since", "caller", "comment", "why", "held"]
    [line] = [line for line in table.stdout.splitlines() if line.startswith(row["requestId"])]
    assert "agent:offboard-cli/" in line and comment in line
    assert "ApprovalRequired: OFFBOARD_APPROVAL=always" in line


# ---- the command line itself -----------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["submit"], ["status"], ["list"], ["held"], ["release"], ["audit"]])
def test_help_everywhere_with_examples(command: list[str]) -> None:
    run = cli(None, *command, "--help")
    assert run.code == 0 and run.stderr == ""
    assert "examples:" in run.stdout and "scripts/offboard" in run.stdout


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["submit", "/nonexistent/devices.csv"], "cannot read /nonexistent/devices.csv: No such file"),
        (["--key=" + WRONG_KEY, "held"], "--key takes no value"),
        (["held", "--ke=" + WRONG_KEY], "--key takes no value"),
        (["list", "--status"], "argument --status: expected one argument"),
        (["list", "--since", "yesterday"], "--since 'yesterday' is not a time"),
        (["list", "--status", "Done"], "--status 'Done' is not a status"),
        (["release"], "release needs the ids of the held requests to release (`scripts/offboard held`"),
        (["release", "--all", str(uuid.uuid4())], "release takes request ids or --all, not both"),
        (["status", "--local", "--url", "https://x.example", str(uuid.uuid4())], "--local and --url"),
        (["submit", "-", "--out", "/nonexistent/r.csv"], "the folder /nonexistent does not exist"),
        (["--url", "http://contoso.example", "held"], "must be https://"),
    ],
)
def test_bad_usage_is_one_clear_line_and_exit_2(args: list[str], says: str) -> None:
    """Nothing is sent (the URL leads nowhere), so each is refused before any request."""
    run = cli(None, *args, OFFBOARD_URL="https://contoso-offboard.invalid", OFFBOARD_KEY=LOCAL_FUNCTION_KEY)
    assert run.code == 2
    assert says in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr


def test_without_a_service_it_says_what_to_set() -> None:
    run = cli(None, "held")
    assert run.code == 2
    assert run.stderr == "offboard: no service: give --url URL, set OFFBOARD_URL, or use --local\n"


def test_without_a_key_or_a_terminal_it_says_what_to_set(stack: Stack) -> None:
    run = cli_process(None, "held", OFFBOARD_URL=stack.service.url)
    assert run.code == 2
    assert (
        run.stderr.strip()
        == "offboard: no function key: set OFFBOARD_KEY (there is no terminal to prompt on)"
    )


def test_the_launcher_runs_the_command(stack: Stack, tmp_path: Path) -> None:
    devices = tmp_path / "devices.txt"
    devices.write_text(f"{machine()}\n")
    run = cli_process(
        None, "--local", "--port", str(stack.service.port), "submit", str(devices), launcher=True
    )
    assert run.code == 0, run.text
    assert f"{devices}: 1 row (list), 1 to send in 1 batch\n" in run.stdout
    assert "sent: 1 Queued\n" in run.stdout


def test_the_launcher_sets_up_python_only_and_never_needs_node(tmp_path: Path) -> None:
    """An operator who only talks to Azure has no Node: `scripts/offboard` runs
    `scripts/bootstrap --python`; the full bootstrap (run-local, tests) still installs
    Azurite, once. In a copy of the repository's layout that shares this .venv (already up to
    date) and has no node_modules, with an `npm` that records its calls."""
    copy = tmp_path / "repo"
    (copy / "scripts").mkdir(parents=True)
    for script in ("bootstrap", "offboard"):
        (copy / "scripts" / script).write_bytes((ROOT / "scripts" / script).read_bytes())
        (copy / "scripts" / script).chmod(0o755)
    for name in ("requirements.txt", "requirements-dev.txt", "package-lock.json"):
        (copy / name).write_bytes((ROOT / name).read_bytes())
    for name in (".venv", "offboard_cli", "shared"):
        (copy / name).symlink_to(ROOT / name)
    tools = tmp_path / "bin"
    tools.mkdir()
    calls = tmp_path / "npm-calls"
    (tools / "npm").write_text(f'#!/bin/sh\necho "$@" >> {calls}\nmkdir -p node_modules\n')
    (tools / "npm").chmod(0o755)
    env = {**os.environ, "PATH": f"{tools}:{os.environ['PATH']}"}

    def run(*command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)

    launched = run(str(copy / "scripts" / "offboard"), "--version")
    assert launched.returncode == 0, launched.stderr
    assert launched.stdout.startswith("scripts/offboard ")
    assert not calls.exists(), "the launcher ran npm"
    assert run(str(copy / "scripts" / "bootstrap"), "--python").returncode == 0 and not calls.exists()

    for _ in range(2):  # the full set-up installs Azurite, and only when package-lock.json changed
        full = run(str(copy / "scripts" / "bootstrap"))
        assert full.returncode == 0, full.stderr
    assert calls.read_text().split("\n")[:-1] == ["ci --no-audit --no-fund --loglevel=error"]
    wrong = run(str(copy / "scripts" / "bootstrap"), "--node")
    assert wrong.returncode == 2 and "usage: scripts/bootstrap [--python]" in wrong.stderr


def test_run_local_names_both_local_keys_and_the_command_uses_them(tmp_path: Path) -> None:
    """The banner of `scripts/run-local --serve` names the function key and the master key
    (release needs it); `--local` with its port reaches that stack with them."""
    log = tmp_path / "run-local.log"
    with log.open("wb") as sink:
        stack = subprocess.Popen(
            [str(ROOT / "scripts" / "run-local"), "--serve", "--no-samples", "--port", "0"],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        banner = None
        while banner is None and time.monotonic() < deadline and stack.poll() is None:
            banner = re.search(
                r"Local Functions host serving http://127\.0\.0\.1:(\d+)/api (.*)", log.read_text()
            )
            time.sleep(0.1)
        assert banner is not None, log.read_text()[-3000:]
        assert banner.group(2) == f"(function key: {LOCAL_FUNCTION_KEY}, master key: {LOCAL_MASTER_KEY})"
        port = banner.group(1)
        held = cli_process(None, "--local", "--port", port, "held")
        assert held.code == 0 and held.stdout == "no held requests\n", held.text
        released = cli_process(None, "--local", "--port", port, "release", "--all")
        assert released.code == 0 and released.stdout == "released 0 requests\n", released.text
    finally:
        os.killpg(stack.pid, signal.SIGTERM)
        stack.wait(30)


# ---- on a terminal -----------------------------------------------------------------------------


def on_terminal(args: list[str], env: dict[str, str], typed: str | None = None, prompt: bytes = b"") -> Run:
    """The command with a terminal of its own (a pty as its controlling tty, stdin and stdout):
    `typed` is written once `prompt` has been shown. Returns what the terminal showed."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: becomes the command
        os.chdir(ROOT)
        os.execve(sys.executable, [sys.executable, "-m", "offboard_cli", *args], env)  # noqa: S606 - our command
    shown = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            shown += chunk
            if typed is not None and prompt in shown:
                os.write(fd, typed.encode() + b"\r")
                typed = None
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return Run(os.waitstatus_to_exitcode(status), shown.decode(errors="replace"), "")


def test_a_key_typed_at_the_prompt_is_not_echoed(stack: Stack, tmp_path: Path) -> None:
    devices = tmp_path / "devices.txt"
    devices.write_text(f"{machine()}\n")
    env = process_env(None, OFFBOARD_URL=stack.service.url, COLUMNS="200")
    run = on_terminal(
        ["submit", str(devices), "--key"], env, typed=LOCAL_FUNCTION_KEY, prompt=b"(not echoed): "
    )
    assert run.code == 0, run.stdout
    assert "Function key (not echoed):" in run.stdout and "1 Queued" in run.stdout
    no_keys(run.stdout)


def test_wait_on_a_terminal_draws_a_live_bar_with_counts(stack: Stack, tmp_path: Path) -> None:
    devices = tmp_path / "devices.txt"
    devices.write_text(f"{machine()}\n{machine()}\n")
    env = process_env(stack.service, COLUMNS="200")
    run = on_terminal(["submit", str(devices), "--dry-run", "--wait", "--interval", "0.5"], env)
    assert run.code == 0, run.stdout
    assert ESCAPE in run.stdout  # drawn by rich
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", run.stdout)
    assert re.search(r"waiting ━+ 0/2 [0-9:]+ 2 Queued", shown), shown
    assert re.search(r"waiting ━+ 2/2 [0-9:]+ 2 DryRun", shown), shown
    assert re.search(r"│ 1 +│ [0-9a-f]{40} │ [0-9a-f-]{36} │ DryRun │", shown), shown
    no_keys(run.stdout)


def terminal_lines(shown: str) -> list[str]:
    return [line.rstrip() for line in re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown).splitlines()]


def test_ids_are_printed_whole_on_an_80_column_terminal(stack: Stack, tmp_path: Path) -> None:
    """Too narrow for a table that keeps every id whole, each row is a block of lines; ids
    are never cut (`…`) or broken across lines, at 80 columns as at 200."""
    device = machine()
    devices = tmp_path / "devices.txt"
    devices.write_text(f"{device}\n")
    env = process_env(stack.service, COLUMNS="80")
    sent = on_terminal(["submit", str(devices), "--dry-run"], env)
    assert sent.code == 0, sent.stdout
    lines = terminal_lines(sent.stdout)
    assert "…" not in sent.stdout
    assert any(line.split() == ["input", device] for line in lines), lines
    [request_id] = [line.split()[1] for line in lines if line.startswith("requestId")]
    assert re.fullmatch(r"[0-9a-f-]{36}", request_id)
    assert all(len(line) <= 80 for line in lines if not line.startswith(str(devices))), lines

    for args in (["status", request_id], ["status", request_id[:-3] + "000"], ["list", "--machine", device]):
        shown = on_terminal(args, env)
        assert shown.code == 0, shown.stdout
        lines = terminal_lines(shown.stdout)
        assert "…" not in shown.stdout and all(len(line) <= 80 for line in lines)
        assert any(line.split() == ["requestId", request_id] for line in lines), lines
        assert any(line.split() == ["device", device] for line in lines), lines

    wide = on_terminal(["status", request_id], process_env(stack.service, COLUMNS="200"))
    drawn = "\n".join(terminal_lines(wide.stdout))
    assert re.search(rf"│ {request_id} │ {device} │ [A-Za-z]+ ", drawn), drawn


# ---- a gateway that loses an answer ----------------------------------------------------------


class AnswerLosingProxy(LoopbackServer):
    """Forwards every request to `upstream`; the first `lose` POSTs are answered 502 after
    the service has accepted them. With `token`, it stands in for App Service authentication
    set to answer 401: a request without that bearer token gets 401 and an empty body."""

    def __init__(self, upstream: str, lose: int, token: str | None = None) -> None:
        self.upstream = upstream
        self.lose = lose
        self.token = token
        self.lost = 0
        self.posts = 0
        self.seen: list[tuple[str, str, str | None]] = []  # method, path, x-functions-key
        super().__init__(_ProxyHandler)


class _ProxyHandler(QuietHandler):
    def _forward(self) -> None:
        proxy = cast(AnswerLosingProxy, self.server.owner)  # type: ignore[attr-defined]
        proxy.seen.append((self.command, self.path, self.headers.get("x-functions-key")))
        if proxy.token and self.headers.get("Authorization") != f"Bearer {proxy.token}":
            return self.send(401)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
        answer = requests.request(
            self.command, proxy.upstream + self.path, headers=headers, data=self.read_body(), timeout=10
        )
        if self.command == "POST":
            proxy.posts += 1
            if proxy.lost < proxy.lose:
                proxy.lost += 1
                return self.send(502, b"<html>Bad Gateway</html>", {"Content-Type": "text/html"})
        kept = {
            k: v
            for k, v in answer.headers.items()
            if k.lower() in ("content-type", "location", "retry-after")
        }
        self.send(answer.status_code, answer.content, kept)

    do_GET = do_POST = _forward  # noqa: N815
