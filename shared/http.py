"""JSON responses in the shapes the external contract promises."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import azure.functions as func


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> func.HttpResponse:
    return func.HttpResponse(
        json.dumps(body, separators=(",", ":")),
        status_code=status,
        headers=headers,
        mimetype="application/json",
    )


def error_response(status: int, code: str, message: str) -> func.HttpResponse:
    return json_response(status, {"error": {"code": code, "message": message}})


def status_urls(request_url: str, query_code: str | None, request_id: str) -> tuple[str, str]:
    """The status URL for the body, and the same URL for `Location`.

    `Location` must be absolute for Logic Apps to poll it. A caller that authenticated with
    `?code=` polls without any other way to send the key, so `Location` carries the key it
    already holds; the body never does, because bodies end up in run histories and logs.
    """
    parts = urlsplit(request_url)
    url = urlunsplit((parts.scheme, parts.netloc, f"/api/offboard/{request_id}", "", ""))
    location = f"{url}?{urlencode({'code': query_code})}" if query_code else url
    return url, location
