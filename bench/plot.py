"""The pacing benchmark as a picture: Defender's two sliding windows, run by run.

For each run, offboard calls Defender accepted in the sliding minute and in the sliding
hour, against each window's limit, in Defender's own (unscaled) time, from the call times
the simulator recorded; calls it answered 429 are marked where they fell. Drawn with
matplotlib's Agg canvas (no display, no pyplot state).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

MINUTE, HOUR = 60.0, 3600.0


@dataclass(frozen=True)
class RunTrace:
    """What one run's picture needs; times are Defender seconds since the first request."""

    workers: int
    accepted: Sequence[float]
    throttled: Sequence[float]
    minute_limit: int
    hour_limit: int
    bound: float  # Defender seconds: when the fastest possible schedule makes its last call
    makespan: float  # Defender seconds
    efficiency: float


def supported(path: Path) -> str | None:
    """Why `path` cannot take a picture, or None; checked before a run of minutes."""
    formats = Figure().canvas.get_supported_filetypes()
    suffix = path.suffix.lstrip(".").lower()
    if suffix not in formats:
        return f"--plot {path}: the name must end in one of {', '.join('.' + f for f in sorted(formats))}"
    if not path.parent.is_dir():
        return f"--plot {path}: the folder {path.parent} does not exist"
    return None


def sliding_counts(times: Sequence[float], window: float) -> tuple[list[float], list[int]]:
    """A step function: at each change, how many of `times` lie in (t - window, t]."""
    events = sorted([(t, 1) for t in times] + [(t + window, -1) for t in times])
    xs, ys, count = [0.0], [0], 0
    for moment, change in events:
        count += change
        xs.append(moment)
        ys.append(count)
    return xs, ys


def count_at(xs: Sequence[float], ys: Sequence[int], moment: float) -> int:
    value = 0
    for x, y in zip(xs, ys, strict=True):
        if x > moment:
            break
        value = y
    return value


def _window(axes: Axes, trace: RunTrace, window: float, limit: int, name: str) -> None:
    xs, ys = sliding_counts(trace.accepted, window)
    minutes = [x / MINUTE for x in xs]
    axes.step(
        minutes, ys, where="post", color="tab:blue", linewidth=1.4, label=f"accepted in the last {name}"
    )
    axes.axhline(limit, color="tab:red", linestyle="--", linewidth=1.2, label=f"limit: {limit} a {name}")
    axes.axvline(
        trace.bound / MINUTE,
        color="tab:gray",
        linestyle=":",
        linewidth=1.2,
        label="fastest possible last call",
    )
    if trace.throttled:
        axes.plot(
            [t / MINUTE for t in trace.throttled],
            [count_at(xs, ys, t) for t in trace.throttled],
            "x",
            color="tab:red",
            markersize=7,
            label=f"answered 429 ({len(trace.throttled)})",
        )
    # Accepted calls never exceed the limit, so the band above it holds the legend.
    axes.set_ylim(0, limit * 1.32)
    # Up to a little past the last call: the hour after it (calls leaving) says nothing new.
    last = max(trace.accepted, default=0.0) / MINUTE
    axes.set_xlim(0, last * 1.04 + 1.0)
    axes.set_title(f"sliding {name}", fontsize=10)
    axes.set_xlabel("Defender time since the first request, minutes")
    axes.set_ylabel(f"offboard calls in the last {name}")
    axes.grid(True, alpha=0.3)
    axes.legend(loc="upper center", ncols=4 if trace.throttled else 3, fontsize=8, framealpha=0.9)


def draw(traces: Sequence[RunTrace], path: Path, subtitle: str) -> None:
    """Two panels per run (sliding minute, sliding hour), one row per run, saved at `path`."""
    figure = Figure(figsize=(13, 4.2 * len(traces) + 0.7), layout="constrained")
    figure.suptitle(f"Offboard pacing against Defender's rate limits\n{subtitle}", fontsize=12)
    rows = figure.subfigures(len(traces), 1, squeeze=False)[:, 0]
    for row, trace in zip(rows, traces, strict=True):
        processes = f"{trace.workers} worker process{'es' if trace.workers != 1 else ''}"
        row.suptitle(
            f"{processes}: {len(trace.accepted)} calls accepted, the last after "
            f"{trace.makespan / MINUTE:.1f} min (fastest possible {trace.bound / MINUTE:.1f}), "
            f"efficiency {trace.efficiency:.2f}",
            fontsize=11,
        )
        minute_axes, hour_axes = row.subplots(1, 2)
        _window(minute_axes, trace, MINUTE, trace.minute_limit, "minute")
        _window(hour_axes, trace, HOUR, trace.hour_limit, "hour")
    figure.savefig(path, dpi=100)
