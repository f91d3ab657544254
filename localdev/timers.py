"""Timer triggers for the local Functions host: NCRONTAB schedules and on-demand runs.

What the real host does, as far as a local host can:
- the schedule is NCRONTAB, six fields with seconds first (`0 */5 * * * *`), in UTC;
  `%NAME%` is replaced by the app setting NAME, and a setting that is missing or empty is an
  error naming the function and the setting (the real host refuses to index the function);
- each timer function runs on its schedule in its own thread, never overlapping itself (the
  real host's singleton lock), with `run_on_startup` honoured;
- `TimerRequest.past_due` is True when an occurrence was missed because the previous
  run was still going: the function then runs once, at once, and the schedule carries on
  from the next future occurrence (missed occurrences are not replayed, as in the host);
- `invoke()` is the admin API's on-demand run (`POST /admin/functions/{name}`).

Not done: the schedule monitor (`use_monitor`: status kept in storage across restarts, so a
restarted host cannot know it missed an occurrence), WEBSITE_TIME_ZONE, TimeSpan schedules
(`00:05:00`), and coordination between several local host processes (the real host holds a
blob lease so that one instance runs the schedule): run timers in one local host only.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from azure.functions.timer import TimerRequest
from croniter import croniter

log = logging.getLogger("localdev.host")
_SETTING = re.compile(r"%([^%]+)%")


class HostConfigError(ValueError):
    """The app cannot be hosted as written (what the real host reports at indexing)."""


def resolve_settings(expression: str, env: Mapping[str, str], function_name: str) -> str:
    """`expression` with every `%NAME%` replaced by the app setting NAME."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        found = env.get(name, "").strip()
        if not found:
            raise HostConfigError(
                f"Function '{function_name}': '{match.group(0)}' does not resolve to a value: "
                f"set the app setting {name}"
            )
        return found

    return _SETTING.sub(value, expression)


class Schedule:
    """An NCRONTAB schedule: six fields, seconds first, read in UTC."""

    def __init__(self, expression: str, function_name: str) -> None:
        fields = expression.split()
        if len(fields) != 6 or not croniter.is_valid(expression, second_at_beginning=True):
            raise HostConfigError(
                f"Function '{function_name}': {expression!r} is not an NCRONTAB schedule "
                "(six fields, seconds first, e.g. '0 */5 * * * *')"
            )
        self.expression = " ".join(fields)

    def next_after(self, moment: datetime) -> datetime:
        """The first occurrence strictly after `moment`."""
        following: datetime = croniter(
            self.expression, moment.astimezone(UTC), second_at_beginning=True
        ).get_next(datetime)
        return following


@dataclass(frozen=True)
class TimerFunction:
    name: str
    schedule: Schedule
    arg_name: str
    run_on_startup: bool
    handler: Callable[..., Any]


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


class Timers:
    """Runs the app's timer functions on their schedules and on demand."""

    def __init__(self, functions: list[TimerFunction], stop: threading.Event) -> None:
        self.functions = {f.name.lower(): f for f in functions}  # the host's names ignore case
        self.invocations: dict[str, int] = {f.name: 0 for f in functions}
        self._stop = stop
        self._locks = {f.name: threading.Lock() for f in functions}
        self._last: dict[str, datetime | None] = {f.name: None for f in functions}
        self._stats_lock = threading.Lock()

    def find(self, name: str) -> TimerFunction | None:
        return self.functions.get(name.lower())

    def start(self) -> list[threading.Thread]:
        threads = [
            threading.Thread(target=self._run, args=(f,), name=f"timer-{f.name}", daemon=True)
            for f in self.functions.values()
        ]
        for thread in threads:
            thread.start()
        return threads

    def invoke(self, function: TimerFunction, *, past_due: bool = False, due: datetime | None = None) -> bool:
        """Runs `function` once, after any run of it still going; True if it returned."""
        with self._locks[function.name]:
            now = datetime.now(UTC)
            # The concrete class the Python worker builds (`func.TimerRequest` is abstract).
            request = TimerRequest(
                past_due=past_due,
                schedule_status={
                    "Last": _iso(self._last[function.name]),
                    "Next": _iso(function.schedule.next_after(now)),
                    "LastUpdated": _iso(now),
                },
                schedule={"AdjustForDST": True},
            )
            self._last[function.name] = due or now
            with self._stats_lock:
                self.invocations[function.name] += 1
            try:
                function.handler(**{function.arg_name: request})
            except Exception:
                log.exception("Function %s raised (timer)", function.name)
                return False
            return True

    def _run(self, function: TimerFunction) -> None:
        log.info("Timer %s: schedule %s (UTC)", function.name, function.schedule.expression)
        if function.run_on_startup:
            self.invoke(function)
        due = function.schedule.next_after(datetime.now(UTC))
        while not self._stop.wait(max(0.0, (due - datetime.now(UTC)).total_seconds())):
            self.invoke(function, due=due)
            following = function.schedule.next_after(due)
            now = datetime.now(UTC)
            if following <= now:
                # The run outlasted the next occurrence: run once more, past due, then go on
                # from the next occurrence still ahead.
                self.invoke(function, past_due=True, due=following)
                following = function.schedule.next_after(datetime.now(UTC))
            due = following
