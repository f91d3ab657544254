"""Round-trip benchmark: what one request costs in storage requests and CPU, and how fast the
HTTP intake answers, one request at a time with the default settings.

Runs Azurite, the managed-identity endpoint, the Defender simulator, one local Functions host
serving the HTTP intake (`--no-queues`) and one worker process (`--no-http`). It posts N
requests one after another, waits until Defender accepted each, lets their status checks run
(the check delay shortened to a second; everything else at its default), and reads each
process's storage requests as the app's shared transport counted them
(shared/adapters/transport.py) and the CPU its function threads used.

Figures (per request unless said otherwise):
- intake storage requests: the HTTP process's count / N;
- worker storage requests, first delivery to Submitted: the worker's count / N, in a first pass
  whose status checks are due an hour later (so none runs);
- worker storage requests per follow-up check: in a second pass with checks every second, what
  the worker's count adds over the first deliveries / the checks made (the simulator's actions
  move Pending -> InProgress -> Succeeded, so every check finds a change: the dearest case);
- worker CPU per message: the function threads' CPU / the messages they handled (second pass:
  first deliveries and checks);
- HTTP intake latency p50 and p99 (each POST on its own, a warm connection);
- cold `import function_app`, in a fresh interpreter (with `azure.functions` already imported, as
  the Python worker has imported it before it loads the app, and without).
"""

from __future__ import annotations

import json
import os
import secrets
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any

import requests

from localdev.azurite import Azurite
from localdev.defender_sim import DefenderSimulator
from localdev.host import LOCAL_FUNCTION_KEY
from localdev.identity import IdentityEndpoint

from .pacing import ROOT, Host, percentile

TARGETS = {
    "intake_storage_per_request": 4,
    "worker_storage_first_delivery": 5,
    "worker_storage_per_check": 4,
    "worker_cpu_ms_per_message": 10,
    "intake_p50_ms": 15,
    "cold_import_ms": 200,
}


def cold_import_ms(env: dict[str, str], preload: str = "", repeats: int = 5) -> float:
    code = (
        f"{preload}import time; t = time.perf_counter(); import function_app; print(time.perf_counter() - t)"
    )
    runs = [
        float(
            subprocess.run(
                [sys.executable, "-c", code], cwd=ROOT, env=env, check=True, capture_output=True
            ).stdout
        )
        for _ in range(repeats)
    ]
    return round(statistics.median(runs) * 1000, 1)


def run(count: int, azurite: Azurite, identity: IdentityEndpoint) -> dict[str, Any]:
    """Two passes of `count` requests: the first with status checks out of the way (an hour
    off), so the worker's count is its first deliveries alone; the second with checks every
    second, so what they add over the first deliveries is theirs."""
    first = _pass(count, azurite, identity, checks=False)
    second = _pass(count, azurite, identity, checks=True)
    delivered = first["worker"]["storage_requests"]
    checks = second["checks"]
    added = second["worker"].get("storage_requests", 0) - delivered
    worker = second["worker"]
    return {
        "requests": count,
        "intake_storage_per_request": round(first["intake"]["storage_requests"] / count, 2),
        "worker_storage_first_delivery": round(delivered / count, 2),
        "worker_storage_per_check": round(added / max(1, checks), 2),
        "checks": checks,
        "worker_cpu_ms_per_message": round(
            worker.get("invocation_cpu_seconds", 0.0) * 1000 / max(1, worker.get("invocations", 1)), 3
        ),
        "intake_p50_ms": round(percentile(first["latencies"], 0.5) * 1000, 2),
        "intake_p99_ms": round(percentile(first["latencies"], 0.99) * 1000, 2),
    }


