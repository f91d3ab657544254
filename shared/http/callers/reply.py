"""Submit what was accepted and answer the caller, per item.

The original single request keeps its original answer (202, Location, Retry-After). Any
other payload answers 202 with `{"format", "batchId", "statusUrl", "results": [...]}`, one
entry per item with its own requestId and statusUrl, or its error, or why it was ignored;
`Location` points at the batch's status route, which Logic Apps can follow as they follow a
single request. 400 when nothing in it was valid; 200 when everything was valid but nothing
needed doing (ignored events), so senders such as Event Grid do not retry.
"""

from __future__ import annotations

import logging
from typing import Any

import azure.functions as func

from ...domain.errors import InvalidInput, Refusal
from ...intake.submission import Answer, Item
from ..errors import status_of
from ..responses import PublicUrls, json_response
from .results import Accepted, Handshake, Ignored, Items, Rejected

log = logging.getLogger(__name__)

# How soon a poller should ask again: soon while queued, rarely once Defender has the action
# (an offline device can take days) or while an operator must decide (held).
POLL_SECONDS = {"Queued": 10, "Throttled": 30, "Held": 300}
POLL_SECONDS_IN_DEFENDER = 60


def handshake_response(handshake: Handshake) -> func.HttpResponse:
    log.info("Answered a %s handshake", handshake.kind)
    return func.HttpResponse(
        handshake.body, status_code=handshake.status, headers=handshake.headers, mimetype=handshake.mimetype
    )


def items_to_submit(recognised: Items, idempotency_key: str | None) -> list[Item]:
    """The accepted items, each with its idempotency key. A single request's key is the
    header's or the body's (not two different ones); a batch's header key is made per item
    (`key#item`), so a replayed batch gets each item's first answer."""
    accepted = [item for item in recognised.items if isinstance(item, Accepted)]
    if recognised.single:
        [item] = accepted  # the single form raises InvalidInput instead of rejecting its item
        body_key = item.request.client_request_id
        if body_key and idempotency_key and body_key != idempotency_key:
            raise InvalidInput(
                "InvalidIdempotencyKey", "Idempotency-Key and clientRequestId differ; send one"
            )
        return [Item(item.item, item.request, body_key or idempotency_key)]
    return [
        Item(
            item.item,
            item.request,
            item.request.client_request_id or (f"{idempotency_key}#{item.item}" if idempotency_key else None),
        )
        for item in accepted
    ]


def refused_input(recognised: Items, answers: list[Answer | Refusal]) -> list[tuple[str, str]]:
    """(code, message) of each item refused for what it said (a bad field, a tenant not
    allowed), which never became a request: the audit trail records them as `Rejected`."""
    refused = [(item.code, item.message) for item in recognised.items if isinstance(item, Rejected)]
    return refused + [(a.code, a.message) for a in answers if isinstance(a, InvalidInput)]


def answer_response(
    answer: Answer | Refusal, urls: PublicUrls, request_url: str, query_code: str | None
) -> func.HttpResponse:
    """A 202 tells a poller where and when to ask next (Logic Apps follows it by itself)."""
    if isinstance(answer, Refusal):
        return json_response(status_of(answer), _error(answer))
    headers = {}
    if answer.status == 202:
        status = answer.body.get("status", "Queued")
        headers = {
            "Location": urls.status(request_url, answer.body["requestId"], query_code),
            "Retry-After": str(POLL_SECONDS.get(status, POLL_SECONDS_IN_DEFENDER)),
        }
    return json_response(answer.status, answer.body, headers)


def items_response(
    recognised: Items,
    batch_id: str | None,
    answers: list[Answer | Refusal],
    urls: PublicUrls,
    request_url: str,
    query_code: str | None,
) -> func.HttpResponse:
    if recognised.single:
        [answer] = answers
        return answer_response(answer, urls, request_url, query_code)
    results: list[dict[str, Any]] = []
    accepted = rejected = ignored = 0
    submitted = iter(answers)
    for item in recognised.items:
        if isinstance(item, Accepted):
            answer = next(submitted)
            if isinstance(answer, Answer) and answer.status == 202:
                accepted += 1
                results.append({"item": item.item, **answer.body})
            else:
                rejected += 1
                refused = _error(answer) if isinstance(answer, Refusal) else answer.body
                results.append({"item": item.item, "status": "Rejected", **refused})
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
        headers = {"Retry-After": str(POLL_SECONDS["Queued"])}
        if batch_id is not None:
            body = {
                "format": recognised.format,
                "batchId": batch_id,
                "statusUrl": urls.batch(request_url, batch_id),
                "results": results,
            }
            headers["Location"] = urls.batch(request_url, batch_id, query_code)
        return json_response(202, body, headers)
    if rejected:
        error = {"code": "NoValidItems", "message": f"none of the {rejected + ignored} items could be queued"}
        return json_response(400, {"error": error, **body})
    return json_response(200, body)


def _error(refusal: Refusal) -> dict[str, Any]:
    return {"error": {"code": refusal.code, "message": refusal.message}}
