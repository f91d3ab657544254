"""Azure Functions entry points: thin handlers over the `shared` package.

Nothing here does I/O at import; settings and clients are created on first use.
"""

from __future__ import annotations

import logging

import azure.functions as func

from shared import intake, runtime
from shared.http import error_response, json_response, status_urls
from shared.settings import SettingsError, get_settings

app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)
log = logging.getLogger(__name__)


@app.route(route="offboard", methods=["POST"])
def offboard(req: func.HttpRequest) -> func.HttpResponse:
    try:
        settings = get_settings()
    except SettingsError as exc:
        log.error("Offboard request refused: %s", exc)
        return error_response(500, "ServiceMisconfigured", "the service is misconfigured; see its logs")
    try:
        request = intake.parse_offboard_request(req.get_body(), settings.default_comment)
    except intake.BadRequest as exc:
        log.warning("Offboard request rejected (%s): %s", exc.code, exc.message)
        return error_response(exc.status, exc.code, exc.message)
    message = intake.enqueue(request, intake.caller_of(req.headers), runtime.work_queue())
    log.info("Offboard request %s queued for machine %s", message.request_id, message.machine_id)
    status_url, location = status_urls(req.url, req.params.get("code"), message.request_id)
    body = {
        "requestId": message.request_id,
        "machineId": message.machine_id,
        "status": "Queued",
        "statusUrl": status_url,
    }
    return json_response(202, body, headers={"Location": location, "Retry-After": "10"})


@app.queue_trigger(arg_name="msg", queue_name="%OFFBOARD_QUEUE_NAME%", connection="AzureWebJobsStorage")
def offboard_worker(msg: func.QueueMessage) -> None:
    runtime.worker().handle(msg.get_body())
