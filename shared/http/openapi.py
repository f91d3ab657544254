"""The OpenAPI 2.0 document for a Logic Apps / Power Automate custom connector.

The document is stored in the repository (`openapi/offboard.swagger.json`) and served with the
host and scheme of the app's public base URL (shared/http/responses.py, PublicUrls), so an
imported connector points at the app that served it.
"""

from __future__ import annotations

import copy
import json
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

DOCUMENT = Path(__file__).resolve().parents[2] / "openapi" / "offboard.swagger.json"


@lru_cache(maxsize=1)
def _stored() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DOCUMENT.read_text(encoding="utf-8"))
    return document


def document_for(base_url: str) -> dict[str, Any]:
    """The document with `host` and `schemes` of the app's public base URL (never the Host
    header of the request that fetched it)."""
    parts = urlsplit(base_url)
    document = copy.deepcopy(_stored())
    document["host"] = parts.netloc
    document["schemes"] = [parts.scheme or "https"]
    return document
