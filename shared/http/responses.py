"""JSON responses in the shapes the external contract promises, and the URLs they point at."""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import azure.functions as func

from ..domain.errors import Refusal
from .errors import status_of

log = logging.getLogger(__name__)

Handler = Callable[[func.HttpRequest], func.HttpResponse]


def answers_errors(handler: Handler) -> Handler:
    """Every failure a handler can meet becomes the contract's error body, never a bare 500,
    by construction: refusals their status; broken settings 500 (details only in the log);
    storage that is unavailable or changed underneath 503 (try again); and anything else a
    500 with the error body, logged with its traceback."""

    @functools.wraps(handler)
    def guarded(req: func.HttpRequest) -> func.HttpResponse:
        from azure.core.exceptions import AzureError

        from ..adapters.request_store import StaleRecord
        from ..adapters.retrying import Contended
        from ..settings import SettingsError

        try:
            return handler(req)
        except Refusal as exc:
            log.warning("%s refused (%s): %s", handler.__name__, exc.code, exc.message)
            return error_response(status_of(exc), exc.code, exc.message)
        except SettingsError as exc:
            log.error("%s refused, the app is misconfigured: %s", handler.__name__, exc)
            return error_response(500, "ServiceMisconfigured", "the service is misconfigured; see its logs")
        except (AzureError, StaleRecord, Contended):
            log.exception("%s failed on storage", handler.__name__)
            return error_response(503, "StorageUnavailable", "storage is unavailable right now; try again")
        except Exception:
            log.exception("%s failed unexpectedly", handler.__name__)
            return error_response(500, "InternalError", "the service failed unexpectedly; see its logs")

    return guarded


def json_response(status: int, body: Any, headers: Mapping[str, str] | None = None) -> func.HttpResponse:
    return func.HttpResponse(
        json.dumps(body, separators=(",", ":")),
        status_code=status,
        headers=dict(headers or {}),
        mimetype="application/json",
    )


def error_response(status: int, code: str, message: str) -> func.HttpResponse:
    return json_response(status, {"error": {"code": code, "message": message}})


class PublicUrls:
    """Absolute URLs of this app's routes, for bodies and for `Location`.

    The base is OFFBOARD_PUBLIC_BASE_URL, else the host name the platform gives the app
    (WEBSITE_HOSTNAME, over https), else (a local run with neither) the request's own host.
    Never the request's Host header when a base is configured: a forged Host would turn
    `Location` into a link elsewhere. And a `?code=` key only ever goes into a URL on a
    configured base: a URL built from the request's Host never carries a key.
    """

    def __init__(self, configured: str | None, environ: Mapping[str, str] = os.environ) -> None:
        hostname = environ.get("WEBSITE_HOSTNAME", "").strip()
        self.base = configured or (f"https://{hostname}" if hostname else None)

    def url(self, request_url: str, path: str, query_code: str | None = None) -> str:
        if self.base is None:
            parts = urlsplit(request_url)
            return urlunsplit((parts.scheme, parts.netloc, path, "", ""))
        url = self.base.rstrip("/") + path
        return f"{url}?{urlencode({'code': query_code})}" if query_code else url

    def status(self, request_url: str, request_id: str, query_code: str | None = None) -> str:
        return self.url(request_url, f"/api/offboard/{request_id}", query_code)

    def batch(self, request_url: str, batch_id: str, query_code: str | None = None) -> str:
        return self.url(request_url, f"/api/offboard/batches/{batch_id}", query_code)
