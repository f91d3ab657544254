"""Queue what was accepted and answer the caller, per item.

The original single request keeps its original answer (202, Location, Retry-After). Any
other payload answers 202 with `{"format", "results": [...]}`, one entry per item with its
own requestId and statusUrl or its error or why it was ignored; 400 when nothing in it was
valid; 200 when everything was valid but nothing needed doing (ignored events), so senders
such as Event Grid do not retry.
"""

from __future__ import annotations

import logging
from typing import Any

import azure.functions as func

from .. import intake
from ..http import json_response, status_urls
from ..messages import OffboardMessage
from ..queues import WorkQueue
from .results import Accepted, Handshake, Ignored, Items, Rejected

log = logging.getLogger(__name__)
RETRY_AFTER_SECONDS = "10"


def handshake_response(handshake: Handshake) -> func.HttpResponse:
    log.info("Answered a %s handshake", handshake.kind)
    return func.HttpResponse(
        handshake.body, status_code=handshake.status, headers=handshake.headers, mimetype=handshake.mimetype
    )


def items_response(
    recognised: Items, request_url: str, query_code: str | None, caller: str, queue: WorkQueue
) -> func.HttpResponse:
    if recognised.single:
        [item] = recognised.items
        assert isinstance(item, Accepted)  # the single form raises BadRequest instead
        return _single(item, request_url, query_code, caller, queue)
    results: list[dict[str, Any]] = []
    accepted = rejected = ignored = 0
    for item in recognised.items:
        if isinstance(item, Accepted):
            accepted += 1
            message = intake.enqueue(item.request, caller, queue)
            status_url, _ = status_urls(request_url, None, message.request_id)
            results.append(
                {"item": item.item, "status": "Queued", "requestId": message.request_id, **_device(message)}
                | {"statusUrl": status_url}
            )
            log.info(
                "Offboard request %s queued for %s (%s)",
                message.request_id,
                message.device,
                recognised.format,
            )
        elif isinstance(item, Rejected):
            rejected += 1
            results.append(
                {
                    "item": item.item,
                    "status": "Rejected",
                    "error": {"code": item.code, "message": item.message},
                }
            )
            log.warning(
                "Offboard %s item %r rejected (%s): %s", recognised.format, item.item, item.code, item.message
            )
        elif isinstance(item, Ignored):
            ignored += 1
            results.append({"item": item.item, "status": "Ignored", "reason": item.reason})
            # %r keeps caller text (event types, host names) on one log line.
            log.info("Offboard %s item %r ignored: %r", recognised.format, item.item, item.reason)
    log.info(
        "Offboard %s payload: %d queued, %d rejected, %d ignored",
        recognised.format,
        accepted,
        rejected,
        ignored,
    )
    body: dict[str, Any] = {"format": recognised.format, "results": results}
    if accepted:
        return json_response(202, body, headers={"Retry-After": RETRY_AFTER_SECONDS})
    if rejected:
        error = {"code": "NoValidItems", "message": f"none of the {rejected + ignored} items could be queued"}
        return json_response(400, {"error": error, **body})
    return json_response(200, body)


def _single(
    item: Accepted, request_url: str, query_code: str | None, caller: str, queue: WorkQueue
) -> func.HttpResponse:
    message = intake.enqueue(item.request, caller, queue)
    log.info("Offboard request %s queued for %s", message.request_id, message.device)
    status_url, location = status_urls(request_url, query_code, message.request_id)
    body = {"requestId": message.request_id, **_device(message), "status": "Queued", "statusUrl": status_url}
    return json_response(202, body, headers={"Location": location, "Retry-After": RETRY_AFTER_SECONDS})


def _device(message: OffboardMessage) -> dict[str, Any]:
    if message.lookup is not None:
        return {"machineId": None, "lookup": message.lookup.to_dict()}
    return {"machineId": message.machine_id}
