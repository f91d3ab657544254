"""Azure Functions entry points: thin handlers over the `shared` package.

Nothing here does I/O at import; settings and clients are created on first use.
"""

from __future__ import annotations

import json
import logging

import azure.functions as func

from shared import audit, callers, intake, openapi, runtime
from shared.callers import reply
from shared.http import error_response, json_response, status_urls
from shared.settings import SettingsError
from shared.submission import Answer

app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)
log = logging.getLogger(__name__)


@app.route(route="offboard", methods=["POST", "OPTIONS"])
def offboard(req: func.HttpRequest) -> func.HttpResponse:
    """Every caller format (see shared/callers); OPTIONS is the CloudEvents handshake."""
    caller = intake.caller_of(req.headers)
    try:
        services = runtime.services()
    except SettingsError as exc:
        return _misconfigured(exc)
    inbound = callers.Inbound.of(req.method, req.get_body(), req.headers, req.params)
    try:
        recognised = callers.recognise(inbound, services.settings.default_comment)
        if isinstance(recognised, callers.Handshake):
            return reply.handshake_response(recognised)
        submissions = services.submissions()
        answers = reply.submit_items(
            recognised,
            lambda request, key: submissions.submit(
                request, caller, lambda request_id: status_urls(req.url, None, request_id)[0], key
            ),
            intake.idempotency_key(req.headers),
        )
    except intake.BadRequest as exc:
        log.warning("Offboard request rejected (%s): %s", exc.code, exc.message)
        services.audit.try_record(
            audit.REJECTED, request_id=None, caller=caller, outcome=exc.code, detail=exc.message
        )
        return error_response(exc.status, exc.code, exc.message)
    return reply.items_response(recognised, answers, req.url, req.params.get("code"))


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
    return _answer(req, Answer(200 if record.final else 202, record.public()))


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


@app.route(route="openapi.json", methods=["GET"])
def openapi_document(req: func.HttpRequest) -> func.HttpResponse:
    """The custom connector's OpenAPI 2.0 document. FUNCTION level like everything else: it holds
    no secret, but anonymous access would tell anyone who finds the host what it can do."""
    return json_response(200, openapi.document_for(req.url))


@app.queue_trigger(arg_name="msg", queue_name="%OFFBOARD_QUEUE_NAME%", connection="AzureWebJobsStorage")
def offboard_worker(msg: func.QueueMessage) -> None:
    runtime.worker().handle(msg.get_body(), msg.id or "")


def _answer(req: func.HttpRequest, answer: Answer) -> func.HttpResponse:
    return reply.answer_response(answer, req.url, req.params.get("code"))


def _cancel_comment(body: bytes, default: str) -> str:
    if not body.strip():
        return default
    try:
        payload = json.loads(body)
    except ValueError:
        raise intake.BadRequest("InvalidJson", "the body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise intake.BadRequest("InvalidBody", "the body must be a JSON object")
    return intake.comment_of(payload.get("comment"), default)


def _misconfigured(exc: SettingsError) -> func.HttpResponse:
    log.error("Request refused, the app is misconfigured: %s", exc)
    return error_response(500, "ServiceMisconfigured", "the service is misconfigured; see its logs")
