"""Timer triggers in the local host: schedules, past-due runs and the admin API's on-demand
run, with a small test app (tests/timer_app.py) over real HTTP."""

from __future__ import annotations

import itertools
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import requests

from localdev.host import LOCAL_FUNCTION_KEY, LOCAL_MASTER_KEY, LocalHost, QueueOptions, launch
from localdev.timers import HostConfigError, Schedule
from tests import timer_app

EVERY_SECOND = "* * * * * *"


@pytest.fixture
def runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[], list[dict[str, Any]]]:
    """The test app's runs so far, read from the file its functions append to."""
    path = tmp_path / "runs.jsonl"
    monkeypatch.setenv("TIMER_APP_LOG", str(path))

    def read() -> list[dict[str, Any]]:
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    return read


@pytest.fixture
def make_host() -> Iterator[Callable[..., LocalHost]]:
    started: list[LocalHost] = []

    def make(schedule: str = "0 0 * * * *") -> LocalHost:
        host = LocalHost(timer_app.build_app(), QueueOptions(), "", env={"TIMER_APP_SCHEDULE": schedule})
        started.append(host)
        return host

    yield make
    for host in started:
        host.stop()


def wait_until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.05)


def invoke(base: str, name: str, key: str | None = LOCAL_MASTER_KEY, body: Any = None) -> requests.Response:
    headers = {"x-functions-key": key} if key else {}
    payload = {"input": ""} if body is None else body
    return requests.post(f"{base}/admin/functions/{name}", json=payload, headers=headers, timeout=10)


# ---- indexing ---------------------------------------------------------------------------


def test_timer_functions_are_found_with_their_resolved_schedules(make_host: Callable[..., LocalHost]) -> None:
    host = make_host("30 */5 * * * *")
    schedules = {f.name: f.schedule.expression for f in host.timers.functions.values()}
    assert schedules == {"Watch": "30 */5 * * * *", "sweep": "0 */2 * * * *", "broken": "0 0 0 1 1 *"}
    assert [route.name for route in host.routes] == ["ping"]


@pytest.mark.parametrize("env", [{}, {"TIMER_APP_SCHEDULE": "  "}])
def test_a_missing_schedule_setting_stops_the_host_naming_it(env: dict[str, str]) -> None:
    with pytest.raises(HostConfigError) as caught:
        LocalHost(timer_app.build_app(), QueueOptions(), "", env=env)
    assert "Watch" in str(caught.value) and "TIMER_APP_SCHEDULE" in str(caught.value)


@pytest.mark.parametrize("schedule", ["*/5 * * * *", "00:05:00", "0 */5 * * * * 2027", "0 61 * * * *"])
def test_a_schedule_that_is_not_six_field_ncrontab_is_refused(schedule: str) -> None:
    with pytest.raises(HostConfigError, match="NCRONTAB"):
        LocalHost(timer_app.build_app(), QueueOptions(), "", env={"TIMER_APP_SCHEDULE": schedule})


def test_ncrontab_reads_seconds_first_in_utc() -> None:
    start = datetime(2026, 11, 23, 10, 0, 1, tzinfo=UTC)
    assert Schedule("0 */2 * * * *", "f").next_after(start) == datetime(2026, 11, 23, 10, 2, tzinfo=UTC)
    assert Schedule("30 * * * * *", "f").next_after(start) == datetime(2026, 11, 23, 10, 0, 30, tzinfo=UTC)
    assert Schedule("0 0 9 * * Mon", "f").next_after(start) == datetime(2026, 11, 30, 9, tzinfo=UTC)


# ---- schedules --------------------------------------------------------------------------


def test_a_timer_runs_on_its_schedule(
    make_host: Callable[..., LocalHost], runs: Callable[[], list[dict[str, Any]]]
) -> None:
    host = make_host(EVERY_SECOND)
    host.run_timers()
    wait_until(lambda: sum(r["function"] == "Watch" for r in runs()) >= 3)
    watch = [r for r in runs() if r["function"] == "Watch"]
    assert not any(r["pastDue"] for r in watch)
    # One occurrence a second: the runs are about a second apart, never bunched.
    gaps = [b["at"] - a["at"] for a, b in itertools.pairwise(watch)]
    assert all(0.7 < gap < 1.5 for gap in gaps), gaps
    assert watch[1]["Last"] is not None and watch[0]["Next"] is not None
    assert host.timers.invocations["Watch"] >= 3


