"""The shared rate limiter on real Azurite, its settings, the simulator's limits, and pacing
in the worker. Windows are small (seconds, not minutes) so the suite stays fast."""

from __future__ import annotations

import base64
import json
import multiprocessing
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor

import pytest
import requests
from azure.core.exceptions import AzureError
from azure.data.tables import TableClient, TableServiceClient

from localdev.azurite import Azurite
from localdev.defender_sim import DefenderSimulator, Reply, SlidingWindows, operation_of
from shared.adapters.entities import TableEntities
from shared.adapters.rate_limit import RateLimiter
from shared.domain.messages import MessageError, OffboardMessage
from shared.runtime import Services
from shared.settings import RateWindow, Settings, SettingsError
from shared.worker.worker import Worker
from tests.conftest import MACHINE, Queues, RunningHost, offboard_message

OTHER_MACHINE = "2f6cd0e8f524eee8a13d3a43f529813c95e1dd18"
MINIMAL = {"AzureWebJobsStorage": "UseDevelopmentStorage=true"}


class FakeClock:
    """A time source the test moves by hand: the limiter's arithmetic, exactly."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def table_name() -> str:
    return f"rl{uuid.uuid4().hex[:12]}"


@pytest.fixture
def make_limiter(azurite: Azurite, table_name: str) -> Callable[..., RateLimiter]:
    def make(limits: dict[str, tuple[RateWindow, ...]], **kwargs: object) -> RateLimiter:
        table = TableClient.from_connection_string(azurite.connection_string, table_name)
        return RateLimiter(TableEntities(table), limits, **kwargs)  # type: ignore[arg-type]

    return make


def assert_never_over(slots: list[float], windows: tuple[RateWindow, ...]) -> None:
    """No half-open window of `seconds` holds more than `calls` of the slots."""
    ordered = sorted(slots)
    for calls, seconds in windows:
        for i in range(len(ordered) - calls):
            assert ordered[i + calls] - ordered[i] >= seconds - 1e-6, (calls, seconds, i)


# ---- settings ---------------------------------------------------------------------------


def test_rate_limit_defaults_are_defenders_documented_limits() -> None:
    s = Settings.from_env(MINIMAL)
    expected = (RateWindow(100, 60.0), RateWindow(1500, 3600.0))
    assert s.rate_limits == {
        "offboard": expected,
        "machine-read": expected,
        "action-read": expected,
        "machine-tag": expected,  # the machine tag APIs document the same limits
    }
    assert s.rate_limit_table == "offboardratelimits"


def test_rate_limits_parse_fractional_windows_for_benchmarks() -> None:
    s = Settings.from_env({**MINIMAL, "DEFENDER_OFFBOARD_RATE_LIMITS": " 10/0.6 , 150/36 "})
    assert s.offboard_rate_limits == (RateWindow(10, 0.6), RateWindow(150, 36.0))


def test_bad_rate_limit_settings_are_all_named_at_once() -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(
            {
                **MINIMAL,
                "RATE_LIMIT_TABLE_NAME": "rate-limits",
                "DEFENDER_OFFBOARD_RATE_LIMITS": "100 per minute",
                "DEFENDER_MACHINE_READ_RATE_LIMITS": "0/60",
                "DEFENDER_ACTION_READ_RATE_LIMITS": "100/60,1500/-3600",
                "RATE_LIMIT_MARGIN_SECONDS": "-1",
                "RATE_LIMIT_MAX_INLINE_WAIT_SECONDS": "soon",
            }
        )
    names = [p.split(":")[0] for p in caught.value.problems]
    assert names == [
        "RATE_LIMIT_TABLE_NAME",
        "DEFENDER_OFFBOARD_RATE_LIMITS",
        "DEFENDER_MACHINE_READ_RATE_LIMITS",
        "DEFENDER_ACTION_READ_RATE_LIMITS",
        "RATE_LIMIT_MARGIN_SECONDS",
        "RATE_LIMIT_MAX_INLINE_WAIT_SECONDS",
    ]


@pytest.mark.parametrize("raw", ["100/0", "-5/60", "100/nan", "100/inf", "100", "/60", "100/60,", "1e3/60"])
def test_zero_negative_or_malformed_limits_are_refused(raw: str) -> None:
    with pytest.raises(SettingsError, match="DEFENDER_OFFBOARD_RATE_LIMITS"):
        Settings.from_env({**MINIMAL, "DEFENDER_OFFBOARD_RATE_LIMITS": raw})


def test_a_message_carries_its_reserved_slot_exactly() -> None:
    message = offboard_message(slot_at=1_763_900_000.123456)
    assert OffboardMessage.from_json(message.to_json()) == message
    assert "slotAt" not in json.loads(offboard_message().to_json())
    assert message.next_attempt(failed=False).slot_at is None  # a call used it
    body = json.loads(message.to_json())
    for bad in ("soon", True, -1, None):
        body["slotAt"] = bad
        if bad is None:
            assert OffboardMessage.from_json(json.dumps(body)).slot_at is None
        else:
            with pytest.raises(MessageError, match="slotAt"):
                OffboardMessage.from_json(json.dumps(body))


# ---- the limiter ------------------------------------------------------------------------


def test_a_full_burst_goes_at_once_then_the_next_waits_a_window(
    make_limiter: Callable[..., RateLimiter],
) -> None:
    clock = FakeClock()
    limiter = make_limiter({"offboard": (RateWindow(5, 10.0),)}, margin=0.5, clock=clock)
    assert [limiter.reserve("offboard") for _ in range(5)] == [0.0] * 5
    assert limiter.reserve("offboard") == pytest.approx(10.5)
    clock.now += 4
    assert limiter.reserve("offboard") == pytest.approx(6.5)  # same slot time as the 6th


def test_both_windows_hold_at_once(make_limiter: Callable[..., RateLimiter]) -> None:
    clock = FakeClock(0.0)
    windows = (RateWindow(2, 1.0), RateWindow(3, 10.0))
    limiter = make_limiter({"offboard": windows}, margin=0.0, clock=clock)
    slots = [limiter.reserve_at("offboard") for _ in range(7)]
    # Two per second until three in ten seconds, then the hour-like window decides.
    assert slots == [0.0, 0.0, 1.0, 10.0, 10.0, 11.0, 20.0]
    assert_never_over(slots, windows)


def test_each_operation_has_its_own_budget(make_limiter: Callable[..., RateLimiter]) -> None:
    clock = FakeClock()
    one = (RateWindow(1, 60.0),)
    limiter = make_limiter({"offboard": one, "machine-read": one, "action-read": one}, margin=0, clock=clock)
    assert limiter.reserve("offboard") == 0.0
    assert limiter.reserve("offboard") == 60.0
    assert limiter.reserve("machine-read") == 0.0
    assert limiter.reserve("action-read") == 0.0
    with pytest.raises(ValueError, match="cancel"):
        limiter.reserve("cancel")


def test_a_429_backs_off_the_whole_operation_on_every_instance(
    make_limiter: Callable[..., RateLimiter],
) -> None:
    clock = FakeClock()
    limits = {"offboard": (RateWindow(100, 60.0),), "machine-read": (RateWindow(100, 60.0),)}
    this, other = make_limiter(limits, clock=clock), make_limiter(limits, clock=clock)
    held = this.reserve_at("offboard")
    other.penalize("offboard", 30)
    assert this.reserve("offboard") == 30.0
    assert not this.still_valid("offboard", held)  # a slot inside the penalty is void
    assert this.reserve("machine-read") == 0.0


def test_a_held_slot_is_valid_only_if_reserved_and_not_stale(
    make_limiter: Callable[..., RateLimiter],
) -> None:
    clock = FakeClock()
    limiter = make_limiter({"offboard": (RateWindow(1, 10.0),)}, margin=1.0, clock=clock)
    limiter.reserve_at("offboard")
    slot = limiter.reserve_at("offboard")
    assert limiter.still_valid("offboard", slot)
    assert not limiter.still_valid("offboard", slot + 0.001)  # never reserved
    clock.now = slot + 0.5
    assert limiter.still_valid("offboard", slot)
    clock.now = slot + 0.51  # later than half the margin: the margin no longer covers it
    assert not limiter.still_valid("offboard", slot)


def test_a_backlog_longer_than_the_log_keeps_its_early_slots(
    make_limiter: Callable[..., RateLimiter],
) -> None:
    clock = FakeClock(0.0)
    limiter = make_limiter({"offboard": (RateWindow(2, 10.0),)}, margin=0.0, clock=clock)
    slots = [limiter.reserve_at("offboard") for _ in range(6)]
    assert slots == [0.0, 0.0, 10.0, 10.0, 20.0, 20.0]  # the log keeps only the last two
    assert limiter.still_valid("offboard", slots[0])
    clock.now = 10.0
    assert limiter.still_valid("offboard", slots[2])
    assert not limiter.still_valid("offboard", 20.5)  # later than anything it granted


def test_the_table_is_created_on_first_use(
    azurite: Azurite, make_limiter: Callable[..., RateLimiter]
) -> None:
    limiter = make_limiter({"offboard": (RateWindow(1, 1.0),)})
    service = TableServiceClient.from_connection_string(azurite.connection_string)
    name = limiter.entities.name  # type: ignore[attr-defined]
    assert name not in {t.name for t in service.list_tables()}
    limiter.reserve("offboard")
    assert name in {t.name for t in service.list_tables()}


def test_unreachable_table_storage_raises_and_reserves_nothing(azurite: Azurite) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    conn = azurite.connection_string.replace(f":{azurite.ports['table']}/", f":{port}/")
    table = TableClient.from_connection_string(conn, "unreachable", retry_total=0)
    with pytest.raises(AzureError):
        RateLimiter(TableEntities(table), {"offboard": (RateWindow(1, 1.0),)}).reserve("offboard")


WINDOWS = (RateWindow(4, 0.5), RateWindow(10, 3.0))


def test_threads_never_exceed_any_window(make_limiter: Callable[..., RateLimiter]) -> None:
    # One limiter per thread, so only ETag concurrency (not the in-process lock) keeps order.
    limiters = [make_limiter({"offboard": WINDOWS}, margin=0.0) for _ in range(6)]
    slots: list[float] = []
    lock = threading.Lock()

    def spend(limiter: RateLimiter) -> None:
        for _ in range(6):
            slot = limiter.reserve_at("offboard")
            with lock:
                slots.append(slot)

    threads = [threading.Thread(target=spend, args=(limiter,)) for limiter in limiters]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(slots) == 36 == len(set(slots)) + sum(slots.count(s) - 1 for s in set(slots))
    assert_never_over(slots, WINDOWS)
    # Nothing spaced evenly: the first full burst was granted at once.
    ordered = sorted(slots)
    assert ordered[3] - ordered[0] < 0.5


def test_threads_of_one_instance_reserve_together_and_correctly(
    make_limiter: Callable[..., RateLimiter],
) -> None:
    limiter = make_limiter({"offboard": WINDOWS}, margin=0.0)  # shared: one write serves many
    slots: list[float] = []
    lock = threading.Lock()

    def spend() -> None:
        for _ in range(5):
            slot = limiter.reserve_at("offboard")
            with lock:
                slots.append(slot)

    threads = [threading.Thread(target=spend) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(slots) == 40
    assert_never_over(slots, WINDOWS)
    budget = limiter.entities.get("offboard", "budget")
    assert budget is not None
    stored = budget["Slots"]
    assert len(stored) == 8 * 10  # the last 10 slots (the largest window's count) are kept


def reserve_in_process(connection_string: str, table_name: str, count: int) -> list[float]:
    table = TableClient.from_connection_string(connection_string, table_name)
    limiter = RateLimiter(TableEntities(table), {"offboard": WINDOWS}, margin=0.0)
    return [limiter.reserve_at("offboard") for _ in range(count)]


def test_processes_never_exceed_any_window(azurite: Azurite, table_name: str) -> None:
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(3, mp_context=spawn) as pool:
        futures = [
            pool.submit(reserve_in_process, azurite.connection_string, table_name, 12) for _ in range(3)
        ]
        slots = [slot for future in futures for slot in future.result(timeout=60)]
    assert len(slots) == 36
    assert_never_over(slots, WINDOWS)


# ---- the simulator ----------------------------------------------------------------------


def test_simulator_windows_count_every_call_and_say_when_to_retry() -> None:
    budget = SlidingWindows(((3, 60.0), (6, 3600.0)), time_scale=60)  # 1 s and 60 s
    assert [budget.admit(t) for t in (0.0, 0.1, 0.2)] == [None, None, None]
    assert budget.admit(0.3) == pytest.approx(0.8)  # (t - 1, t] holds 0.1, 0.2, 0.3 until 1.1
    # Refused calls count too: now 0.2, 0.3 and 1.05 fill the minute until 1.2.
    assert budget.admit(1.05) == pytest.approx(0.15)
    assert budget.admit(1.35) is None
    # Six calls in the hour (0.0 to 1.35): the next is admitted once 0.1 has left it.
    assert budget.admit(1.5) == pytest.approx(60.1 - 1.5)


def test_simulator_keys_calls_like_the_app() -> None:
    assert operation_of("POST", f"/api/machines/{MACHINE}/offboard") == "offboard"
    assert operation_of("GET", f"/api/machines/{MACHINE}") == "machine-read"
    assert operation_of("GET", "/api/machines?$filter=computerDnsName eq 'x'") == "machine-read"
    assert operation_of("GET", "/api/machineactions/abc") == "action-read"


@pytest.fixture
def limited_defender() -> Iterator[DefenderSimulator]:
    with DefenderSimulator(
        rate_limits={"offboard": ((3, 60.0), (5, 3600.0))}, time_scale=60, accept_any=True
    ) as sim:
        yield sim


def test_simulator_answers_429_with_retry_after_over_http(limited_defender: DefenderSimulator) -> None:
    machines = iter(f"{n:040x}" for n in range(1, 100))  # one machine takes one offboard at a time

    def post() -> requests.Response:
        return requests.post(
            f"{limited_defender.url}/api/machines/{next(machines)}/offboard",
            json={"Comment": "x"},
            headers={"Authorization": "Bearer t"},
            timeout=5,
        )

    assert [post().status_code for _ in range(3)] == [201, 201, 201]
    refused = post()
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
    assert refused.json()["error"]["code"] == "TooManyRequests"
    time.sleep(1.3)
    assert post().status_code == 201
    hourly = post()
    assert hourly.status_code == 429 and 55 <= int(hourly.headers["Retry-After"]) <= 60
    assert len(limited_defender.offboard_calls()) == 6 and len(limited_defender.throttled) == 2


# ---- pacing in the worker ---------------------------------------------------------------


def test_no_room_requeues_with_the_slot_and_calls_nothing(
    make_worker: Callable[..., Worker], defender: DefenderSimulator, queues: Queues
) -> None:
    worker = make_worker(
        DEFENDER_OFFBOARD_RATE_LIMITS="1/3",
        RATE_LIMIT_MARGIN_SECONDS="0",
        RATE_LIMIT_MAX_INLINE_WAIT_SECONDS="0.5",
        OFFBOARD_CHECK_INITIAL_SECONDS="3600",  # the first request's status check stays out of sight
        OFFBOARD_CHECK_MAX_SECONDS="3600",
    )
    before = time.time()
    worker.process(offboard_message())
    [first] = defender.offboard_calls()
    waiting = offboard_message(machine_id=OTHER_MACHINE, attempt=2, failures=1)
    worker.process(waiting)

    assert len(defender.offboard_calls()) == 1
    # The re-queued message (and the first request's status check), invisible for now.
    assert queues.count() == 2 and queues.peek() == []
    [body] = queues.wait_for("", timeout=5)
    requeued = OffboardMessage.from_json(json.dumps(body))
    # Not a failure and not an attempt: Defender was not called. Only the slot is new.
    assert requeued.request_id == waiting.request_id
    assert (requeued.attempt, requeued.failures) == (2, 1)
    # One window after the first call's slot, which was taken between `before` and its arrival.
    assert requeued.slot_at is not None and before + 3 <= requeued.slot_at <= first.at + 3
    assert len(defender.offboard_calls()) == 1


def test_a_requeued_message_calls_in_its_own_slot(
    make_worker: Callable[..., Worker], defender: DefenderSimulator, queues: Queues
) -> None:
    worker = make_worker(
        DEFENDER_OFFBOARD_RATE_LIMITS="1/2",
        RATE_LIMIT_MARGIN_SECONDS="0.4",
        RATE_LIMIT_MAX_INLINE_WAIT_SECONDS="1",
        OFFBOARD_CHECK_INITIAL_SECONDS="3600",
        OFFBOARD_CHECK_MAX_SECONDS="3600",
    )
    worker.process(offboard_message())
    worker.process(offboard_message(machine_id=OTHER_MACHINE))
    assert len(defender.offboard_calls()) == 1

    [body] = queues.wait_for("", timeout=5)  # visible again shortly before its slot
    assert body["machineId"] == OTHER_MACHINE and body["attempt"] == 1 and body["failures"] == 0
    worker.handle(json.dumps(body).encode(), "m2")
    first, second = defender.offboard_calls()
    assert second.at >= body["slotAt"]  # in its own slot (the window plus the margin), not earlier
    assert second.at - first.at >= 2  # so Defender's window holds, by arrival times too


def test_a_429_penalises_every_request_for_that_operation(
    make_worker: Callable[..., Worker], defender: DefenderSimulator, queues: Queues
) -> None:
    defender.script(MACHINE, Reply.error(429, "TooManyRequests", **{"Retry-After": "30"}))
    worker = make_worker()
    worker.process(offboard_message())
    worker.process(offboard_message(machine_id=OTHER_MACHINE))  # another machine, same budget

    assert len(defender.offboard_calls()) == 1
    assert queues.count() == 2 and queues.peek() == []  # both wait about 30 s


def test_budget_table_down_means_no_call_and_the_message_comes_back(
    make_services: Callable[..., Services], azurite: Azurite, defender: DefenderSimulator, queues: Queues
) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    broken = azurite.connection_string.replace(f":{azurite.ports['table']}/", f":{port}/")
    services = make_services()
    # Only the budget is unreachable: request state and queues work, so the limiter is what stops it.
    unreachable = TableClient.from_connection_string(broken, "budgets", retry_total=0)
    services.limiter = RateLimiter(TableEntities(unreachable), services.settings.rate_limits)
    worker = services.worker()
    with pytest.raises(AzureError):
        worker.process(offboard_message())  # the host redelivers the message later
    assert defender.offboard_calls() == [] and queues.count() == 0


def test_a_far_read_slot_is_carried_not_taken_again(
    make_worker: Callable[..., Worker], defender: DefenderSimulator, queues: Queues
) -> None:
    worker = make_worker(
        DEFENDER_MACHINE_READ_RATE_LIMITS="1/3",
        RATE_LIMIT_MARGIN_SECONDS="0.2",
        RATE_LIMIT_MAX_INLINE_WAIT_SECONDS="1.5",
        OFFBOARD_CHECK_INITIAL_SECONDS="3600",
        OFFBOARD_CHECK_MAX_SECONDS="3600",
    )
    worker.process(offboard_message())
    worker.process(offboard_message(machine_id=OTHER_MACHINE))  # its precheck read must wait
    assert len(defender.machine_calls()) == 1 and len(defender.offboard_calls()) == 1
    [body] = [m for m in queues.wait_for("", timeout=6) if m["type"] == "offboard"]
    assert body["readSlotAt"] and "slotAt" not in body and body["prechecked"] is False
    held = body["readSlotAt"]
    deadline = time.monotonic() + 10
    while len(defender.offboard_calls()) < 2 and time.monotonic() < deadline:  # play the host
        received = queues.client().receive_message()
        if received is None:
            time.sleep(0.1)
            continue
        queues.client().delete_message(received)
        body = json.loads(base64.b64decode(received.content))
        assert body.get("readSlotAt", held) == held  # the same slot every time, never a new one
        worker.handle(json.dumps(body).encode(), received.id)
    first, second = defender.machine_calls()
    assert second.at >= held  # in its carried slot, not earlier
    # Defender's window between the two arrivals; the 0.2 s margin is what covers the first
    # call's time from its reservation to its arrival, so the arrivals may be closer than 3.2 s.
    assert second.at - first.at >= 3
    assert len(defender.offboard_calls()) == 2


def test_a_dry_run_spends_no_offboard_slot(
    make_worker: Callable[..., Worker], defender: DefenderSimulator, queues: Queues
) -> None:
    worker = make_worker(DEFENDER_OFFBOARD_RATE_LIMITS="1/60", RATE_LIMIT_MAX_INLINE_WAIT_SECONDS="0.5")
    worker.process(offboard_message(dry_run=True))
    worker.process(offboard_message(machine_id=OTHER_MACHINE))  # goes at once: the budget is untouched
    assert [c.path for c in defender.offboard_calls()] == [f"/api/machines/{OTHER_MACHINE}/offboard"]


# ---- through the local host -------------------------------------------------------------


def test_the_pipeline_spends_the_budget_without_a_429(local_host: Callable[..., RunningHost]) -> None:
    with DefenderSimulator(rate_limits={"offboard": ((2, 2.0),)}, accept_any=True) as limited:
        host = local_host(
            DEFENDER_API_BASE_URL=limited.url,
            DEFENDER_OFFBOARD_RATE_LIMITS="2/2",
            RATE_LIMIT_MARGIN_SECONDS="0.2",
            RATE_LIMIT_MAX_INLINE_WAIT_SECONDS="1",
        )
        machines = [f"{i:040x}" for i in range(1, 6)]
        # One batch: every message is on the queue at once, however long each takes to accept.
        batch = {"requests": [{"machineId": machine} for machine in machines]}
        assert host.post("/api/offboard", batch).status_code == 202
        calls = limited.wait_for_calls(5, timeout=20)
        time.sleep(0.5)  # a duplicate call, if one were coming
        assert sorted(c.path.split("/")[3] for c in limited.offboard_calls()) == machines
        assert limited.throttled == []
        starts = sorted(c.at for c in calls)
        # Two at once, then two a window later, then the fifth. The slots are a window plus the
        # margin apart; the margin covers each call's way from its slot to Defender, so by
        # arrival times only the window itself is certain.
        assert starts[1] - starts[0] < 0.5 and starts[2] - starts[0] >= 2
        assert starts[4] - starts[2] >= 2


def test_table_storage_down_through_the_host_loses_nothing(
    local_host: Callable[..., RunningHost], azurite: Azurite, defender: DefenderSimulator, queues: Queues
) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    broken = azurite.connection_string.replace(f":{azurite.ports['table']}/", f":{port}/")
    # The intake (healthy storage) accepts the request; the worker's tables are unreachable.
    assert local_host("--no-queues").post("/api/offboard", {"machineId": MACHINE}).status_code == 202
    host = local_host("--no-http", AzureWebJobsStorage=broken)
    deadline = time.monotonic() + 15
    while "raised on message" not in host.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "raised on message" in host.log()  # the host will deliver it again after visibilityTimeout
    assert defender.offboard_calls() == []
    assert queues.count() == 1 and queues.count("-poison") == 0
