"""Azure Functions entry points: thin handlers over the `shared` package.

Nothing here does I/O at import; settings and clients are created on first use.
"""

from __future__ import annotations

import logging

import azure.functions as func

from shared import callers, intake, openapi, runtime
from shared.callers import reply
from shared.http import error_response, json_response
from shared.settings import SettingsError, get_settings

app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)
log = logging.getLogger(__name__)


@app.route(route="offboard", methods=["POST", "OPTIONS"])
def offboard(req: func.HttpRequest) -> func.HttpResponse:
    """Every caller format (see shared/callers); OPTIONS is the CloudEvents handshake."""
    try:
        settings = get_settings()
    except SettingsError as exc:
        log.error("Offboard request refused: %s", exc)
        return error_response(500, "ServiceMisconfigured", "the service is misconfigured; see its logs")
    inbound = callers.Inbound.of(req.method, req.get_body(), req.headers, req.params)
    try:
        recognised = callers.recognise(inbound, settings.default_comment)
    except intake.BadRequest as exc:
        log.warning("Offboard request rejected (%s): %s", exc.code, exc.message)
        return error_response(exc.status, exc.code, exc.message)
    if isinstance(recognised, callers.Handshake):
        return reply.handshake_response(recognised)
    caller = intake.caller_of(req.headers)
    return reply.items_response(recognised, req.url, req.params.get("code"), caller, runtime.work_queue())


@app.route(route="openapi.json", methods=["GET"])
def openapi_document(req: func.HttpRequest) -> func.HttpResponse:
    """The custom connector's OpenAPI 2.0 document. FUNCTION level like everything else: it holds
    no secret, but anonymous access would tell anyone who finds the host what it can do."""
    return json_response(200, openapi.document_for(req.url))


@app.queue_trigger(arg_name="msg", queue_name="%OFFBOARD_QUEUE_NAME%", connection="AzureWebJobsStorage")
def offboard_worker(msg: func.QueueMessage) -> None:
    runtime.worker().handle(msg.get_body())
