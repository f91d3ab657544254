"""Pacing benchmark: the real pipeline against a rate-limited Defender simulator.

Runs Azurite, the loopback managed-identity endpoint, the Defender simulator enforcing
sliding windows, one local Functions host serving the HTTP intake (`--no-queues`) and 1,
then 4, worker processes (`python -m localdev.host --no-http`) on the same queue and the
same rate-limit table. It posts N offboard requests over HTTP and waits until Defender has
accepted every one, then prints a table and one JSON line.

Scaling (so that both windows bind in about a minute per run):
- time: `--time-scale 60` makes Defender's minute last 1 s and its hour 60 s, for the
  simulator and, through DEFENDER_OFFBOARD_RATE_LIMITS, for the app;
- counts: `--minute-calls 10` (and 15 times that per hour, Defender's ratio). Queue delays
  have a resolution of whole seconds, so a message that waits for its slot spends up to
  about a second of a worker thread; at full counts (100 per scaled 1 s) one process would
  need ~100 threads, where in real time a burst of 100 has a whole minute. Use
  `--minute-calls 100` to see it.
- N defaults to the hour budget plus one minute's: the first 15 "minutes" drain the hour
  budget, the rest must wait for the hour window, so both windows bind.

The theoretical minimum (the bound) is the greedy schedule under every window at once:
call k (0-based) cannot start before max(call k-1, call k-L + W) for each window (L, W),
and nothing starts before 0. For N = 160 with 10/1 s and 150/60 s that is 60 s: bursts of
10 at 0, 1, ..., 14 s, then 10 at 60 s. Makespan is measured from the first HTTP request
sent to the last call Defender accepted; efficiency = bound / makespan.

While it runs it prints a progress line to stderr every few seconds (`--progress-every`).
`--plot FILE.png` also draws each run's offboard calls in the sliding minute and hour
against the two limits, in Defender's unscaled time (`bench/plot.py`).

Run it with `scripts/bench` (it sets up first). Options: `--help`.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from localdev.azurite import Azurite
from localdev.defender_sim import DefenderSimulator
from localdev.host import LOCAL_FUNCTION_KEY, launch
from localdev.identity import IdentityEndpoint

from .progress import ProgressLine

ROOT = Path(__file__).resolve().parent.parent
MINUTE, HOUR = 60.0, 3600.0


def bound_seconds(requests_count: int, windows: Sequence[tuple[int, float]]) -> float:
    """Start of the last call in the fastest schedule any client could have: greedy."""
    starts: list[float] = []
    for k in range(requests_count):
        start = starts[-1] if starts else 0.0
        for calls, seconds in windows:
            if k >= calls:
                start = max(start, starts[k - calls] + seconds)
        starts.append(start)
    return starts[-1] if starts else 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cold_import_seconds(env: dict[str, str], repeats: int = 5) -> float:
    code = "import time; t = time.perf_counter(); import function_app; print(time.perf_counter() - t)"
    runs = [
        float(
            subprocess.run(
                [sys.executable, "-c", code], cwd=ROOT, env=env, check=True, capture_output=True
            ).stdout
        )
        for _ in range(repeats)
    ]
    return statistics.median(runs)


@dataclass
class Host:
    process: subprocess.Popen[bytes]
    port: int | None
    log: Path

    @classmethod
    def start(cls, env: dict[str, str], *args: str) -> Host:
        return cls(*launch(env, *args, log_prefix="bench-host-"))

    def snapshot(self) -> dict[str, Any]:
        """The host's counters so far, without stopping it (SIGUSR1 makes it print them)."""
        assert self.process.stdout is not None
        self.process.send_signal(signal.SIGUSR1)
        while True:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"a local host stopped before it answered (log: {self.log})")
            if line.startswith(b"{") and json.loads(line).get("snapshot"):
                return dict(json.loads(line))

    def stop(self, *, report: bool = True) -> dict[str, Any]:
        """Stops the host; with `report`, by Ctrl-C so it prints its queue invocations and
        their CPU first."""
        if not report:
            self.process.terminate()
            self.process.wait(10)
            return {}
        self.process.send_signal(signal.SIGINT)
        try:
            out, _ = self.process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            print(f"a local host did not stop on Ctrl-C; killing it (log: {self.log})", file=sys.stderr)
            self.process.kill()
            out, _ = self.process.communicate()
        lines = [json.loads(line) for line in out.splitlines() if line.startswith(b"{")]
        return next((line for line in lines if line.get("stopped")), {})


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def run(
    workers: int,
    args: argparse.Namespace,
    azurite: Azurite,
    identity: IdentityEndpoint,
    progress: Callable[[str], None] | None = None,
) -> tuple[dict[str, Any], list[float], list[float]]:
    """One run: its results, and the times of the calls Defender accepted and refused (429),
    in real seconds since the first request."""
    scale = args.time_scale
    windows = ((args.minute_calls, MINUTE), (args.minute_calls * 15, HOUR))
    real_windows = [(calls, seconds / scale) for calls, seconds in windows]
    count = args.requests or args.minute_calls * 16
    with DefenderSimulator(
        accept_token=lambda token: token in identity.tokens,
        rate_limits={"offboard": windows},
        time_scale=scale,
        accept_any=True,  # the benchmark posts random machine ids
    ) as defender:
        name = f"bench{uuid.uuid4().hex[:10]}"
        env = {
            **os.environ,
            **json.loads((ROOT / "local.settings.sample.json").read_text())["Values"],
            **identity.env,
            **azurite.app_storage(name),
            "DEFENDER_API_BASE_URL": defender.url,
            "DEFENDER_OFFBOARD_RATE_LIMITS": ",".join(
                f"{calls}/{seconds:g}" for calls, seconds in real_windows
            ),
            # One machine, one clock: the margin only has to cover the time from a slot's
            # check to the call's arrival, which on 2 busy cores reaches a few tenths of a
            # second (measured, 2026-12-01: 0.4 s let one 429 through with 4 workers; 0.6 s
            # none in three runs and fewer slots wasted; 0.8 s was not better: see
            # docs/benchmarks.md). Azure's default is 1 s against real minutes.
            "RATE_LIMIT_MARGIN_SECONDS": str(args.margin),
            "RATE_LIMIT_MAX_INLINE_WAIT_SECONDS": str(args.inline_wait),
            # The benchmark measures the offboard budget: the simulator limits only offboards
            # here, so the precheck's reads get a budget that never binds, the breaker lets all
            # requests through, and status checks start after the run.
            "DEFENDER_MACHINE_READ_RATE_LIMITS": "5000/1",
            "OFFBOARD_BREAKER_LIMIT": "1000",
            "OFFBOARD_CHECK_INITIAL_SECONDS": "3600",
        }
        # No schedules: a timer function firing mid-run would spend CPU and Defender calls
        # the benchmark would count as pacing's.
        intake = Host.start(env, "--no-queues", "--no-timers")
        pool = [Host.start(env, "--no-http", "--no-timers") for _ in range(workers)]
        stats: list[dict[str, Any]] = []
        try:
            time.sleep(1.0)  # let the workers' first polls settle before measuring CPU
            cpu_before = sum(cpu_seconds(h.process.pid) for h in pool)
            retried: list[int] = []
            latencies = send(f"http://127.0.0.1:{intake.port}", count, args.senders, retried)
            started = latencies.pop()  # send() appends the start time last
            deadline = time.time() + bound_seconds(count, real_windows) * 3 + 60
            succeeded = wait_for_successes(defender, count, deadline, progress)
            process_cpu = sum(cpu_seconds(h.process.pid) for h in pool) - cpu_before
        finally:
            intake.stop(report=False)
            stats = [host.stop() for host in pool]
        invocations = sum(s.get("invocations", 0) for s in stats)
        function_cpu = sum(s.get("invocation_cpu_seconds", 0.0) for s in stats)
        throttled = {id(call) for call in defender.throttled}
        calls = defender.offboard_calls()
        accepted = [c for c in calls if id(c) not in throttled]
        machines = {c.path for c in accepted}
        makespan = max(c.at for c in accepted) - started if accepted else float("nan")
        bound = bound_seconds(count, real_windows)
        for host in [intake, *pool]:
            host.log.unlink(missing_ok=True)
    accepted_at = sorted(c.at - started for c in accepted)
    throttled_at = sorted(c.at - started for c in defender.throttled)
    result = {
        "workers": workers,
        "requests": count,
        "succeeded": len(machines),
        "lost": count - len(machines),
        "defender_calls": len(calls),
        "calls_per_request": round(len(calls) / count, 4),
        "duplicate_calls": len(accepted) - len(machines),
        "throttled_429": len(defender.throttled),
        "throttled_429_after_first_window": sum(
            1 for c in defender.throttled if c.at > started + real_windows[0][1]
        ),
        "bound_s": round(bound, 3),
        "makespan_s": round(makespan, 3),
        "efficiency": round(bound / makespan, 4),
        # CPU of the function's own thread per request (all its deliveries, waits excluded:
        # a sleeping thread uses none), and the worker processes' whole CPU for comparison
        # (that adds the local host's queue polling, which the real host does in .NET).
        "worker_cpu_ms_per_message": round(function_cpu * 1000 / count, 3),
        "function_invocations": invocations,
        "worker_process_cpu_ms_per_message": round(process_cpu * 1000 / count, 3),
        "first_429_at_s": round(min(c.at for c in defender.throttled) - started, 3)
        if defender.throttled
        else None,
        "enqueue_p50_ms": round(percentile(latencies, 0.5) * 1000, 2),
        "enqueue_p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        "enqueue_503_retried": len(retried),
        "limits": ",".join(f"{calls}/{seconds:g}s" for calls, seconds in windows),
        "time_scale": scale,
        "finished": succeeded,
    }
    return result, accepted_at, throttled_at


