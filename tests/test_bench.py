"""The pacing benchmark's picture and progress line, and one short real run of scripts/bench."""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path

import pytest

from bench.plot import RunTrace, count_at, draw, sliding_counts, supported
from bench.progress import ProgressLine

ROOT = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RESULT_KEYS = {
    "workers",
    "requests",
    "succeeded",
    "lost",
    "defender_calls",
    "calls_per_request",
    "duplicate_calls",
    "throttled_429",
    "throttled_429_after_first_window",
    "bound_s",
    "makespan_s",
    "efficiency",
    "worker_cpu_ms_per_message",
    "function_invocations",
    "worker_process_cpu_ms_per_message",
    "first_429_at_s",
    "enqueue_p50_ms",
    "enqueue_p99_ms",
    "enqueue_503_retried",
    "limits",
    "time_scale",
    "finished",
}


def test_sliding_counts_hold_the_calls_of_the_half_open_window() -> None:
    xs, ys = sliding_counts([0.0, 10.0, 70.0], 60.0)
    # (t - 60, t]: a call at 0 counts until just before 60; at 70 the one at 10 leaves as 70 enters.
    times = (5, 15, 59.9, 60, 69.9, 70, 129.9, 130)
    assert [count_at(xs, ys, t) for t in times] == [1, 2, 2, 1, 1, 1, 1, 0]


def trace(workers: int, throttled: list[float]) -> RunTrace:
    bursts = [minute * 60.0 + i for minute in range(15) for i in range(10)] + [3600.0 + i for i in range(10)]
    return RunTrace(workers, bursts, throttled, 10, 150, bound=3600.0, makespan=3620.0, efficiency=0.99)


def test_the_picture_is_a_png_with_a_row_per_run(tmp_path: Path) -> None:
    path = tmp_path / "pacing.png"
    draw([trace(1, []), trace(4, [30.0, 61.0])], path, "160 requests a run")
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and 20_000 < len(data) < 400_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width == 1300 and height > 800  # 13 x (4.2 per run + 0.7) inches at 100 dpi


@pytest.mark.parametrize(
    ("name", "problem"), [("pacing.txt", "must end in one of"), ("missing/pacing.png", "does not exist")]
)
def test_a_plot_path_that_cannot_work_is_refused_before_the_run(
    tmp_path: Path, name: str, problem: str
) -> None:
    assert problem in (supported(tmp_path / name) or "")
    assert supported(tmp_path / "pacing.png") is None


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_plain_lines_at_most_every_interval_when_not_a_terminal() -> None:
    stream = io.StringIO()
    line = ProgressLine(every=60, stream=stream)
    line.update("1/10 accepted")
    line.update("2/10 accepted")  # within the interval: not shown
    line.done("10/10 accepted")
    assert stream.getvalue() == "1/10 accepted\n10/10 accepted\n"


def test_progress_rewrites_one_line_on_a_terminal() -> None:
    stream = Terminal()
    line = ProgressLine(every=0.0001, stream=stream)
    line.update("1/10")
    line.done("10/10")
    assert stream.getvalue() == "\r\x1b[K1/10\r\x1b[K10/10\n"


def test_no_progress_when_asked_for_none() -> None:
    stream = io.StringIO()
    ProgressLine(every=0, stream=stream).done("x")
    assert stream.getvalue() == ""


def test_a_short_benchmark_prints_progress_the_table_the_json_line_and_draws(tmp_path: Path) -> None:
    picture = tmp_path / "pacing.png"
    result = subprocess.run(
        [
            str(ROOT / "scripts" / "bench"),
            *("--only", "pacing", "--workers", "1", "--requests", "8", "--minute-calls", "4"),
            *("--plot", str(picture), "--progress-every", "1"),
        ],
        env=dict(os.environ),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["benchmark"] == "pacing" and set(summary["runs"][0]) == RESULT_KEYS
    assert summary["runs"][0]["succeeded"] == 8 and summary["runs"][0]["lost"] == 0
    assert lines[0].strip().startswith("1 worker(s)") and lines[1].startswith("---")
    assert "accepted" in result.stderr and "run 1/1 (1 worker)" in result.stderr
    assert "\x1b" not in result.stderr and "\r" not in result.stderr  # not a terminal: plain lines
    assert picture.read_bytes().startswith(PNG_SIGNATURE)


def test_a_short_round_trip_benchmark_counts_each_part_of_a_request() -> None:
    """Three requests through two real hosts: the counts are the app's own, whole per request."""
    from bench import roundtrips
    from localdev.azurite import Azurite
    from localdev.identity import IdentityEndpoint

    with Azurite() as azurite, IdentityEndpoint() as identity:
        result = roundtrips.run(3, azurite, identity)
    assert result["requests"] == 3 and result["checks"] == 9  # Pending, InProgress, Succeeded each
    # What the issue asked for and the code does: the intake's guards, row with its events and
    # message; the worker's slots, claim, Submitted row and check message; a check's read slot,
    # row and next check. A count over these means a round trip crept back in.
    assert result["intake_storage_per_request"] <= 4
    assert result["worker_storage_first_delivery"] <= 5
    assert result["worker_storage_per_check"] <= 4
    assert "worker: storage requests per check" in roundtrips.table(result)
