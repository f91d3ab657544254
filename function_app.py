"""Azure Functions entry points: thin handlers over the `shared` package.

Nothing here does I/O at import, and the Azure SDKs are imported on first use (a cold
start that serves an HTTP request pays for what that request needs, once).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import azure.functions as func

from shared.http.responses import PublicUrls, answers_errors, error_response, json_response

if TYPE_CHECKING:
    from shared.domain.offboard import Caller
    from shared.runtime import Services

app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)
log = logging.getLogger(__name__)
# OFFBOARD_CANCEL=admin makes cancelling need the master key. An auth level is part of the
# function's metadata, which the host reads when it indexes the app: it is read here, and a
# change takes effect on the restart every app-setting change causes.
_CANCEL_LEVEL = (
    func.AuthLevel.ADMIN
    if os.environ.get("OFFBOARD_CANCEL", "").strip().lower() == "admin"
    else func.AuthLevel.FUNCTION
)
# host.json's extensions.queues.maxDequeueCount (a test keeps the two equal).
MAX_DEQUEUE_COUNT = 5


def _services() -> Services:
    from shared import runtime

    return runtime.services()


def _caller(req: func.HttpRequest) -> Caller:
    from shared.http.access import caller_of

    return caller_of(req.headers, _services().settings.operator_role)


def _urls() -> PublicUrls:
    return PublicUrls(_services().settings.public_base_url)


@app.route(route="offboard", methods=["POST", "OPTIONS"])
@answers_errors
def offboard(req: func.HttpRequest) -> func.HttpResponse:
    """Every caller format (see shared/http/callers); OPTIONS is the CloudEvents handshake."""
    from shared.domain.errors import InvalidInput
    from shared.http import callers, validate
    from shared.http.callers import reply

    services, caller, urls = _services(), _caller(req), _urls()
    inbound = callers.Inbound.of(req.method, req.get_body(), req.headers, req.params)
    try:
        recognised = callers.recognise(inbound, services.settings.default_comment)
        if isinstance(recognised, callers.Handshake):
            return reply.handshake_response(recognised)
        items = reply.items_to_submit(recognised, validate.idempotency_key(req.headers))
    except InvalidInput as exc:
        services.rejections.record(caller.label, exc.code, exc.message)
        raise
    submissions = services.submissions(lambda request_id: urls.status(req.url, request_id))
    batch_id, answers = submissions.accept(
        items, caller, batch=not recognised.single, payload_format=recognised.format
    )
    for code, message in reply.refused_input(recognised, answers):
        services.rejections.record(caller.label, code, message)
    return reply.items_response(recognised, batch_id, answers, urls, req.url, req.params.get("code"))


@app.route(route="offboard", methods=["GET"])
@answers_errors
def offboard_list(req: func.HttpRequest) -> func.HttpResponse:
    """The matching requests, newest first, a page at a time."""
    from shared.intake.listing import Filters

    filters = Filters.parse(req.params)
    records, following = _services().listing().page(filters, _caller(req), req.params.get("next"))
    following_url = None
    if following:
        query = {k: v for k, v in req.params.items() if k not in ("next", "code")}
        following_url = _urls().url(req.url, "/api/offboard") + "?" + _query({**query, "next": following})
    return json_response(200, {"requests": [r.public() for r in records], "next": following_url})


@app.route(route="offboard/batches/{batchId}", methods=["GET"])
@answers_errors
def offboard_batch(req: func.HttpRequest) -> func.HttpResponse:
    """A batch: 202 (with Location and Retry-After) until every item is final, then 200."""
    from shared.http.callers.reply import POLL_SECONDS
    from shared.http.validate import parse_batch_id

    batch_id = parse_batch_id(req.route_params.get("batchId"))
    view = _services().listing().batch(batch_id, _caller(req))
    if view["final"]:
        return json_response(200, view)
    headers = {
        "Location": _urls().batch(req.url, batch_id, req.params.get("code")),
        "Retry-After": str(POLL_SECONDS["Queued"]),
    }
    return json_response(202, view, headers)


@app.route(route="offboard/audit", methods=["GET"])
@answers_errors
def offboard_audit_since(req: func.HttpRequest) -> func.HttpResponse:
    """Every audit event since a time (`since`, ISO 8601), oldest first."""
    from shared.domain.errors import InvalidInput
    from shared.intake.listing import since_of

    since = since_of(req.params.get("since"))
    if since is None:
        raise InvalidInput("MissingSince", "since is required, e.g. ?since=2026-12-01T09:00:00Z")
    return json_response(200, {"events": _services().listing().events_since(since, _caller(req))})


@app.route(route="offboard/{requestId}", methods=["GET"])
@answers_errors
def offboard_status(req: func.HttpRequest) -> func.HttpResponse:
    from shared.http.callers import reply
    from shared.http.validate import parse_request_id
    from shared.intake.submission import Answer

    record = _services().listing().request(parse_request_id(req.route_params.get("requestId")), _caller(req))
    answer = Answer(200 if record.final else 202, record.public())
    return reply.answer_response(answer, _urls(), req.url, req.params.get("code"))


@app.route(route="offboard/{requestId}/audit", methods=["GET"])
@answers_errors
def offboard_audit(req: func.HttpRequest) -> func.HttpResponse:
    from shared.http.validate import parse_request_id

    request_id = parse_request_id(req.route_params.get("requestId"))
    events = _services().listing().events(request_id, _caller(req))
    return json_response(200, {"requestId": request_id, "events": events})


@app.route(route="offboard/{requestId}/cancel", methods=["POST"], auth_level=_CANCEL_LEVEL)
@answers_errors
def offboard_cancel(req: func.HttpRequest) -> func.HttpResponse:
    from shared.http.callers import reply
    from shared.http.validate import comment_of, parse_request_id, read_object

    request_id = parse_request_id(req.route_params.get("requestId"))
    services = _services()
    comment = comment_of(read_object(req.get_body()).get("comment"), services.settings.default_comment)
    answer = services.cancellations().cancel(request_id, comment, _caller(req))
    return reply.answer_response(answer, _urls(), req.url, req.params.get("code"))


@app.route(route="offboard/held/release", methods=["POST"], auth_level=func.AuthLevel.ADMIN)
@answers_errors
def offboard_release_held(req: func.HttpRequest) -> func.HttpResponse:
    """Operators only (the master key): release every held request."""
    released = _services().holds().release_all(_caller(req))
    return json_response(200, {"released": released, "count": len(released)})


@app.route(route="offboard/{requestId}/release", methods=["POST"], auth_level=func.AuthLevel.ADMIN)
@answers_errors
def offboard_release(req: func.HttpRequest) -> func.HttpResponse:
    """Operators only (the master key): release one held request."""
    from shared.http.validate import parse_request_id

    request_id = parse_request_id(req.route_params.get("requestId"))
    return json_response(200, _services().holds().release(request_id, _caller(req)))


@app.route(route="openapi.json", methods=["GET"])
@answers_errors
def openapi_document(req: func.HttpRequest) -> func.HttpResponse:
    """The custom connector's OpenAPI 2.0 document. FUNCTION level like everything else: it holds
    no secret, but anonymous access would tell anyone who finds the host what it can do."""
    from shared.http import openapi

    return json_response(200, openapi.document_for(_urls().url(req.url, "")))


@app.queue_trigger(arg_name="msg", queue_name="%OFFBOARD_QUEUE_NAME%", connection="AzureWebJobsStorage")
def offboard_worker(msg: func.QueueMessage) -> None:
    from shared import runtime

    dequeue_count = getattr(msg, "dequeue_count", None) or 1
    try:
        runtime.worker().handle(msg.get_body(), msg.id or "", dequeue_count)
    except Exception as exc:
        # On its last delivery the host moves the message to poison unchanged; say so on the
        # request first, or its status would read "Queued" forever.
        if dequeue_count >= MAX_DEQUEUE_COUNT:
            try:
                runtime.worker().give_up(msg.get_body(), f"{type(exc).__name__}: {str(exc)[:300]}")
            except Exception:  # e.g. the settings are broken: the host still poisons the message
                log.exception("Could not record the failure on the request before its message is poisoned")
        raise


@app.timer_trigger(arg_name="timer", schedule="0 */2 * * * *", use_monitor=False)
def reconcile(timer: func.TimerRequest) -> None:
    """Every two minutes: send a message for any request accepted and never picked up (its
    acceptor died between the row and the message; shared/intake/reconcile.py)."""
    from shared.intake.reconcile import reconcile as run

    services = _services()
    run(services.store, services.queue, services.guards.lease, services.holds())


@app.timer_trigger(arg_name="timer", schedule="%INTUNE_WATCH_SCHEDULE%", use_monitor=False)
def intune_retirements(timer: func.TimerRequest) -> None:
    """On INTUNE_WATCH_SCHEDULE, when INTUNE_WATCH_ENABLED: Intune devices being retired,
    wiped or deleted, read from Microsoft Graph, become offboard requests (INTUNE_WATCH_MODE
    offboard) or dry runs (report) through the same intake as every caller (shared/watcher/)."""
    from shared import runtime
    from shared.settings import get_settings

    if not get_settings().intune_watch_enabled:
        return
    runtime.watcher().run()


def _query(params: dict[str, str]) -> str:
    from urllib.parse import urlencode

    return urlencode(params)


__all__ = ["app", "error_response"]