def _pass(count: int, azurite: Azurite, identity: IdentityEndpoint, *, checks: bool) -> dict[str, Any]:
    with DefenderSimulator(accept_token=lambda token: token in identity.tokens, accept_any=True) as defender:
        name = f"rt{uuid.uuid4().hex[:10]}"
        env = {
            **os.environ,
            **json.loads((ROOT / "local.settings.sample.json").read_text())["Values"],
            **identity.env,
            **azurite.app_storage(name),
            "DEFENDER_API_BASE_URL": defender.url,
            "OFFBOARD_BREAKER_LIMIT": str(count + 25),
            # Checks every second in the second pass; an hour away (never, here) in the first.
            "OFFBOARD_CHECK_INITIAL_SECONDS": "1" if checks else "3600",
            "OFFBOARD_CHECK_MAX_SECONDS": "1" if checks else "3600",
        }
        intake = Host.start(env, "--no-queues", "--no-timers")  # no reconciler reads counted
        worker = Host.start(env, "--no-http", "--no-timers")
        session = requests.Session()
        headers = {"x-functions-key": LOCAL_FUNCTION_KEY}
        base = f"http://127.0.0.1:{intake.port}"
        latencies = []
        try:
            # A warm-up request, not counted: it creates the tables and the budget rows (once
            # per deployment) and warms each process's token and connections.
            _post(session, base, headers)
            defender.wait_for_calls(1, timeout=60)
            deadline = time.time() + (30 if checks else 0)
            while time.time() < deadline and len(defender.action_calls()) < 3:
                time.sleep(0.1)
            time.sleep(1.0)
            warm_intake, warm_worker = intake.snapshot(), worker.snapshot()
            warm_checks = len(defender.action_calls())
            for _ in range(count):
                begin = time.perf_counter()
                _post(session, base, headers)
                latencies.append(time.perf_counter() - begin)
            defender.wait_for_calls(count + 1, timeout=120)
            # Each action is read until Succeeded: Pending, InProgress, Succeeded.
            deadline = time.time() + (120 if checks else 0)
            while time.time() < deadline and len(defender.action_calls()) < 3 * (count + 1):
                time.sleep(0.2)
            time.sleep(1.0)  # the last write of the last message
        finally:
            intake_stats = intake.stop()
            worker_stats = worker.stop()
        for host in (intake, worker):
            host.log.unlink(missing_ok=True)
        return {
            "intake": _since(intake_stats, warm_intake),
            "worker": _since(worker_stats, warm_worker),
            "checks": len(defender.action_calls()) - warm_checks,
            "latencies": latencies,
        }


def _post(session: requests.Session, base: str, headers: dict[str, str]) -> None:
    answer = session.post(
        f"{base}/api/offboard", json={"machineId": secrets.token_hex(20)}, headers=headers, timeout=30
    )
    if answer.status_code != 202:
        raise RuntimeError(f"intake answered {answer.status_code}: {answer.text[:200]}")


def _since(final: dict[str, Any], warm: dict[str, Any]) -> dict[str, Any]:
    """The counters a host added after the warm-up."""
    return {
        key: value - warm.get(key, 0) if isinstance(value, int | float) else value
        for key, value in final.items()
    }


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=50, help="requests, sent one at a time")
    args = parser.parse_args(argv)
    with Azurite() as azurite, IdentityEndpoint() as identity:
        env = {**os.environ, "AzureWebJobsStorage": azurite.connection_string}
        result = run(args.requests, azurite, identity)
        result["cold_import_ms"] = cold_import_ms(env, "import azure.functions; ")
        result["cold_import_with_azure_functions_ms"] = cold_import_ms(env)
    print(table(result))
    print(json.dumps({"benchmark": "roundtrips", **result}))
    return 0


def table(result: dict[str, Any]) -> str:
    rows = [
        ("requests, one at a time", "requests", None),
        ("intake: storage requests per request", "intake_storage_per_request", "intake_storage_per_request"),
        (
            "worker: storage requests, first delivery",
            "worker_storage_first_delivery",
            "worker_storage_first_delivery",
        ),
        ("worker: storage requests per check", "worker_storage_per_check", "worker_storage_per_check"),
        ("  status checks made", "checks", None),
        ("worker CPU per message, ms", "worker_cpu_ms_per_message", "worker_cpu_ms_per_message"),
        ("HTTP intake latency p50, ms", "intake_p50_ms", "intake_p50_ms"),
        ("HTTP intake latency p99, ms", "intake_p99_ms", None),
        ("cold import function_app, ms", "cold_import_ms", "cold_import_ms"),
        ("  with azure.functions too, ms", "cold_import_with_azure_functions_ms", None),
    ]
    width = max(len(label) for label, _, _ in rows)
    lines = []
    for label, key, target in rows:
        goal = f"(target <= {TARGETS[target]})" if target else ""
        lines.append(f"{label:{width}}  {result.get(key)!s:>10}  {goal}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
