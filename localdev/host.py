"""A local stand-in for the Azure Functions host (which cannot be installed here).

It loads `function_app.app` (or `--app MODULE:ATTRIBUTE`) and does what the host does with
it, driven by host.json:
- serves the HTTP triggers on a loopback port under `/api`, checking function keys the way
  the host does (`x-functions-key` header or `?code=`), and turns real HTTP into
  `func.HttpRequest`;
- runs each queue trigger like the host's queue listener: base64 messages, `batchSize` and
  `newBatchThreshold`, polling that backs off to `maxPollingInterval` when idle, a message
  that raised becomes visible again after `visibilityTimeout`, and one that raised on its
  `maxDequeueCount`-th delivery is moved, unchanged, to `<queue>-poison`;
- runs each timer trigger on its NCRONTAB schedule (`localdev.timers`), and on demand
  through the admin API as the host does: `POST /admin/functions/{functionName}` with the
  master key (`x-functions-key` or `?code=`; a function key is refused with 401) and a JSON
  body such as `{"input": ""}`. It answers `202 Accepted` once the function has returned
  (the real host answers at once and runs it in the background), so a caller knows it has
  finished; `X-Local-Function-Outcome: Succeeded` or `Failed` (it raised; see the log) says
  how it went. Only timer functions are invoked this way here.

`%NAME%` in a queue name or a schedule is the app setting NAME; when it is missing the host
does not start and says which function and setting (the real host refuses that function).

Run: `python -m localdev.host --port 7071` with the app's settings in the environment
(`--no-http`, `--no-queues`, `--no-timers` leave a part out). On Ctrl-C (SIGINT) it prints
one JSON line of stats: queue invocations, their CPU, and timer invocations per function.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import importlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import azure.functions as func
from azure.core.exceptions import ResourceExistsError
from azure.functions.decorators.http import HttpTrigger
from azure.functions.decorators.queue import QueueTrigger
from azure.functions.decorators.timer import TimerTrigger
from azure.functions.queue import QueueMessage
from azure.storage.queue import QueueClient

from .loopback import QuietHandler
from .timers import HostConfigError, Schedule, TimerFunction, Timers, resolve_settings

ROOT = Path(__file__).resolve().parent.parent
LOCAL_FUNCTION_KEY = "local-function-key"  # not a secret: only this loopback host knows it
LOCAL_MASTER_KEY = "local-master-key"
log = logging.getLogger("localdev.host")
_ADMIN_FUNCTION = re.compile(r"/admin/functions/([^/]+)")


@dataclass(frozen=True)
class QueueOptions:
    batch_size: int = 16
    new_batch_threshold: int = 8
    max_polling_interval: float = 60.0
    visibility_timeout: float = 0.0
    max_dequeue_count: int = 5
    base64: bool = True
    function_timeout: float = 300.0

    @classmethod
    def from_host_json(cls, path: Path = ROOT / "host.json") -> QueueOptions:
        host = json.loads(path.read_text())
        queues = host.get("extensions", {}).get("queues", {})
        batch = int(queues.get("batchSize", 16))
        return cls(
            batch_size=batch,
            new_batch_threshold=int(queues.get("newBatchThreshold", batch // 2)),
            max_polling_interval=_timespan(queues.get("maxPollingInterval", "00:01:00")),
            visibility_timeout=_timespan(queues.get("visibilityTimeout", "00:00:00")),
            max_dequeue_count=int(queues.get("maxDequeueCount", 5)),
            base64=queues.get("messageEncoding", "base64") == "base64",
            function_timeout=_timespan(host.get("functionTimeout", "00:05:00")),
        )


def _timespan(value: str | int | float) -> float:
    if isinstance(value, int | float):
        return float(value) / 1000  # host.json takes milliseconds for plain numbers
    hours, minutes, seconds = value.split(":")
    return timedelta(hours=int(hours), minutes=int(minutes), seconds=float(seconds)).total_seconds()


@dataclass(frozen=True)
class HttpRoute:
    name: str
    pattern: re.Pattern[str]
    methods: frozenset[str]
    auth_level: str
    handler: Any


def _route_pattern(template: str) -> re.Pattern[str]:
    # "offboard/{requestId}" -> ^offboard/(?P<requestId>[^/]+)$ ; constraints (":guid") ignored
    regex = re.sub(r"\{(\w+)(?::[^}]*)?\}", lambda m: f"(?P<{m.group(1)}>[^/]+)", template)
    return re.compile(f"^{regex}$")


class LocalHost:
    def __init__(
        self,
        app: func.FunctionApp,
        options: QueueOptions,
        connection_string: str,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """Indexes the app's functions; HostConfigError when one cannot be hosted (a
        `%SETTING%` that is not set, a schedule that is not NCRONTAB)."""
        env = os.environ if env is None else env
        self.options = options
        self.connection_string = connection_string
        self.routes: list[HttpRoute] = []
        self.queue_triggers: list[tuple[str, str, Any]] = []
        timers: list[TimerFunction] = []
        for function in app.get_functions():
            trigger = function.get_trigger()
            handler = function.get_user_function()
            name = function.get_function_name() or handler.__name__
            if isinstance(trigger, HttpTrigger):
                methods = frozenset(str(getattr(m, "value", m)).upper() for m in (trigger.methods or []))
                level = str(getattr(trigger.auth_level, "value", trigger.auth_level) or "function").lower()
                self.routes.append(
                    HttpRoute(name, _route_pattern(trigger.route or name), methods, level, handler)
                )
            elif isinstance(trigger, QueueTrigger):
                queue = resolve_settings(trigger.queue_name, env, name)
                self.queue_triggers.append((name, queue, handler))
            elif isinstance(trigger, TimerTrigger):
                schedule = Schedule(resolve_settings(trigger.schedule, env, name), name)
                startup = bool(trigger.run_on_startup)
                timers.append(TimerFunction(name, schedule, trigger.name, startup, handler))
        # As ASP.NET routing does: literal segments win over parameters ("offboard/held/release"
        # before "offboard/{requestId}/release").
        self.routes.sort(key=lambda route: route.pattern.pattern.count("(?P<"))
        # Queue invocations and the CPU their threads used (sleeping costs none), which the
        # benchmark reads when the host stops.
        self.invocations = 0
        self.invocation_cpu_seconds = 0.0
        self._stats_lock = threading.Lock()
        self._stop = threading.Event()
        self.timers = Timers(timers, self._stop)
        self._threads: list[threading.Thread] = []
        self._http: ThreadingHTTPServer | None = None

    # ---- HTTP ---------------------------------------------------------------------------

    def serve_http(self, port: int) -> int:
        self._http = ThreadingHTTPServer(("127.0.0.1", port), _HttpHandler)
        self._http.daemon_threads = True
        self._http.owner = self  # type: ignore[attr-defined]
        thread = threading.Thread(target=self._http.serve_forever, daemon=True)
        thread.start()
        self._threads.append(thread)
        return int(self._http.server_address[1])

    def dispatch(self, method: str, url: str, headers: dict[str, str], body: bytes) -> func.HttpResponse:
        parts = urlsplit(url)
        params = {k: v[0] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        path = parts.path
        if path.startswith("/admin/"):
            return self._admin(method, path, headers, params, body)
        if not path.startswith("/api/"):
            return _error(404, "NotFound", "no such route")
        matching = [(r, m) for r in self.routes if (m := r.pattern.match(path.removeprefix("/api/")))]
        # Several functions may share a route with different methods (GET and POST /offboard).
        allowed = [(r, m) for r, m in matching if not r.methods or method in r.methods]
        if matching and not allowed:
            return _error(405, "MethodNotAllowed", f"{method} is not allowed here")
        for route, match in allowed[:1]:
            if not _authorised(route.auth_level, headers, params):
                return func.HttpResponse(status_code=401)
            request = func.HttpRequest(
                method=method,
                url=url,
                headers=headers,
                params=params,
                route_params=match.groupdict(),
                body=body,
            )
            try:
                return cast(func.HttpResponse, route.handler(request))
            except Exception:
                log.exception("Function %s raised", route.name)
                return func.HttpResponse(status_code=500)
        return _error(404, "NotFound", "no such route")

    def _admin(
        self, method: str, path: str, headers: dict[str, str], params: dict[str, str], body: bytes
    ) -> func.HttpResponse:
        """The admin API's on-demand run of a timer function (master key only)."""
        if not _authorised("admin", headers, params):
            return func.HttpResponse(status_code=401)
        match = _ADMIN_FUNCTION.fullmatch(path)
        if not match:
            return _error(404, "NotFound", "no such admin route")
        if method != "POST":
            return _error(405, "MethodNotAllowed", "invoke a function with POST")
        name = match.group(1)
        function = self.timers.find(name)
        if function is None:
            others = {r.name.lower() for r in self.routes} | {q[0].lower() for q in self.queue_triggers}
            if name.lower() in others:
                return _error(400, "NotATimerFunction", f"{name}: this host invokes only timer functions")
            return _error(404, "NotFound", f"no function named {name}")
        try:
            request = json.loads(body or b"null")
        except ValueError:
            request = None
        if not isinstance(request, dict) or not isinstance(request.get("input", ""), str):
            return _error(400, "InvalidBody", 'the body must be a JSON object such as {"input": ""}')
        succeeded = self.timers.invoke(function)
        return func.HttpResponse(
            status_code=202, headers={"X-Local-Function-Outcome": "Succeeded" if succeeded else "Failed"}
        )

    # ---- timers -------------------------------------------------------------------------

    def run_timers(self) -> None:
        self._threads.extend(self.timers.start())

    # ---- queues -------------------------------------------------------------------------

    def run_queues(self) -> None:
        for name, queue, handler in self.queue_triggers:
            thread = threading.Thread(target=self._listen, args=(name, queue, handler), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _listen(self, name: str, queue_name: str, handler: Any) -> None:
        opts = self.options
        queue = QueueClient.from_connection_string(self.connection_string, queue_name)
        poison = QueueClient.from_connection_string(self.connection_string, f"{queue_name}-poison")
        for client in (queue, poison):
            with contextlib.suppress(ResourceExistsError):
                client.create_queue()
        busy = 0
        busy_lock = threading.Lock()
        pool = ThreadPoolExecutor(max_workers=opts.batch_size + opts.new_batch_threshold)
        delay = 0.1

        def run(message: Any) -> None:
            nonlocal busy
            try:
                self._deliver(name, handler, queue, poison, message)
            except Exception:
                # Storage failed after the function ran: the message reappears by itself.
                log.exception("Completing message %s failed", message.id)
            finally:
                with busy_lock:
                    busy -= 1

        while not self._stop.is_set():
            with busy_lock:
                room = busy <= opts.new_batch_threshold
            messages: list[Any] = []
            if room:
                try:
                    messages = list(
                        queue.receive_messages(
                            max_messages=min(32, opts.batch_size),
                            # The host renews its lease while a function runs; a lock as
                            # long as functionTimeout is the same thing for a local host.
                            visibility_timeout=int(opts.function_timeout),
                        )
                    )
                except Exception:
                    log.exception("Receiving from %s failed; retrying", queue_name)
            with busy_lock:
                busy += len(messages)
            for message in messages:
                pool.submit(run, message)
            if messages:
                delay = 0.1
            elif not room:
                self._stop.wait(0.02)
            else:
                self._stop.wait(delay)
                delay = min(delay * 2, opts.max_polling_interval)
        pool.shutdown(wait=True)

    def _deliver(
        self, name: str, handler: Any, queue: QueueClient, poison: QueueClient, message: Any
    ) -> None:
        opts = self.options
        try:
            body = (
                base64.b64decode(message.content, validate=True) if opts.base64 else message.content.encode()
            )
        except (binascii.Error, ValueError):
            log.error("Message %s on %s is not base64; moving it to poison", message.id, queue.queue_name)
            return self._to_poison(queue, poison, message)
        item = QueueMessage(  # type: ignore[no-untyped-call]
            id=message.id,
            body=body,
            dequeue_count=message.dequeue_count,
            pop_receipt=message.pop_receipt,
            insertion_time=message.inserted_on,
            expiration_time=message.expires_on,
            time_next_visible=message.next_visible_on,
        )
        cpu = time.thread_time()
        try:
            handler(item)
        except Exception:
            log.exception(
                "Function %s raised on message %s (delivery %d)", name, message.id, message.dequeue_count
            )
            if message.dequeue_count >= opts.max_dequeue_count:
                return self._to_poison(queue, poison, message)
            queue.update_message(
                message, pop_receipt=message.pop_receipt, visibility_timeout=int(opts.visibility_timeout)
            )
            return
        finally:
            with self._stats_lock:
                self.invocations += 1
                self.invocation_cpu_seconds += time.thread_time() - cpu
        queue.delete_message(message.id, message.pop_receipt)

    @staticmethod
    def _to_poison(queue: QueueClient, poison: QueueClient, message: Any) -> None:
        poison.send_message(message.content, time_to_live=-1)
        queue.delete_message(message.id, message.pop_receipt)

    def stop(self) -> None:
        self._stop.set()
        if self._http:
            self._http.shutdown()
            self._http.server_close()
        for thread in self._threads:
            thread.join(timeout=10)


def _authorised(level: str, headers: dict[str, str], params: dict[str, str]) -> bool:
    if level == "anonymous":
        return True
    key = headers.get("x-functions-key") or params.get("code")
    allowed = {LOCAL_MASTER_KEY} if level == "admin" else {LOCAL_FUNCTION_KEY, LOCAL_MASTER_KEY}
    return key in allowed


def _error(status: int, code: str, message: str) -> func.HttpResponse:
    return func.HttpResponse(
        json.dumps({"error": {"code": code, "message": message}}),
        status_code=status,
        mimetype="application/json",
    )


class _HttpHandler(QuietHandler):
    def _handle(self) -> None:
        host = cast(LocalHost, self.server.owner)  # type: ignore[attr-defined]
        headers = {k.lower(): v for k, v in self.headers.items()}
        url = f"http://{self.headers.get('Host', '127.0.0.1')}{self.path}"
        response = host.dispatch(self.command, url, headers, self.read_body())
        out_headers = dict(response.headers.items())
        if response.mimetype and "content-type" not in {k.lower() for k in out_headers}:
            charset = f"; charset={response.charset}" if response.charset else ""
            out_headers["Content-Type"] = f"{response.mimetype}{charset}"
        self.send(response.status_code, response.get_body() or b"", out_headers)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _handle  # noqa: N815


def launch(
    env: Mapping[str, str], *args: str, log_prefix: str = "localhost-"
) -> tuple[subprocess.Popen[bytes], int | None, Path]:
    """Starts `python -m localdev.host` (HTTP on a free port) with `env` and waits for its
    ready line: the process, its HTTP port (None with `--no-http`) and the file it logs to."""
    with tempfile.NamedTemporaryFile(prefix=log_prefix, suffix=".log", delete=False) as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "localdev.host", "--port", "0", *args],
            cwd=ROOT,
            env=dict(env),
            stdout=subprocess.PIPE,
            stderr=sink,
        )
    log = Path(sink.name)
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        process.wait(5)
        raise RuntimeError(f"a local host did not start:\n{log.read_text(errors='replace')[-3000:]}")
    return process, json.loads(line)["port"], log


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, default=7071, help="HTTP port on 127.0.0.1 (0 picks a free one)")
    parser.add_argument("--no-http", action="store_true", help="serve no HTTP (an extra queue worker)")
    parser.add_argument("--no-queues", action="store_true", help="run no queue triggers")
    parser.add_argument(
        "--no-timers",
        action="store_true",
        help="run no schedules (timer functions still run on demand: POST /admin/functions/{name})",
    )
    parser.add_argument(
        "--app",
        default="function_app:app",
        help="MODULE:ATTRIBUTE of the FunctionApp to host (default function_app:app)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("azure").setLevel(logging.WARNING)
    sys.path.insert(0, str(ROOT))
    module_name, _, attribute = args.app.partition(":")
    # Imported here, as the host would, after the settings are in place.
    app = getattr(importlib.import_module(module_name), attribute or "app")

    try:
        host = LocalHost(app, QueueOptions.from_host_json(), os.environ.get("AzureWebJobsStorage", ""))
    except HostConfigError as exc:
        log.error("%s", exc)
        sys.exit(1)
    port = None if args.no_http else host.serve_http(args.port)
    if port is not None and not os.environ.get("OFFBOARD_PUBLIC_BASE_URL"):
        # What the platform's WEBSITE_HOSTNAME is on Azure: where callers reach this host. The
        # app builds its status URLs from it (read on first use, so set before any request).
        os.environ["OFFBOARD_PUBLIC_BASE_URL"] = f"http://127.0.0.1:{port}"
    if not args.no_queues:
        host.run_queues()
    if not args.no_timers:
        host.run_timers()

    def stats() -> dict[str, Any]:
        from shared.adapters.transport import storage_requests

        return {
            "invocations": host.invocations,
            "invocation_cpu_seconds": host.invocation_cpu_seconds,
            "timer_invocations": host.timers.invocations,
            # The app's own storage requests (its shared transport); the host's queue
            # polling, receives and deletes are its own and not counted, as on Azure.
            "storage_requests": storage_requests(),
        }

    # SIGUSR1: print the counters so far (the benchmark reads them between phases).
    signal.signal(signal.SIGUSR1, lambda *_: print(json.dumps({"snapshot": True, **stats()}), flush=True))
    # One JSON line on stdout tells a parent process (tests, demo, benchmark) we are ready.
    print(json.dumps({"ready": True, "port": port}), flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        host.stop()
        print(json.dumps({"stopped": True, **stats()}), flush=True)


if __name__ == "__main__":
    main()
