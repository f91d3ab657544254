"""A tiny function app for the local host's timer tests, independent of function_app.py.

Each run appends one JSON line to the file named by TIMER_APP_LOG: which function ran,
whether it was past due, and when. TIMER_APP_SLEEP makes `watch` take that long.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import azure.functions as func


def record(function: str, timer: func.TimerRequest) -> None:
    # The worker passes azure.functions.timer.TimerRequest; the abstract type lacks this.
    status: dict[str, Any] = getattr(timer, "schedule_status", {})
    line = {"function": function, "pastDue": timer.past_due, "at": time.time(), **status}
    with open(os.environ["TIMER_APP_LOG"], "a", encoding="utf-8") as log:
        log.write(json.dumps(line) + "\n")


def build_app() -> func.FunctionApp:
    """A new app object each time: `get_functions()` may be called once per app."""
    app = func.FunctionApp()

    @app.function_name("Watch")
    @app.timer_trigger(schedule="%TIMER_APP_SCHEDULE%", arg_name="timer", use_monitor=False)
    def watch(timer: func.TimerRequest) -> None:
        record("Watch", timer)
        time.sleep(float(os.environ.get("TIMER_APP_SLEEP", "0")))

    @app.timer_trigger(schedule="0 */2 * * * *", arg_name="sweep_timer")
    def sweep(sweep_timer: func.TimerRequest) -> None:
        record("sweep", sweep_timer)

    @app.timer_trigger(schedule="0 0 0 1 1 *", arg_name="timer")
    def broken(timer: func.TimerRequest) -> None:
        raise RuntimeError("this timer function always fails")

    @app.route(route="ping", auth_level=func.AuthLevel.ANONYMOUS)
    def ping(req: func.HttpRequest) -> func.HttpResponse:
        return func.HttpResponse("pong")

    return app


app = build_app()  # for `python -m localdev.host --app tests.timer_app:app`