SEND_TRIES = 3  # a 503 ("try again") is retried with the same idempotency key, as a caller would


def send(base: str, count: int, senders: int, retried: list[int]) -> list[float]:
    """Posts `count` requests from `senders` threads; the latency of each (its first try to
    its 202) and, last, the start time. Each 503 retried is appended to `retried`."""
    session = requests.Session()

    def post(_: int) -> float:
        begin = time.perf_counter()
        body = {"machineId": secrets.token_hex(20)}
        headers = {"x-functions-key": LOCAL_FUNCTION_KEY, "Idempotency-Key": f"bench-{uuid.uuid4()}"}
        for tries in range(1, SEND_TRIES + 1):
            response = session.post(f"{base}/api/offboard", json=body, headers=headers, timeout=30)
            if response.status_code != 503 or tries == SEND_TRIES:
                break
            retried.append(1)
            time.sleep(0.5 * tries)
        if response.status_code != 202:
            raise RuntimeError(f"intake answered {response.status_code}: {response.text[:200]}")
        return time.perf_counter() - begin

    started = time.time()
    with ThreadPoolExecutor(senders) as executor:
        latencies = list(executor.map(post, range(count)))
    return [*latencies, started]


def wait_for_successes(
    defender: DefenderSimulator,
    count: int,
    deadline: float,
    progress: Callable[[str], None] | None = None,
) -> bool:
    """Waits until Defender has accepted an offboard of `count` machines; `progress` is
    told how many so far."""
    while time.time() < deadline:
        throttled = {id(call) for call in defender.throttled}
        done = len({c.path for c in defender.offboard_calls() if id(c) not in throttled})
        if progress is not None:
            progress(f"{done}/{count} accepted")
        if done >= count:
            time.sleep(0.5)  # long enough to see a duplicate call, if one were coming
            return True
        time.sleep(0.05)
    return False


