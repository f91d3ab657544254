"""JSON responses in the shapes the external contract promises."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import azure.functions as func
from azure.core.exceptions import AzureError

from ..adapters.request_store import StaleRecord
from ..settings import SettingsError
from .validate import BadRequest

log = logging.getLogger(__name__)


Handler = Callable[[func.HttpRequest], func.HttpResponse]


def answers_errors(handler: Handler) -> Handler:
    """Every failure a handler can meet becomes the contract's error body, never a bare 500:
    bad input (its status), broken settings (500, details only in the log), storage that is
    unavailable or changed underneath (503: try again)."""

    @functools.wraps(handler)
    def guarded(req: func.HttpRequest) -> func.HttpResponse:
        try:
            return handler(req)
        except BadRequest as exc:
            log.warning("%s refused (%s): %s", handler.__name__, exc.code, exc.message)
            return error_response(exc.status, exc.code, exc.message)
        except SettingsError as exc:
            log.error("%s refused, the app is misconfigured: %s", handler.__name__, exc)
            return error_response(500, "ServiceMisconfigured", "the service is misconfigured; see its logs")
        except (AzureError, StaleRecord):
            log.exception("%s failed on storage", handler.__name__)
            return error_response(503, "StorageUnavailable", "storage is unavailable right now; try again")

    return guarded


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