def test_a_run_that_outlasts_the_next_occurrence_is_followed_by_one_past_due_run(
    make_host: Callable[..., LocalHost],
    runs: Callable[[], list[dict[str, Any]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TIMER_APP_SLEEP", "1.6")
    host = make_host(EVERY_SECOND)
    host.run_timers()
    wait_until(lambda: sum(r["function"] == "Watch" for r in runs()) >= 3, timeout=15)
    watch = [r for r in runs() if r["function"] == "Watch"][:3]
    assert [r["pastDue"] for r in watch] == [False, True, False]
    # The past-due run starts as soon as the late one ends, not on a schedule tick.
    assert 1.5 < watch[1]["at"] - watch[0]["at"] < 2.0


# ---- on demand: the admin API -----------------------------------------------------------


@pytest.fixture
def admin(make_host: Callable[..., LocalHost]) -> tuple[LocalHost, str]:
    host = make_host()  # no schedules run: run_timers() is not called
    return host, f"http://127.0.0.1:{host.serve_http(0)}"


def test_the_master_key_invokes_a_timer_function_and_202_means_it_ran(
    admin: tuple[LocalHost, str], runs: Callable[[], list[dict[str, Any]]]
) -> None:
    host, base = admin
    response = invoke(base, "Watch")
    assert response.status_code == 202 and response.headers["X-Local-Function-Outcome"] == "Succeeded"
    assert [(r["function"], r["pastDue"]) for r in runs()] == [("Watch", False)]
    assert invoke(base, "watch").status_code == 202  # function names ignore case, as in the host
    assert host.timers.invocations == {"Watch": 2, "sweep": 0, "broken": 0}


def test_a_function_that_raises_still_answers_202_and_says_it_failed(admin: tuple[LocalHost, str]) -> None:
    response = invoke(admin[1], "broken")
    assert response.status_code == 202 and response.headers["X-Local-Function-Outcome"] == "Failed"


@pytest.mark.parametrize("key", [LOCAL_FUNCTION_KEY, None, "wrong"])
def test_function_keys_and_no_key_are_refused(
    admin: tuple[LocalHost, str], runs: Callable[[], list[dict[str, Any]]], key: str | None
) -> None:
    assert invoke(admin[1], "Watch", key=key).status_code == 401
    assert runs() == []


def test_the_master_key_also_works_in_the_query(
    admin: tuple[LocalHost, str], runs: Callable[[], list[dict[str, Any]]]
) -> None:
    url = f"{admin[1]}/admin/functions/Watch?code={LOCAL_MASTER_KEY}"
    assert requests.post(url, json={"input": ""}, timeout=10).status_code == 202
    assert len(runs()) == 1


@pytest.mark.parametrize(
    ("name", "body", "status"),
    [
        ("nosuch", {"input": ""}, 404),
        ("ping", {"input": ""}, 400),  # an HTTP function
        ("Watch", ["input"], 400),
        ("Watch", {"input": 5}, 400),
    ],
)
def test_bad_invocations_are_refused_clearly(
    admin: tuple[LocalHost, str],
    runs: Callable[[], list[dict[str, Any]]],
    name: str,
    body: Any,
    status: int,
) -> None:
    response = invoke(admin[1], name, body=body)
    assert response.status_code == status and response.json()["error"]["message"]
    assert runs() == []


def test_only_post_invokes(admin: tuple[LocalHost, str]) -> None:
    url = f"{admin[1]}/admin/functions/Watch"
    response = requests.get(url, headers={"x-functions-key": LOCAL_MASTER_KEY}, timeout=10)
    assert response.status_code == 405


# ---- the host process -------------------------------------------------------------------


def test_the_host_process_with_no_timers_runs_them_on_demand_and_counts_them(
    runs: Callable[[], list[dict[str, Any]]],
) -> None:
    env = {**os.environ, "TIMER_APP_SCHEDULE": EVERY_SECOND}
    process, port, log = launch(env, "--app", "tests.timer_app:app", "--no-timers", "--no-queues")
    try:
        time.sleep(1.5)  # a schedule of every second would have run by now
        assert runs() == []
        assert invoke(f"http://127.0.0.1:{port}", "Watch").status_code == 202
        assert len(runs()) == 1
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.unlink(missing_ok=True)
    stats = json.loads(out.decode().splitlines()[-1])
    assert stats["stopped"] and stats["timer_invocations"] == {"Watch": 1, "sweep": 0, "broken": 0}


def test_the_host_process_refuses_to_start_without_the_schedule_setting() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TIMER_APP_SCHEDULE"}
    with pytest.raises(RuntimeError, match="TIMER_APP_SCHEDULE"):
        launch(env, "--app", "tests.timer_app:app", "--no-queues")