def table(results: list[dict[str, Any]], import_seconds: float) -> str:
    rows = [
        ("requests sent", "requests"),
        ("succeeded", "succeeded"),
        ("lost (target 0)", "lost"),
        ("Defender calls per request (target 1.0)", "calls_per_request"),
        ("duplicate calls (target 0)", "duplicate_calls"),
        ("429s received", "throttled_429"),
        ("429s after the first window (target 0)", "throttled_429_after_first_window"),
        ("theoretical minimum, s", "bound_s"),
        ("makespan, s", "makespan_s"),
        ("efficiency = bound / makespan (target >= 0.97)", "efficiency"),
        ("worker CPU per message, ms (target < 5)", "worker_cpu_ms_per_message"),
        ("  function invocations (incl. waits re-queued)", "function_invocations"),
        ("  whole worker processes' CPU per message, ms", "worker_process_cpu_ms_per_message"),
        ("HTTP enqueue latency p50, ms", "enqueue_p50_ms"),
        ("HTTP enqueue latency p99, ms", "enqueue_p99_ms"),
        ("  503s retried by the senders (same key)", "enqueue_503_retried"),
    ]
    width = max(len(label) for label, _ in rows)
    head = f"{'':{width}}  " + "  ".join(f"{str(r['workers']) + ' worker(s)':>12}" for r in results)
    lines = [head, "-" * len(head)]
    lines += [f"{label:{width}}  " + "  ".join(f"{r[key]!s:>12}" for r in results) for label, key in rows]
    lines.append(f"{'cold import function_app, ms':{width}}  {import_seconds * 1000:>12.1f}")
    lines.append(f"limits {results[0]['limits']} at time scale {results[0]['time_scale']:g}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4], help="worker processes per run")
    parser.add_argument("--time-scale", type=float, default=60.0, help="Defender seconds per real second")
    parser.add_argument("--minute-calls", type=int, default=10, help="calls per minute (15x per hour)")
    parser.add_argument("--requests", type=int, default=0, help="default: 16 minutes' worth")
    parser.add_argument("--margin", type=float, default=0.6, help="RATE_LIMIT_MARGIN_SECONDS for the app")
    parser.add_argument("--inline-wait", type=float, default=1.5, help="RATE_LIMIT_MAX_INLINE_WAIT_SECONDS")
    parser.add_argument("--senders", type=int, default=8, help="concurrent HTTP clients")
    parser.add_argument(
        "--plot",
        type=Path,
        metavar="FILE.png",
        help="also draw each run's calls per sliding minute and hour against the limits",
    )
    parser.add_argument(
        "--progress-every",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="a progress line on stderr this often (default 5; 0: none)",
    )
    args = parser.parse_args(argv)
    if args.plot is not None:
        from .plot import supported  # matplotlib only when a picture is asked for

        problem = supported(args.plot)
        if problem:
            parser.error(problem)

    line = ProgressLine(args.progress_every)
    runs: list[tuple[dict[str, Any], list[float], list[float]]] = []
    with Azurite() as azurite, IdentityEndpoint() as identity:
        env = {**os.environ, "AzureWebJobsStorage": azurite.connection_string}
        line.done("bench: timing the cold import of function_app")
        import_seconds = cold_import_seconds(env)
        for index, workers in enumerate(args.workers, 1):
            label = f"bench: run {index}/{len(args.workers)} ({workers} worker{'s' if workers != 1 else ''})"
            began = time.monotonic()

            def report(text: str, label: str = label, began: float = began) -> None:
                line.update(f"{label}: {text}, {time.monotonic() - began:.0f}s elapsed")

            line.done(f"{label}: starting")
            runs.append(run(workers, args, azurite, identity, report))
            line.done(f"{label}: finished in {time.monotonic() - began:.0f}s")
    results = [result for result, _, _ in runs]
    if args.plot is not None:
        plot(args.plot, args, runs)
        line.done(f"bench: drew {args.plot}")
    print(table(results, import_seconds))
    print(
        json.dumps(
            {"benchmark": "pacing", "cold_import_ms": round(import_seconds * 1000, 1), "runs": results}
        )
    )
    return 0


def plot(
    path: Path, args: argparse.Namespace, runs: list[tuple[dict[str, Any], list[float], list[float]]]
) -> None:
    from .plot import RunTrace, draw  # matplotlib only when a picture is asked for

    scale = args.time_scale  # real seconds -> Defender seconds
    traces: list[RunTrace] = [
        RunTrace(
            workers=result["workers"],
            accepted=[t * scale for t in accepted],
            throttled=[t * scale for t in throttled],
            minute_limit=args.minute_calls,
            hour_limit=args.minute_calls * 15,
            bound=result["bound_s"] * scale,
            makespan=result["makespan_s"] * scale,
            efficiency=result["efficiency"],
        )
        for result, accepted, throttled in runs
    ]
    subtitle = (
        f"{runs[0][0]['requests']} requests a run; limits {args.minute_calls} a minute and "
        f"{args.minute_calls * 15} an hour (Defender's 100 and 1,500, divided by "
        f"{100 / args.minute_calls:g}); run {scale:g}x faster than Defender's clock"
    )
    draw(traces, path, subtitle)


if __name__ == "__main__":
    sys.exit(main())
