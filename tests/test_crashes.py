"""Processes killed at the worst moments (SIGKILL: no cleanup, no finally), then the
service carries on: nothing stranded, nothing lost, one offboard call per machine.

- A worker killed while its offboard call is in flight: Defender has the action, the worker
  never heard. The redelivered message finds its own claim, looks the action up, follows it.
- An acceptor killed at each step of accepting (a storage proxy holds the next write until
  the process is dead): a retry of the same request, with or without an idempotency key,
  and a new request for the same machine all succeed, within the acceptance lease plus a
  retry, and the machine is offboarded exactly once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable

import pytest
import requests

from localdev.azurite import Azurite
from localdev.defender_sim import DefenderSimulator
from localdev.host import LOCAL_FUNCTION_KEY, launch
from tests.conftest import MACHINE, RunningHost
from tests.fakes.storage_proxy import Hold, StorageProxy

HostFactory = Callable[..., RunningHost]
MACHINES = [f"{i:02x}" * 20 for i in range(1, 6)]
LEASE = "3"  # OFFBOARD_ACCEPT_LEASE_SECONDS for these tests: the 30 s default, shortened


def kill(host: RunningHost) -> None:
    os.kill(host.process.pid, signal.SIGKILL)
    host.process.wait(10)


def until(check: Callable[[], object], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("never happened")
        time.sleep(0.2)


def test_a_worker_killed_during_the_offboard_call_makes_no_second_call(
    local_host: HostFactory, defender: DefenderSimulator
) -> None:
    defender.offboard_delay_seconds = 30  # Defender has the action; its answer never arrives
    intake = local_host("--no-queues")
    ids = [intake.post("/api/offboard", {"machineId": m}).json()["requestId"] for m in MACHINES]
    first = local_host("--no-http", "--message-lease", "2")
    until(lambda: len(defender.offboard_calls()) == len(MACHINES))
    kill(first)
    defender.offboard_delay_seconds = 0
    local_host("--no-http")  # a new instance; the host gives the messages to it
    until(lambda: all(intake.get(f"/api/offboard/{i}").json()["status"] == "Succeeded" for i in ids))
    assert len(defender.offboard_calls()) == len(MACHINES)  # exactly one per machine
    for machine in MACHINES:
        [action] = defender.offboard_actions(machine)
        assert action["status"] == "Succeeded"
    assert defender.action_calls()  # the redeliveries looked before they called


# ---- killed while accepting ---------------------------------------------------------------

# The write each kill point holds (so every write before it is done): a piece of its
# request line and of its body. Table writes name the partition in the body; the breaker is
# first read (a new process has no copy); the message is a POST to the queue.
KILL_POINTS = {
    "after the key, before the device guard": (b'"PartitionKey": "machine-',),
    "after the device guard, before the breaker": (b"GET ", b"PartitionKey='breaker'"),
    "after the breaker, before the row": (b"POST ", b"$batch"),
    "after the row, before the message": (b"POST ", b"/messages"),
}


def through(azurite: Azurite, proxy: StorageProxy, queue_proxy: StorageProxy) -> str:
    """Azurite's connection string, with tables and queues reached through the proxies."""
    return azurite.connection_string.replace(f":{azurite.ports['table']}/", f":{proxy.port}/").replace(
        f":{azurite.ports['queue']}/", f":{queue_proxy.port}/"
    )


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_an_acceptor_killed_at_each_step_strands_nothing(
    point: str,
    azurite: Azurite,
    app_env: dict[str, str],
    local_host: HostFactory,
    defender: DefenderSimulator,
) -> None:
    tables, queues = StorageProxy(azurite.ports["table"]), StorageProxy(azurite.ports["queue"])
    hold = Hold(KILL_POINTS[point])
    (queues if b"/messages" in hold.needles else tables).hold = hold
    env = {**os.environ, **app_env, "AzureWebJobsStorage": through(azurite, tables, queues)}
    process, port, log = launch({**env, "OFFBOARD_ACCEPT_LEASE_SECONDS": LEASE}, "--no-queues", "--no-timers")
    try:
        dying = RunningHost(f"http://127.0.0.1:{port}", process, log)
        request = {"machineId": MACHINE, "clientRequestId": "playbook-run-42"}
        with contextlib.suppress(requests.RequestException):  # the caller sees no answer: it retries
            requests.post(
                f"{dying.url}/api/offboard",
                json=request,
                headers={"x-functions-key": LOCAL_FUNCTION_KEY},
                timeout=0.5,
            )
        assert hold.arrived.wait(20), f"{point}: the held write never came"
        kill(dying)
    finally:
        process.kill()
        log.unlink(missing_ok=True)
        tables.close()
        queues.close()
    # The caller retries once the lease has passed (a caller with any backoff does); another
    # playbook asks for the same device; a worker runs.
    host = local_host(OFFBOARD_ACCEPT_LEASE_SECONDS=LEASE)
    time.sleep(float(LEASE) + 0.5)
    retried = host.post("/api/offboard", request)
    assert retried.status_code == 202, f"{point}: {retried.text}"
    other = host.post("/api/offboard", {"machineId": MACHINE})
    assert other.status_code == 202 and other.json()["requestId"] == retried.json()["requestId"]
    request_id = retried.json()["requestId"]
    sent = ("Submitted", "Pending", "InProgress", "Succeeded")
    until(lambda: host.get(f"/api/offboard/{request_id}").json()["status"] in sent, timeout=30)
    time.sleep(1)
    assert len(defender.offboard_calls(MACHINE)) == 1, point
    again = host.post("/api/offboard", request)
    assert again.status_code == 202 and again.json()["requestId"] == request_id  # the key: not stuck
