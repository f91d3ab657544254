"""Azure Functions entry points: thin handlers over the `shared` package.

Nothing here does I/O at import; settings and clients are created on first use.
"""

from __future__ import annotations

import json
import logging

import azure.functions as func

from shared import runtime
from shared.adapters import audit
from shared.http import callers, openapi
from shared.http import validate as intake
from shared.http.callers import reply
from shared.http.responses import answers_errors, error_response, json_response, status_urls
from shared.intake.submission import Answer

app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)
log = logging.getLogger(__name__)


@app.route(route="offboard", methods=["POST", "OPTIONS"])
@answers_errors
def offboard(req: func.HttpRequest) -> func.HttpResponse:
    """Every caller format (see shared/callers); OPTIONS is the CloudEvents handshake."""
    caller = intake.caller_of(req.headers)
    services = runtime.services()
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
        services.audit.try_record(
            audit.REJECTED, request_id=None, caller=caller, outcome=exc.code, detail=exc.message
        )
        raise
    return reply.items_response(recognised, answers, req.url, req.params.get("code"))


@app.route(route="offboard/{requestId}", methods=["GET"])
@answers_errors
def offboard_status(req: func.HttpRequest) -> func.HttpResponse:
    request_id = intake.parse_request_id(req.route_params.get("requestId"))
    record = runtime.services().store.get(request_id)
    if record is None:
        return error_response(404, "RequestNotFound", f"no request {request_id}")
    return _answer(req, Answer(200 if record.final else 202, record.public()))


@app.route(route="offboard/{requestId}/cancel", methods=["POST"])
@answers_errors
def offboard_cancel(req: func.HttpRequest) -> func.HttpResponse:
    request_id = intake.parse_request_id(req.route_params.get("requestId"))
    services = runtime.services()
    comment = _cancel_comment(req.get_body(), services.settings.default_comment)
    return _answer(req, services.cancellations().cancel(request_id, comment, intake.caller_of(req.headers)))


@app.route(route="offboard/held/release", methods=["POST"], auth_level=func.AuthLevel.ADMIN)
@answers_errors
def offboard_release_held(req: func.HttpRequest) -> func.HttpResponse:
    """Operators only (the master key): release every request the breaker is holding."""
    released = runtime.services().holds().release_all(intake.caller_of(req.headers))
    return json_response(200, {"released": released, "count": len(released)})


@app.route(route="offboard/{requestId}/release", methods=["POST"], auth_level=func.AuthLevel.ADMIN)
@answers_errors
def offboard_release(req: func.HttpRequest) -> func.HttpResponse:
    """Operators only (the master key): release one held request."""
    request_id = intake.parse_request_id(req.route_params.get("requestId"))
    return json_response(200, runtime.services().holds().release(request_id, intake.caller_of(req.headers)))


@app.route(route="openapi.json", methods=["GET"])
def openapi_document(req: func.HttpRequest) -> func.HttpResponse:
    """The custom connector's OpenAPI 2.0 document. FUNCTION level like everything else: it holds
    no secret, but anonymous access would tell anyone who finds the host what it can do."""
    return json_response(200, openapi.document_for(req.url))


# host.json's extensions.queues.maxDequeueCount (a test keeps the two equal).
MAX_DEQUEUE_COUNT = 5


@app.queue_trigger(arg_name="msg", queue_name="%OFFBOARD_QUEUE_NAME%", connection="AzureWebJobsStorage")
def offboard_worker(msg: func.QueueMessage) -> None:
    try:
        runtime.worker().handle(msg.get_body(), msg.id or "")
    except Exception as exc:
        # On its last delivery the host moves the message to poison unchanged; say so on the
        # request first, or its status would read "Queued" forever.
        if (getattr(msg, "dequeue_count", None) or 0) >= MAX_DEQUEUE_COUNT:
            runtime.worker().give_up(msg.get_body(), f"{type(exc).__name__}: {str(exc)[:300]}")
        raise


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
