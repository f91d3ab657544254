"""Azure Functions entry points: thin handlers over the `shared` package.

Nothing here does I/O at import; settings and clients are created on first use.
"""

from __future__ import annotations

import json
import logging

import azure.functions as func

from shared import audit, intake, runtime
from shared.http import error_response, json_response, status_urls
from shared.settings import SettingsError
from shared.submission import Answer

app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)
log = logging.getLogger(__name__)

# How soon a poller should ask again: soon while queued, rarely once Defender has the action
# (an offline device can take days).
POLL_SECONDS = {"Queued": 10, "Throttled": 30, "Held": 300}
POLL_SECONDS_IN_DEFENDER = 60


@app.route(route="offboard", methods=["POST"])
def offboard(req: func.HttpRequest) -> func.HttpResponse:
    caller = intake.caller_of(req.headers)
    try:
        services = runtime.services()
    except SettingsError as exc:
        return _misconfigured(exc)
    try:
        request = intake.parse_offboard_request(req.get_body(), services.settings.default_comment)
        key = intake.idempotency_key(req.headers, request)
        answer = services.submissions().submit(
            request, caller, lambda request_id: status_urls(req.url, None, request_id)[0], key
        )
    except intake.BadRequest as exc:
        log.warning("Offboard request rejected (%s): %s", exc.code, exc.message)
        services.audit.try_record(
            audit.REJECTED, request_id=None, caller=caller, outcome=exc.code, detail=exc.message
        )
        return error_response(exc.status, exc.code, exc.message)
    return _answer(req, answer)


@app.route(route="offboard/{requestId}", methods=["GET"])
def offboard_status(req: func.HttpRequest) -> func.HttpResponse:
    try:
        request_id = intake.parse_request_id(req.route_params.get("requestId"))
        record = runtime.services().store.get(request_id)
    except SettingsError as exc:
        return _misconfigured(exc)
    except intake.BadRequest as exc:
        return error_response(exc.status, exc.code, exc.message)
    if record is None:
        return error_response(404, "RequestNotFound", f"no request {request_id}")
    return _answer(req, Answer(200 if record.final else 202, record.public()), record.status)


@app.route(route="offboard/{requestId}/cancel", methods=["POST"])
def offboard_cancel(req: func.HttpRequest) -> func.HttpResponse:
    try:
        request_id = intake.parse_request_id(req.route_params.get("requestId"))
        services = runtime.services()
        comment = _cancel_comment(req.get_body(), services.settings.default_comment)
        answer = services.cancellations().cancel(request_id, comment, intake.caller_of(req.headers))
    except SettingsError as exc:
        return _misconfigured(exc)
    except intake.BadRequest as exc:
        return error_response(exc.status, exc.code, exc.message)
    return _answer(req, answer)


@app.route(route="offboard/held/release", methods=["POST"], auth_level=func.AuthLevel.ADMIN)
def offboard_release_held(req: func.HttpRequest) -> func.HttpResponse:
    """Operators only (the master key): release every request the breaker is holding."""
    try:
        released = runtime.services().holds().release_all(intake.caller_of(req.headers))
    except SettingsError as exc:
        return _misconfigured(exc)
    return json_response(200, {"released": released, "count": len(released)})


@app.route(route="offboard/{requestId}/release", methods=["POST"], auth_level=func.AuthLevel.ADMIN)
def offboard_release(req: func.HttpRequest) -> func.HttpResponse:
    """Operators only (the master key): release one held request."""
    try:
        request_id = intake.parse_request_id(req.route_params.get("requestId"))
        state = runtime.services().holds().release(request_id, intake.caller_of(req.headers))
    except SettingsError as exc:
        return _misconfigured(exc)
    except intake.BadRequest as exc:
        return error_response(exc.status, exc.code, exc.message)
    return json_response(200, state)


@app.queue_trigger(arg_name="msg", queue_name="%OFFBOARD_QUEUE_NAME%", connection="AzureWebJobsStorage")
def offboard_worker(msg: func.QueueMessage) -> None:
    runtime.worker().handle(msg.get_body(), msg.id or "")


def _answer(req: func.HttpRequest, answer: Answer, status: str | None = None) -> func.HttpResponse:
    """A 202 tells a poller where and when to ask next (Logic Apps follows it by itself)."""
    headers = {}
    if answer.status == 202:
        _, location = status_urls(req.url, req.params.get("code"), answer.body["requestId"])
        state = status or answer.body.get("status", "Queued")
        headers = {
            "Location": location,
            "Retry-After": str(POLL_SECONDS.get(state, POLL_SECONDS_IN_DEFENDER)),
        }
    return json_response(answer.status, answer.body, headers)


def _cancel_comment(body: bytes, default: str) -> str:
    if not body.strip():
        return default
    try:
        payload = json.loads(body)
    except ValueError:
        raise intake.BadRequest("InvalidJson", "the body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise intake.BadRequest("InvalidBody", "the body must be a JSON object")
    return intake.parse_comment(payload.get("comment"), default)


def _misconfigured(exc: SettingsError) -> func.HttpResponse:
    log.error("Request refused, the app is misconfigured: %s", exc)
    return error_response(500, "ServiceMisconfigured", "the service is misconfigured; see its logs")
