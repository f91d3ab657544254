"""`submit`: send a device file in batches, safely repeatable, and optionally follow it.

**Running the same file again creates nothing new.** Each row's request carries an
idempotency key made from the file and the row, `cli:<sha256 of the file, 32 hex>:<line>`
(`cli-dry:` for dry runs, which are other requests), so after Ctrl-C, a crash or a lost
answer the same command replays: rows the service already accepted answer `replayed` with
their first request, the rest are accepted now. The same key makes retrying a batch after
a network error or a 502/503/504/429 safe too (client.py). Changing the file's bytes makes
new keys; changing `--comment` for the same file is refused per row (IdempotencyKeyReused).

**Following** (`--wait`) reads one batch view per batch each round, never one request at a
time, every `--interval` seconds (at most 5, whatever Retry-After says: someone is
watching), until every request is final. Ctrl-C stops following and cancels nothing.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.domain import ids
from shared.domain.statuses import TERMINAL

from .client import Client, raise_for_error
from .errors import INTERRUPTED, NOT_ALL_DONE, OK, CliError, KeyRefused, ServiceError, Unreachable
from .inputs import DeviceFile, Row
from .output import Out, plural, write_csv
from .progress import Display, Silent, display_for

MAX_BATCH_ITEMS = 50  # the service's limit per call
MAX_BATCH_BYTES = 60 * 1024  # under its 64 KiB body limit, which long comments can reach
# An item answered with these was not accepted *yet*: the same key sent again is safe.
RETRY_ITEM_CODES = frozenset({"IdempotentRequestInProgress", "RequestBeingAccepted", "StorageUnavailable"})
SUCCESS = frozenset({"Succeeded", "DryRun"})
RESULT_COLUMNS = ("row", "input", "requestId", "machineId", "status", "errorCode", "errorMessage")
# The `status` of rows this run did not get accepted: refused by this command (Invalid), by
# the service at intake (Refused: no request was made, unlike a request that ends Rejected),
# not sent (the run stopped first), or in a batch the service refused whole (Error).
INVALID, REFUSED, NOT_SENT, ERROR = "Invalid", "Refused", "NotSent", "Error"
REPLAYED = "replayed"  # how a batch line counts rows an earlier run had sent


def idempotency_key(digest: str, line: int, dry_run: bool) -> str:
    return f"{'cli-dry' if dry_run else 'cli'}:{digest}:{line}"


@dataclass
class Result:
    row: Row
    key: str | None
    request_id: str | None = None
    machine_id: str | None = None
    lookup: dict[str, Any] | None = None
    status: str = NOT_SENT
    error_code: str | None = None
    error_message: str | None = None
    replayed: bool = False
    existing: bool = False
    final: bool = False
    note: str | None = None
    batch_id: str | None = None  # of the answer that accepted (or replayed) it

    @property
    def accepted(self) -> bool:
        return self.request_id is not None

    @property
    def device(self) -> str:
        return self.machine_id or (self.lookup or {}).get("value") or self.row.text

    @property
    def sent_as(self) -> str:
        """How the batch line counts it: `replayed` for a row an earlier run had sent (the
        service answered with that first request), else its status."""
        return REPLAYED if self.replayed else self.status

    def item(self, dry_run: bool) -> dict[str, Any]:
        assert self.row.item is not None and self.key is not None
        item = {**self.row.item, "clientRequestId": self.key}
        if dry_run:
            item["dryRun"] = True
        return item

    def take_answer(self, answer: dict[str, Any]) -> None:
        """One item of the batch answer: the request it made (or replayed, or found), or why
        it was refused. A replay's answer is the first answer again (its status then, and the
        device as named), so `refresh` reads its current view afterwards."""
        if isinstance(answer.get("requestId"), str):
            self.request_id = answer["requestId"]
            self.replayed = answer.get("replayed") is True
            self.existing = answer.get("existingRequest") is True
            self.take_view(answer)
            return
        code, message = _error_of(answer.get("error"))
        self.status, self.error_code, self.error_message = REFUSED, code, message

    def take_view(self, view: dict[str, Any]) -> None:
        """The request's status view (from a batch answer or a batch's status)."""
        self.status = str(view.get("status") or "Unknown")
        if isinstance(view.get("machineId"), str):
            self.machine_id = view["machineId"]
        if isinstance(view.get("lookup"), dict):
            self.lookup = view["lookup"]
        self.final = self.status in TERMINAL or view.get("followUp") == "Stopped"
        self.note = view.get("note") if isinstance(view.get("note"), str) else None
        self.error_code = self.error_message = None
        reason = view.get("lastError") if self.status != "Held" else view.get("heldReason")
        if isinstance(reason, dict) and self.status not in SUCCESS:
            self.error_code, self.error_message = _error_of(reason)

    def as_csv(self) -> list[Any]:
        return [
            self.row.number,
            self.row.text,
            self.request_id,
            self.machine_id,
            self.status,
            self.error_code,
            self.error_message,
        ]

    def as_json(self) -> dict[str, Any]:
        view: dict[str, Any] = dict(zip(RESULT_COLUMNS, self.as_csv(), strict=True))
        view.update(
            {
                "requestStatus": self.status if self.accepted else None,
                "final": self.final,
                "replayed": self.replayed,
                "existingRequest": self.existing,
                "lookup": self.lookup,
                "note": self.note,
                "clientRequestId": self.key,
            }
        )
        return view


def _error_of(value: Any) -> tuple[str, str]:
    if isinstance(value, dict):
        return str(value.get("code") or "Unknown"), str(value.get("message") or "")
    return "Unknown", ""


def plan(file: DeviceFile, dry_run: bool) -> list[Result]:
    return [
        Result(row, idempotency_key(file.digest, row.number, dry_run) if row.valid else None)
        if row.valid
        else Result(row, None, status=INVALID, error_code=row.code, error_message=row.message)
        for row in file.rows
    ]


def batches(results: list[Result], comment: str | None, dry_run: bool) -> list[list[Result]]:
    """Consecutive runs of valid rows, at most 50 and 60 KiB of JSON each."""
    overhead = len(json.dumps({"requests": [], "comment": comment or ""}, ensure_ascii=False).encode())
    groups: list[list[Result]] = []
    current: list[Result] = []
    size = overhead
    for result in results:
        if not result.row.valid:
            continue
        cost = len(json.dumps(result.item(dry_run), ensure_ascii=False).encode()) + 2
        if current and (len(current) == MAX_BATCH_ITEMS or size + cost > MAX_BATCH_BYTES):
            groups.append(current)
            current, size = [], overhead
        current.append(result)
        size += cost
    if current:
        groups.append(current)
    return groups


def send_batch(
    client: Client,
    batch: list[Result],
    comment: str | None,
    dry_run: bool,
    *,
    retries: int,
    sleep: Callable[[float], None],
) -> str | None:
    """Posts one batch; every row of it gets its answer. Returns the batch id, which the
    service gives every batch that has a request in its answer (one of nothing but replays
    too: its view lists them), or None when it refused every row."""
    todo = batch
    batch_id = None
    for attempt in range(retries + 1):
        body: dict[str, Any] = {"requests": [r.item(dry_run) for r in todo]}
        if comment:
            body["comment"] = comment
        reply = client.post("/api/offboard", body)
        answers = reply.body.get("results") if isinstance(reply.body, dict) else None
        if reply.status not in (202, 400) or not isinstance(answers, list):
            raise_for_error(reply)
            raise ServiceError(
                reply.status, "UnexpectedAnswer", "the batch answer has no results", reply.route
            )
        if isinstance(reply.body.get("batchId"), str):
            batch_id = reply.body["batchId"]
            for result in todo:
                result.batch_id = batch_id
        by_item = {a.get("item"): a for a in answers if isinstance(a, dict)}
        again = []
        for index, result in enumerate(todo):
            answer = by_item.get(f"requests[{index}]")
            if answer is None:
                result.status, result.error_code = ERROR, "NoAnswer"
                result.error_message = "the service's answer has no result for this row"
                continue
            result.take_answer(answer)
            if result.status == REFUSED and result.error_code in RETRY_ITEM_CODES:
                again.append(result)
        if not again or attempt == retries:
            break
        todo = again
        sleep(min(5.0, 0.5 * 2**attempt))
    return batch_id


class Follower:
    """Polls the batch views of the accepted rows until every request is final."""

    def __init__(
        self,
        client: Client,
        results: list[Result],
        display: Display,
        interval: float,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.client = client
        self.display = display
        self.interval = interval
        self.sleep = sleep
        self.by_request: dict[str, list[Result]] = {}
        for result in results:
            if result.request_id:
                self.by_request.setdefault(result.request_id, []).append(result)
        # Each request is read in the view of the batch that answered for it (which lists the
        # replays it answered too), else of the batch its id names (shared/domain/ids.py); an
        # id of the older random layout has no batch and is read alone.
        self.batches: dict[str, set[str]] = {}
        self.singles: set[str] = set()
        for request_id, of_request in self.by_request.items():
            answered_by = next((r.batch_id for r in of_request if r.batch_id), None)
            self._place(request_id, answered_by)

    def _place(self, request_id: str, batch_id: str | None) -> None:
        home = ids.batch_of(request_id) if ids.is_batched(request_id) else None
        chosen = batch_id or home
        if chosen is None:
            self.singles.add(request_id)
        else:
            self.batches.setdefault(chosen, set()).add(request_id)

    def done(self, request_ids: Iterable[str] | None = None) -> bool:
        wanted = self.by_request if request_ids is None else request_ids
        return all(r.final for request_id in wanted for r in self.by_request[request_id])

    def run(self) -> None:
        while True:
            self.round()
            if self.done():
                return
            self.sleep(self.interval)

    def round(self) -> None:
        for batch_id, wanted in list(self.batches.items()):
            if self.done(wanted):
                continue
            reply = self.client.get(f"/api/offboard/batches/{batch_id}")
            if reply.status == 404:  # not a batch after all: read its requests one by one
                del self.batches[batch_id]
                self.singles.update(wanted)
                continue
            raise_for_error(reply)
            items = reply.body.get("items") if isinstance(reply.body, dict) else None
            seen = set()
            for view in items if isinstance(items, list) else []:
                if isinstance(view, dict) and view.get("requestId") in wanted:
                    seen.add(view["requestId"])
                    self.update(view)
            for request_id in wanted - seen:  # not in this view: read it where its id says
                wanted.discard(request_id)
                home = ids.batch_of(request_id) if ids.is_batched(request_id) else None
                if home is None or home == batch_id:
                    self.singles.add(request_id)
                else:
                    self._place(request_id, home)
            if not wanted:
                del self.batches[batch_id]
        for request_id in sorted(self.singles):
            if not self.done([request_id]):
                reply = self.client.get(f"/api/offboard/{request_id}")
                raise_for_error(reply)
                if isinstance(reply.body, dict):
                    self.update(reply.body)
        self.display.tick()

    def update(self, view: dict[str, Any]) -> None:
        for result in self.by_request.get(str(view.get("requestId")), []):
            before = result.status
            result.take_view(view)
            if result.status != before:
                self.display.changed(result, before)


@dataclass(frozen=True)
class Options:
    comment: str | None
    dry_run: bool
    wait: bool
    out: Path | None
    skip_invalid: bool
    interval: float
    retries: int
    argv: list[str]  # to print the command that resumes


def run(
    client: Client,
    file: DeviceFile,
    options: Options,
    out: Out,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    results = plan(file, options.dry_run)
    groups = batches(results, options.comment, options.dry_run)
    valid = sum(len(g) for g in groups)
    mode = " (dry run)" if options.dry_run else ""
    out.say(
        f"{file.name}: {plural(len(results), 'row')} ({file.form}){mode}, {valid} to send in "
        f"{plural(len(groups), 'batch', 'batches')}"
        + (f"; {len(results) - valid} invalid, skipped" if valid < len(results) else "")
    )
    batch_ids: list[str] = []
    stopped: CliError | None = None
    interrupted = False
    waited = False
    try:
        for number, group in enumerate(groups, start=1):
            try:
                batch_id = send_batch(
                    client, group, options.comment, options.dry_run, retries=options.retries, sleep=sleep
                )
            except ServiceError as exc:  # the whole batch refused: its rows say why, the rest NotSent
                for result in group:
                    if not result.accepted:
                        result.status, result.error_code, result.error_message = ERROR, exc.code, exc.message
                raise
            if batch_id:
                batch_ids.append(batch_id)
            out.say(f"batch {number}/{len(groups)}: {_counts(r.sent_as for r in group)}")
        refresh(client, results, sleep)
        if options.wait and any(r.accepted and not r.final for r in results):
            waited = True
            display = display_for(out, results)
            try:
                display.begin(options.interval)
                Follower(client, results, display, options.interval, sleep).run()
            finally:
                display.end()
        elif options.wait:
            waited = True  # everything was final already (or nothing was accepted)
    except KeyboardInterrupt:
        interrupted = True
    except (ServiceError, Unreachable, KeyRefused) as exc:
        stopped = exc
    report(out, file, results, options, batch_ids, waited)
    if options.out is not None:
        write_csv(options.out, RESULT_COLUMNS, (r.as_csv() for r in results))
        out.note(f"results written to {options.out}")
    if stopped is not None:
        out.error(str(stopped))
    if interrupted or stopped is not None:
        out.note(
            ("Stopped waiting; nothing was cancelled." if waited else "Stopped.")
            + " Requests already accepted go on. To resume (rows already accepted are replayed, "
            + "not sent again), run the same command:\n    "
            + resume_command(options.argv)
            + ("\n    (with the same input on stdin)" if file.name == "<stdin>" else "")
        )
    if interrupted:
        return INTERRUPTED
    if stopped is not None:
        return stopped.exit_code
    if options.wait:
        return OK if all(r.status in SUCCESS for r in results) else NOT_ALL_DONE
    return OK if all(r.accepted for r in results) else NOT_ALL_DONE


def refresh(client: Client, results: list[Result], sleep: Callable[[float], None]) -> None:
    """Replayed rows got their first answer again (Queued or Held then, the device as it was
    named); their current view is read through the batch routes, one call per batch, as
    `--wait` reads them, so each says where its request is now (and its machine id, once a
    lookup is resolved). Nothing is shown as a change: nothing changed during this run."""
    replayed = [r for r in results if r.replayed and not r.final]
    if replayed:
        Follower(client, replayed, Silent(), 0.0, sleep).round()


def resume_command(argv: list[str]) -> str:
    return shlex.join(["scripts/offboard", *argv])


def report(
    out: Out,
    file: DeviceFile,
    results: list[Result],
    options: Options,
    batch_ids: list[str],
    waited: bool,
) -> None:
    if out.json_mode:
        out.document(
            {
                "file": file.name,
                "form": file.form,
                "sha256": file.digest,
                "dryRun": options.dry_run,
                "waited": waited,
                "batchIds": batch_ids,
                "counts": dict(Counter(r.status for r in results)),
                "rows": [r.as_json() for r in results],
            }
        )
        return
    problems = [r for r in results if not _ok(r, waited)]
    shown = results if len(results) <= MAX_BATCH_ITEMS else problems
    if shown:
        out.table(
            ("line", "input", "requestId", "status", "why"),
            ([r.row.number, r.row.text, r.request_id, r.status, _why(r)] for r in shown),
            title=None
            if shown is results
            else f"{plural(len(problems), 'row')} need a look (all rows: --out FILE)",
            wrap=("why",),
        )
    out.say(summary(results, waited))
    if any(r.error_code == "IdempotencyKeyReused" for r in results):
        out.note(
            "IdempotencyKeyReused: these rows were sent before as other requests: with another "
            "--comment (rows without a comment of their own take it), or before the app's "
            "OFFBOARD_DEFAULT_COMMENT or OFFBOARD_DRY_RUN setting changed. They are already "
            "requests: run the file as it was first run, or change the file to send new ones"
        )
    held = [r for r in results if r.status == "Held"]
    if held:
        out.note(
            f"{plural(len(held), 'request')} held: an operator releases them with "
            "`scripts/offboard release --all` (the master key)"
        )


def summary(results: list[Result], waited: bool) -> str:
    """The last line: each row's status now, and whether that is the end. After `--wait`
    was stopped (Ctrl-C, a lost service), the requests not yet final say `still`."""
    unfinished = [r for r in results if r.accepted and not r.final]
    if not waited:
        text = "sent: " + _counts(r.status for r in results)
    elif not unfinished:
        text = "final: " + _counts(r.status for r in results)
    else:
        text = "not final: " + _counts(
            f"still {r.status}" if r.accepted and not r.final else r.status for r in results
        )
    replays = sum(1 for r in results if r.replayed)
    if replays:
        text += f"; {replays} replayed (sent by an earlier run of this file, no new request)"
    return text


def _ok(result: Result, waited: bool) -> bool:
    return result.status in SUCCESS if waited else result.accepted


def _why(result: Result) -> str:
    parts = []
    if result.error_code:
        parts.append(
            f"{result.error_code}: {result.error_message}" if result.error_message else result.error_code
        )
    if result.replayed:
        parts.append("replayed: an earlier run sent it")
    if result.existing:
        parts.append("already requested (an unfinished request for this device)")
    if result.note:
        parts.append(result.note)
    return "; ".join(parts)


def _counts(statuses: Iterable[str]) -> str:
    counts = Counter(statuses)
    return ", ".join(f"{n} {status}" for status, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def stdin_bytes() -> bytes:
    return sys.stdin.buffer.read()
