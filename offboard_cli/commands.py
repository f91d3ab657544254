"""`status`, `list`, `held`, `release` and `audit`: reading requests back, and releasing holds."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from shared.domain import ids
from shared.domain.messages import REQUEST_ID
from shared.domain.statuses import Status

from .client import Client, raise_for_error
from .errors import NOT_ALL_DONE, OK, ServiceError, UsageError
from .inputs import MACHINE_ID
from .output import Out, plural, write_csv

AUDIT_COLUMNS = ("at", "requestId", "event", "outcome", "detail", "caller", "machineId", "tenantId")
MAX_PAGES = 1000  # 100,000 requests: a `next` that never ends is a service bug, not a list
_DURATION = re.compile(r"(\d+)([mhd])")
_UNITS = {"m": "minutes", "h": "hours", "d": "days"}


# ---- arguments, checked before anything is sent ---------------------------------------------


def request_id_of(text: str, *, batch_ok: bool = False) -> str:
    value = text.strip().lower()
    if REQUEST_ID.fullmatch(value) and (batch_ok or not ids.is_batch_id(value)):
        return value
    if REQUEST_ID.fullmatch(value):
        raise UsageError(f"{text!r} is a batch id, not a request id")
    raise UsageError(f"{text!r} is not a request id (the GUID the service returned)")


def since_of(text: str) -> str:
    """ISO 8601 with a zone (as the service wants it), or a duration back from now: 30m, 12h, 7d."""
    value = text.strip()
    duration = _DURATION.fullmatch(value)
    if duration:
        delta = timedelta(**{_UNITS[duration.group(2)]: int(duration.group(1))})
        return (datetime.now(UTC) - delta).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(
            f"--since {text!r} is not a time: use ISO 8601 with a zone (2026-12-01T09:00:00Z) "
            "or a duration (30m, 12h, 7d)"
        ) from None
    if when.tzinfo is None:
        raise UsageError(f"--since {text!r} has no time zone: add Z or +01:00")
    return value


def status_filter_of(text: str) -> str:
    for status in Status:
        if status.value.lower() == text.strip().lower():
            return status.value
    raise UsageError(f"--status {text!r} is not a status; one of {', '.join(s.value for s in Status)}")


def machine_id_of(text: str) -> str:
    if not MACHINE_ID.fullmatch(text.strip()):
        raise UsageError(f"--machine {text!r} is not a machine id (40 hexadecimal characters)")
    return text.strip().lower()


def batch_id_of(text: str) -> str:
    value = text.strip().lower()
    if not ids.is_batch_id(value):
        raise UsageError(f"--batch {text!r} is not a batch id (the batchId the service returned)")
    return value


# ---- views ----------------------------------------------------------------------------------


def device_of(view: dict[str, Any]) -> str:
    if view.get("machineId"):
        return str(view["machineId"])
    lookup = view.get("lookup")
    if isinstance(lookup, dict):
        return f"{lookup.get('value')} ({lookup.get('by')})"
    return ""


def why_of(view: dict[str, Any]) -> str:
    parts = []
    for name in ("lastError", "heldReason"):
        value = view.get(name)
        if isinstance(value, dict) and value.get("code"):
            parts.append(f"{value['code']}: {value.get('message') or ''}".rstrip(": "))
    if view.get("followUp") == "Stopped":
        parts.append("follow-up stopped (Defender still reports it pending)")
    if view.get("note"):
        parts.append(str(view["note"]))
    if view.get("releasedBy"):
        parts.append(f"released by {view['releasedBy']}")
    return "; ".join(parts)


def why_held(view: dict[str, Any]) -> str:
    reason = view.get("heldReason")
    if not isinstance(reason, dict):
        return ""
    return f"{reason.get('code') or ''}: {reason.get('message') or ''}".strip(": ")


def requests_table(out: Out, views: list[dict[str, Any]], title: str | None = None) -> None:
    out.table(
        ("requestId", "device", "status", "updated", "why"),
        (
            [
                v.get("requestId"),
                device_of(v),
                v.get("status"),
                v.get("updatedAt") or v.get("createdAt"),
                why_of(v),
            ]
            for v in views
        ),
        title=title,
        wrap=("why",),
    )


# ---- commands -------------------------------------------------------------------------------


def status(client: Client, request_ids: list[str], out: Out) -> int:
    views: list[dict[str, Any]] = []
    batches: list[dict[str, Any]] = []
    missing: list[dict[str, str]] = []
    for request_id in request_ids:
        batch = ids.is_batch_id(request_id)
        reply = client.get(f"/api/offboard/batches/{request_id}" if batch else f"/api/offboard/{request_id}")
        if reply.status == 404:
            code, message = reply.error()
            missing.append({"id": request_id, "code": code, "message": message})
            continue
        raise_for_error(reply)
        if batch:
            batches.append(reply.body)
            views.extend(v for v in reply.body.get("items", []) if isinstance(v, dict))
        else:
            views.append(reply.body)
    if out.json_mode:
        out.document({"requests": views, "batches": batches, "notFound": missing})
    else:
        for batch_view in batches:
            out.say(
                f"batch {batch_view.get('batchId')}: {plural(int(batch_view.get('total') or 0), 'request')}, "
                f"{'final' if batch_view.get('final') else 'not final yet'}"
            )
        if views:
            requests_table(out, views)
    for gone in missing:
        out.error(f"{gone['id']}: {gone['code']}: {gone['message']}")
    return NOT_ALL_DONE if missing else OK


def list_requests(client: Client, params: dict[str, str], out: Out, *, title: str | None = None) -> int:
    views = fetch_all(client, params)
    if out.json_mode:
        out.document({"requests": views})
        return OK
    if not views:
        out.say(f"no requests match: {_describe(params)}")
        return OK
    requests_table(out, views, title=title or f"{plural(len(views), 'request')}, newest first")
    return OK


def held(client: Client, out: Out) -> int:
    views = fetch_all(client, {"status": "Held"})
    if out.json_mode:
        out.document({"requests": views})
        return OK
    if not views:
        out.say("no held requests")
        return OK
    out.table(
        ("requestId", "device", "held since", "caller", "comment", "why held"),
        (
            [
                v.get("requestId"),
                device_of(v),
                v.get("createdAt"),
                v.get("caller"),
                v.get("comment"),
                why_held(v),
            ]
            for v in views
        ),
        title=f"{plural(len(views), 'held request')}",
        wrap=("caller", "comment", "why held"),
    )
    out.note("release them with `scripts/offboard release ID...` or `--all` (the master key)")
    return OK


def fetch_all(client: Client, params: dict[str, str]) -> list[dict[str, Any]]:
    """Every page of the list route, following `next` links."""
    reply = client.get("/api/offboard", params)
    views: list[dict[str, Any]] = []
    seen: set[str] = set()
    for _ in range(MAX_PAGES):
        raise_for_error(reply)
        body = reply.body if isinstance(reply.body, dict) else {}
        views.extend(v for v in body.get("requests", []) if isinstance(v, dict))
        following = body.get("next")
        if not isinstance(following, str) or not following or following in seen:
            return views
        seen.add(following)
        reply = client.get_url(following)
    raise ServiceError(200, "EndlessList", f"the list route gave more than {MAX_PAGES} pages")


def release(admin: Client, request_ids: list[str], everything: bool, out: Out) -> int:
    released: list[str] = []
    refused: list[dict[str, str]] = []
    if everything:
        reply = admin.post("/api/offboard/held/release")
        raise_for_error(reply)
        released = [str(r) for r in reply.body.get("released", [])]
    for request_id in request_ids:
        reply = admin.post(f"/api/offboard/{request_id}/release")
        if reply.status in (404, 409):
            code, message = reply.error()
            refused.append({"requestId": request_id, "code": code, "message": message})
            continue
        raise_for_error(reply)
        released.append(str(reply.body.get("requestId", request_id)))
    if out.json_mode:
        out.document({"released": released, "count": len(released), "refused": refused})
    else:
        for request_id in released:
            out.say(f"released {request_id} (queued again)")
        out.say(f"released {plural(len(released), 'request')}")
    for refusal in refused:
        out.error(f"{refusal['requestId']}: {refusal['code']}: {refusal['message']}")
    return NOT_ALL_DONE if refused else OK


def audit(client: Client, request_id: str | None, since: str | None, out: Out, csv_path: Path | None) -> int:
    if request_id is not None:
        reply = client.get(f"/api/offboard/{request_id}/audit")
    else:
        assert since is not None
        reply = client.get("/api/offboard/audit", {"since": since})
    if reply.status == 404:
        code, message = reply.error()
        out.error(f"{request_id}: {code}: {message}")
        return NOT_ALL_DONE
    raise_for_error(reply)
    events = [e for e in reply.body.get("events", []) if isinstance(e, dict)]
    if csv_path is not None:
        write_csv(csv_path, AUDIT_COLUMNS, ([e.get(c) for c in AUDIT_COLUMNS] for e in events))
        out.note(f"{plural(len(events), 'event')} written to {csv_path}")
    if out.json_mode:
        body: dict[str, Any] = {"events": events}
        if request_id is not None:
            body = {"requestId": request_id, **body}
        out.document(body)
    elif csv_path is None:
        if not events:
            out.say("no audit events")
        else:
            out.table(
                ("at", "requestId", "event", "outcome", "detail", "caller"),
                (
                    [e.get(c) for c in ("at", "requestId", "event", "outcome", "detail", "caller")]
                    for e in events
                ),
                wrap=("detail", "caller"),
            )
    return OK


def _describe(params: dict[str, str]) -> str:
    """The filters of a list, with the window it looked in (a batch is read whole)."""
    filters = [f"{k}={v}" for k, v in params.items() if k != "since"]
    if "batchId" in params:
        window = ""
    elif "since" in params:
        window = f"created since {params['since']}"
    else:
        window = "created in the last 7 days (--since for longer, e.g. --since 30d)"
    return ", ".join([*filters, window] if window else filters)
