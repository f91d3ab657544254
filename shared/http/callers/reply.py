"""Submit what was accepted and answer the caller, per item.

The original single request keeps its original answer (202, Location, Retry-After). Any
other payload answers 202 with `{"format", "results": [...]}`, one entry per item with its
own requestId and statusUrl or its error or why it was ignored; 400 when nothing in it was
valid; 200 when everything was valid but nothing needed doing (ignored events), so senders
such as Event Grid do not retry.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import azure.functions as func

from ...intake.submission import Answer
from ..responses import json_response, status_urls
from ..validate import BadRequest, OffboardRequest
from .results import Accepted, Handshake, Ignored, Items, Rejected

log = logging.getLogger(__name__)

# How soon a poller should ask again: soon while queued, rarely once Defender has the action
# (an offline device can take days) or while an operator must decide (held).
POLL_SECONDS = {"Queued": 10, "Throttled": 30, "Held": 300}
POLL_SECONDS_IN_DEFENDER = 60

Submit = Callable[[OffboardRequest, str | None], Answer]


def handshake_response(handshake: Handshake) -> func.HttpResponse:
    log.info("Answered a %s handshake", handshake.kind)
    return func.HttpResponse(
        handshake.body, status_code=handshake.status, headers=handshake.headers, mimetype=handshake.mimetype
    )


def submit_items(recognised: Items, submit: Submit, idempotency_key: str | None) -> list[Answer | None]:
    """One answer per accepted item (None for the others). A single request's error is the
    whole call's; in a batch it is that item's. An Idempotency-Key on a batch is made per
    item (`key#item`), so a replayed batch gets each item's first answer."""
    if recognised.single:
        [item] = recognised.items
        assert isinstance(item, Accepted)  # the single form raises BadRequest instead
        body_key = item.request.client_request_id
        if body_key and idempotency_key and body_key != idempotency_key:
            raise BadRequest("InvalidIdempotencyKey", "Idempotency-Key and clientRequestId differ; send one")
        return [submit(item.request, body_key or idempotency_key)]
    answers: list[Answer | None] = []
    for item in recognised.items:
        if not isinstance(item, Accepted):
            answers.append(None)
            continue
        key = item.request.client_request_id or (
            f"{idempotency_key}#{item.item}" if idempotency_key else None
        )
        try:
            answers.append(submit(item.request, key))
        except BadRequest as exc:
            answers.append(Answer(exc.status, {"error": {"code": exc.code, "message": exc.message}}))
    return answers


def answer_response(answer: Answer, request_url: str, query_code: str | None) -> func.HttpResponse:
    """A 202 tells a poller where and when to ask next (Logic Apps follows it by itself)."""
    headers = {}
    if answer.status == 202:
        _, location = status_urls(request_url, query_code, answer.body["requestId"])
        status = answer.body.get("status", "Queued")
        headers = {
            "Location": location,
            "Retry-After": str(POLL_SECONDS.get(status, POLL_SECONDS_IN_DEFENDER)),
        }
    return json_response(answer.status, answer.body, headers)


def items_response(
    recognised: Items, answers: list[Answer | None], request_url: str, query_code: str | None
) -> func.HttpResponse:
    if recognised.single:
        [answer] = answers
        assert answer is not None
        return answer_response(answer, request_url, query_code)
    results: list[dict[str, Any]] = []
    accepted = rejected = ignored = 0
    for item, answer in zip(recognised.items, answers, strict=True):
        if isinstance(item, Accepted) and answer is not None and answer.status == 202:
            accepted += 1
            results.append({"item": item.item, **answer.body})
        elif isinstance(item, Accepted) and answer is not None:
            rejected += 1
            results.append({"item": item.item, "status": "Rejected", **answer.body})
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
        "Offboard %s payload: %d accepted, %d rejected, %d ignored",
        recognised.format,
        accepted,
        rejected,
        ignored,
    )
    body: dict[str, Any] = {"format": recognised.format, "results": results}
    if accepted:
        return json_response(202, body, headers={"Retry-After": str(POLL_SECONDS["Queued"])})
    if rejected:
        error = {"code": "NoValidItems", "message": f"none of the {rejected + ignored} items could be queued"}
        return json_response(400, {"error": error, **body})
    return json_response(200, body)
