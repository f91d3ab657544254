"""`scripts/run-local`: its settings layers, the checks before anything starts, the sample
flow, and stopping every child process on a signal, with no terminal."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from localdev.fleet import FLEET
from localdev.local_settings import DEMO_DEFAULTS, layered, read_values, wired
from shared.settings import SettingsError

ROOT = Path(__file__).resolve().parent.parent
RUN_LOCAL = str(ROOT / "scripts" / "run-local")


def run_local(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [RUN_LOCAL, *args],
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# ---- settings layers --------------------------------------------------------------------


def write_settings(path: Path, values: object) -> None:
    path.write_text(json.dumps({"IsEncrypted": False, "Values": values}))


def test_settings_layer_sample_then_demo_pace_then_local_settings_then_environment(tmp_path: Path) -> None:
    write_settings(
        tmp_path / "local.settings.sample.json",
        {"A": "sample", "B": "sample", "C": "sample", "OFFBOARD_CHECK_INITIAL_SECONDS": "60"},
    )
    write_settings(tmp_path / "local.settings.json", {"B": "local", "C": "local"})
    env = layered(tmp_path, {"C": "environment"})
    assert (env["A"], env["B"], env["C"]) == ("sample", "local", "environment")
    assert env["OFFBOARD_CHECK_INITIAL_SECONDS"] == DEMO_DEFAULTS["OFFBOARD_CHECK_INITIAL_SECONDS"]


def test_local_settings_json_is_optional(tmp_path: Path) -> None:
    write_settings(tmp_path / "local.settings.sample.json", {"A": "sample"})
    assert layered(tmp_path, {})["A"] == "sample"


def test_the_loopback_wiring_wins_and_drops_the_identity_form_of_storage() -> None:
    env = {"AzureWebJobsStorage__accountName": "prod", "DEFENDER_API_BASE_URL": "https://x", "K": "v"}
    result = wired(env, {"AzureWebJobsStorage": "conn", "DEFENDER_API_BASE_URL": "http://127.0.0.1:9"})
    assert result == {"AzureWebJobsStorage": "conn", "DEFENDER_API_BASE_URL": "http://127.0.0.1:9", "K": "v"}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{not json", "not valid JSON"),
        ('{"Values": ["A"]}', "'Values' must be an object"),
        ('{"Values": {"OFFBOARD_MAX_ATTEMPTS": 8}}', "Values.OFFBOARD_MAX_ATTEMPTS must be a string"),
    ],
)
def test_a_broken_local_settings_file_is_named_with_what_is_wrong(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = tmp_path / "local.settings.json"
    path.write_text(text)
    with pytest.raises(SettingsError) as caught:
        read_values(path)
    assert (
        caught.value.problems[0].startswith("local.settings.json: ") and problem in caught.value.problems[0]
    )


# ---- checks before anything starts ------------------------------------------------------


def test_invalid_settings_print_every_problem_and_exit_2_before_starting_anything() -> None:
    started = time.monotonic()
    result = run_local(env={"OFFBOARD_MAX_ATTEMPTS": "lots", "OFFBOARD_QUEUE_NAME": "Not_A_Queue"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "run-local: the settings are not valid:"
    assert sum(line.strip().startswith("OFFBOARD_MAX_ATTEMPTS") for line in lines) == 1
    assert sum(line.strip().startswith("OFFBOARD_QUEUE_NAME") for line in lines) == 1
    assert "Azurite" not in result.stdout and time.monotonic() - started < 20


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield int(listener.getsockname()[1])


def test_a_port_in_use_is_one_line_naming_it_and_exit_2(busy_port: int) -> None:
    result = run_local("--port", str(busy_port))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"port {busy_port} is in use; choose another with --port"]
    assert "Azurite" not in result.stdout


def test_port_is_documented_and_checked() -> None:
    help_text = run_local("--help").stdout
    assert "--port" in help_text and "default 7071" in help_text
    refused = run_local("--port", "70000")
    assert refused.returncode == 2 and "not a port number" in refused.stderr


def test_the_readme_lists_the_fleet_the_simulator_serves() -> None:
    # A new user picks devices from the README's table: each row must be a machine the
    # simulator really has, and every machine must be in the table.
    readme = (ROOT / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| `") and line.count("|") == 6]
    listed = {row.split("`")[1]: row.split("`")[3] for row in rows}
    assert listed == {machine.id: machine.computer_dns_name for machine in FLEET}


# ---- the sample flow --------------------------------------------------------------------


def test_the_samples_run_through_the_whole_pipeline() -> None:
    result = run_local("--port", "0", timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert all(machine.id in out for machine in FLEET)  # the fleet is printed at start
    for outcome in [
        "200 Succeeded",
        "first call answered 429",
        "Rejected OsPlatformNotSupported",
        "Rejected ProtectedDevice",
        "Failed AmbiguousDevice",
        "Failed NotFound",
        "400 {",
        "Done: every request reached a recorded outcome.",
    ]:
        assert outcome in out, outcome
    assert "sim-" not in out + result.stderr  # no bearer token is ever printed


# ---- signals, with no terminal ----------------------------------------------------------


def children_of(pid: int) -> dict[int, str]:
    """Every descendant process of `pid` and its command line, read from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # it ended while we looked
            parents[int(entry.name)] = int(fields[1])
    found: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, its_parent in parents.items():
            if its_parent == parent and child not in found:
                try:
                    found[child] = (Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")).decode()
                except OSError:
                    found[child] = ""
                frontier.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its exit status is left


def wait_for_output(path: Path, text: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{text!r} never printed:\n{path.read_text(errors='replace')[-3000:]}")
        time.sleep(0.1)


@pytest.mark.parametrize(
    ("stop", "args", "after", "status"),
    [
        (signal.SIGTERM, ["--serve", "--no-samples"], "Serving.", 0),
        (signal.SIGHUP, ["--serve", "--no-samples"], "Serving.", 0),
        (signal.SIGINT, ["--serve", "--no-samples"], "Serving.", 0),
        (signal.SIGTERM, ["--serve"], "POST /api/offboard for machine", 128 + signal.SIGTERM),
    ],
    ids=["SIGTERM-serving", "SIGHUP-serving", "SIGINT-serving", "SIGTERM-during-samples"],
)
def test_a_signal_stops_azurite_and_the_host_without_a_terminal(
    tmp_path: Path, stop: signal.Signals, args: list[str], after: str, status: int
) -> None:
    output = tmp_path / "run-local.out"
    with output.open("wb") as sink:
        # A new session has no controlling terminal, as under systemd, cron or CI.
        process = subprocess.Popen(
            [RUN_LOCAL, "--port", "0", *args],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for_output(output, after, process, timeout=90)
        children = children_of(process.pid)
        assert any("azurite" in cmd for cmd in children.values()), children
        assert any("localdev.host" in cmd for cmd in children.values()), children
        process.send_signal(stop)
        assert process.wait(timeout=30) == status, output.read_text()[-3000:]
        deadline = time.monotonic() + 5
        while any(alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [cmd for pid, cmd in children.items() if alive(pid)] == []
        assert f"{stop.name}: stopped Azurite, the local host and the fakes" in output.read_text()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
