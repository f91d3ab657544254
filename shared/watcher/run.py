"""One run of the Intune watcher: the timer function `intune_retirements`, on
INTUNE_WATCH_SCHEDULE (NCRONTAB, every five minutes by default), when INTUNE_WATCH_ENABLED.

Each run, in this order:
1. read its checkpoint; when Graph asked for a longer wait than a run may spend (a long
   Retry-After, kept in the checkpoint row), stop until then;
2. read the inventory and the ledger (one query each; store.py);
3. list every managed device, all pages: leaving states are sightings, and the listing is
   the inventory's new state;
4. read the audit events since `checkpoint - LOOKBACK`, all pages, and sort them by time;
5. one sighting per device (decide.merge); a device with no ledger row gets one, inserted
   before anything is submitted, so whatever happens next the same key and comment are used;
6. submit every unsettled ledger row through `Submissions.accept` as the caller
   `intune-watcher`, up to 50 per call: the same path as every HTTP caller (idempotency key,
   device guard, breaker, request row and audit trail, queue), so the worker resolves,
   prechecks, paces and offboards exactly as for a Logic App's request. In report mode
   (INTUNE_WATCH_MODE=report) every request is a dry run. Each row is settled with its answer;
7. write what changed in the inventory, prune ledger rows no run can see again;
8. move the checkpoint (decide.next_checkpoint: conditional, never backwards) and log what
   the run found and did in one line.

**Failures.** Graph's answers are judged by decide.read_answer: a 429 or a 503 with
Retry-After waits that long when a run can (at most `max_inline_wait`), else the read stops
and the wait is kept for the next run, for every instance; without Retry-After, 5xx,
timeouts and dropped connections back off exponentially with jitter, a few times per page;
401 and 403 stop the read with a log line naming GRAPH_API_SCOPE or the permission to grant.
Graph's Intune limits (devices 2000 and auditing 1000 requests per 20 s, per app and tenant)
are far above what a run makes (a call per 1000 devices or per page of events), so calls are
not paced beforehand. A read that stops leaves the run incomplete, never wrong: retirements
already read are still submitted, but the inventory marks nothing gone and the checkpoint
does not move, so the next run reads the same events again. Storage failing while accepting
(ServiceUnavailable) stops submitting and holds the checkpoint; a crash anywhere does the
same. Input that cannot be used (a page that is not the expected JSON, an item with no id, a
device with no usable identifier) is recorded in the audit table (`rejected-<date>`, caller
`intune-watcher`) and the log with its reason, once, and skipped; a device Defender does not
know is accepted and fails in the worker as `DeviceNotFound`, like any caller's.

**Overlapping runs.** The Functions timer is a singleton (one instance holds its lock), but
if two runs did overlap (a lock lost mid-run, two apps on one storage account), each
retirement is still one request: both runs find or insert the same ledger row and submit
its key, and the intake's idempotency guard gives the second the first one's request (or
`IdempotentRequestInProgress` for a few seconds, which leaves the row to the next run). The
checkpoint is replaced only with its ETag and merged with the other run's, so it never goes
back; inventory and ledger writes that lose a race are the other run's same writes.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

import requests
from azure.core.exceptions import AzureError

from ..adapters.audit import Rejections
from ..adapters.graph import AUDIT_PERMISSION, DEVICES_PERMISSION, ForeignLink, GraphClient
from ..domain.errors import DefenderCallError, Refusal, ServiceUnavailable
from ..domain.offboard import Caller
from ..intake.submission import Answer, Item, Submissions
from . import decide
from .decide import (
    LOOKBACK,
    Device,
    Event,
    GraphPolicy,
    Mode,
    PageRead,
    Retirement,
    Sighting,
    Skip,
    Stop,
    Wait,
)
from .store import Checkpoint, WatchStore

log = logging.getLogger("shared.watcher")
CALLER = Caller(decide.CALLER, namespace="app:intune-watcher")
PAYLOAD_FORMAT = "intune-watcher"
BATCH = 50  # items per accept call, as for an HTTP caller
RUN_BUDGET = timedelta(minutes=4)  # inside host.json's functionTimeout of 5 minutes
MAX_PAGES = 10_000


@dataclass
class Read:
    """One paged read (a listing), as far as it got."""

    what: str
    items: list[object] = field(default_factory=list)
    skips: list[Skip] = field(default_factory=list)
    calls: int = 0
    pages: int = 0
    throttled: int = 0
    retried: int = 0
    stop: Stop | None = None

    @property
    def complete(self) -> bool:
        return self.stop is None


@dataclass
class Report:
    """What one run found and did: the log line, and what tests look at."""

    mode: Mode
    started: datetime
    devices: int = 0
    events: int = 0
    since: datetime | None = None
    found: int = 0  # devices with a sign of leaving this run
    opened: int = 0  # ... of which new
    submitted: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    deferred: int = 0
    inventory_written: int = 0
    pruned: int = 0
    checkpoint_from: datetime | None = None
    checkpoint_to: datetime | None = None
    calls: int = 0
    throttled: int = 0
    retried: int = 0
    stops: list[str] = field(default_factory=list)
    waiting_until: datetime | None = None
    seconds: float = 0.0
    request_ids: list[str] = field(default_factory=list)
    batches: list[str] = field(default_factory=list)  # GET /api/offboard/batches/{id} follows each

    @property
    def eventful(self) -> bool:
        """Whether the run saw or did anything beyond reading an unchanged tenant."""
        return bool(
            self.opened or self.submitted or self.skipped or self.deferred or self.inventory_written
        ) or bool(self.pruned or self.throttled or self.retried or self.stops or self.waiting_until)

    def line(self) -> str:
        if self.waiting_until is not None and not self.calls:
            return (
                f"Intune watcher ({self.mode}): Graph asked to wait until {decide.iso(self.waiting_until)}; "
                "nothing read this run"
            )
        outcomes = ", ".join(f"{n} {k.lower()}" for k, n in sorted(self.outcomes.items())) or "none"
        skipped = ", ".join(f"{k} {n}" for k, n in sorted(self.skipped.items()))
        parts = [
            f"Intune watcher ({self.mode}): {self.devices} devices, {self.events} audit events since "
            f"{decide.iso(self.since) if self.since else '-'}",
            f"{self.found} leaving ({self.opened} new)",
            f"submitted {self.submitted}: {outcomes}"
            + (f" (batch {', '.join(self.batches)})" if self.batches else ""),
            f"skipped {sum(self.skipped.values())}" + (f" ({skipped})" if skipped else ""),
            f"deferred {self.deferred}",
            f"inventory {self.inventory_written} written",
            f"ledger {self.pruned} pruned",
            f"checkpoint {_stamp(self.checkpoint_from)} -> {_stamp(self.checkpoint_to)}",
            f"Graph {self.calls} calls, {self.throttled} throttled, {self.retried} retried",
        ]
        if self.stops:
            parts.append("incomplete: " + "; ".join(self.stops))
        return "; ".join(parts) + f"; {self.seconds:.1f}s"


def _stamp(moment: datetime | None) -> str:
    return decide.iso(moment) if moment else "-"


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Watcher:
    graph: GraphClient
    store: WatchStore
    submissions: Submissions
    rejections: Rejections
    mode: Mode
    default_comment: str
    clock: Callable[[], datetime] = _utc_now
    sleep: Callable[[float], None] = time.sleep
    rng: random.Random = field(default_factory=random.Random)
    policy: GraphPolicy = field(default_factory=GraphPolicy)
    lookback: timedelta = LOOKBACK
    budget: timedelta = RUN_BUDGET

    def run(self) -> Report:
        started = self.clock()
        report = Report(self.mode, started)
        try:
            self._run(report)
        except AzureError:
            report.stops.append("storage unavailable")
            log.exception("Intune watcher (%s): storage unavailable; the next run starts again", self.mode)
            raise
        finally:
            report.seconds = (self.clock() - started).total_seconds()
            # A run that changed nothing is a DEBUG line: the host logs every timer run anyway.
            log.log(logging.INFO if report.eventful else logging.DEBUG, "%s", report.line())
        return report

    # ---- the run ------------------------------------------------------------------------

    def _run(self, report: Report) -> None:
        started, deadline = report.started, report.started + self.budget
        checkpoint = self.store.checkpoint()
        report.checkpoint_from = report.checkpoint_to = checkpoint.at
        if checkpoint.not_before is not None and started < checkpoint.not_before:
            report.waiting_until = checkpoint.not_before
            return
        known = self.store.inventory()
        ledger = self.store.ledger()
        noted: dict[str, str] = {}

        devices = self._read("managed devices", self.graph.managed_devices, DEVICES_PERMISSION, deadline)
        listed, sightings = self._devices(devices, started)
        since = report.since = decide.audit_since(checkpoint.at, started, self.lookback)
        audit = self._read("audit events", lambda: self.graph.audit_events(since), AUDIT_PERMISSION, deadline)
        events = self._events(audit)
        for read in (devices, audit):
            report.calls += read.calls
            report.throttled += read.throttled
            report.retried += read.retried
            if read.stop is not None:
                report.stops.append(f"{read.what}: {read.stop.code} ({read.stop.message})")
            if read.stop is not None and read.stop.code == "InvalidGraphPage":
                # Bad input, in the audit table once a day; in the log (by _read) every time.
                # Throttling and outages are the log's alone.
                once_a_day = f"{read.what}:{read.stop.code}:{started:%Y%m%d}"
                stopped = Skip(f"Graph {read.what}", read.stop.code, read.stop.message, once_a_day)
                self._note(stopped, noted, checkpoint, started, log_it=False)
        report.devices, report.events = len(listed), len(events)
        for skip in [*devices.skips, *audit.skips, *(s for e in events for s in e.skips)]:
            self._note(skip, noted, checkpoint, started)
        sightings += [s for e in events for s in e.sightings]

        # 5. one sighting per device, and a ledger row for each new one
        actions: dict[str, set[str]] = {}
        for s in sightings:
            actions.setdefault(s.intune_id, set()).add(s.action)
        merged = decide.merge(sightings)
        report.found = len(merged)
        new = []
        for intune_id, sighting in sorted(merged.items(), key=lambda item: item[1].at):
            if intune_id in ledger:
                continue
            found = known.get(intune_id)
            full = decide.enrich(sighting, listed.get(intune_id), found.device if found else None)
            new.append(decide.open_retirement(full, started, self.mode, self.default_comment))
        opened, ours = self.store.open(new) if new else ({}, set())
        for row in new:
            if row.intune_id in ours:
                report.opened += 1
                if row.settled:  # skipped at once: no usable identifier
                    report.skipped[row.outcome or "Skipped"] += 1
                    self._record(row, noted, checkpoint, started)
        ledger.update(opened)
        ledger = self._fold_actions(ledger, actions)

        # 6. submit what is not settled yet
        ledger = self._submit(ledger, report, deadline, noted, checkpoint, started)

        # 7. the inventory, and ledger rows no run can see again
        changes = decide.inventory_changes(known, listed, complete=devices.complete, now=started)
        if len(changes):
            report.inventory_written = self.store.write_inventory(known, changes, started)

        # 8. the checkpoint
        unsettled = [
            e.at
            for e in events
            for s in e.sightings
            if s.intune_id not in ledger or not ledger[s.intune_id].settled
        ]
        newest = max((e.at for e in events), default=None)
        at = decide.next_checkpoint(
            checkpoint.at,
            complete=audit.complete,
            newest=newest,
            unsettled=unsettled,
            started=started,
            lookback=self.lookback,
        )
        not_before = None
        waits = [r.stop.retry_after for r in (devices, audit) if r.stop and r.stop.retry_after]
        if waits:
            not_before = started + timedelta(seconds=max(waits))
            report.waiting_until = not_before
        leaving = {s.intune_id for s in sightings if s.source == "device"}
        prunable = [
            row
            for row in ledger.values()
            if decide.prunable(
                row.opened_at,
                row.settled,
                row.intune_id in leaving,
                at,
                listing_complete=devices.complete,
                lookback=self.lookback,
            )
        ]
        report.pruned = self.store.prune(prunable)
        report.seconds = (self.clock() - started).total_seconds()
        report.checkpoint_to = at
        saved = self.store.save_checkpoint(checkpoint, at, not_before, noted, report.line(), self.clock())
        report.checkpoint_to = saved.at

    # ---- reading Graph ------------------------------------------------------------------

    def _read(
        self, what: str, first: Callable[[], requests.Response], permission: str, deadline: datetime
    ) -> Read:
        read = Read(what)
        call: Callable[[], requests.Response] = first
        links: set[str] = set()
        tries = 0
        while True:
            read.calls += 1
            result: requests.Response | DefenderCallError
            try:
                result = call()
            except DefenderCallError as exc:
                result = exc
            except ForeignLink as exc:
                read.stop = Stop("InvalidGraphPage", str(exc))
                return read
            outcome = decide.read_answer(
                result,
                tries=tries,
                now=self.clock(),
                rng=self.rng,
                permission=permission,
                same_origin=self.graph.same_origin,
                policy=self.policy,
            )
            if isinstance(outcome, Wait):
                if self.clock() + timedelta(seconds=outcome.seconds) > deadline:
                    read.stop = Stop("RunBudget", f"{outcome.code}: no time left in this run to wait")
                    return read
                read.retried += 1
                read.throttled += int(outcome.throttled)
                log.info(
                    "Graph %s: %s (%s); asking again in %.1fs",
                    what,
                    outcome.code,
                    outcome.message[:200],
                    outcome.seconds,
                )
                self.sleep(outcome.seconds)
                tries += 1
                continue
            if isinstance(outcome, Stop):
                level = logging.ERROR if outcome.configuration else logging.WARNING
                log.log(
                    level,
                    "Graph %s: %s: %s; the next run reads it again",
                    what,
                    outcome.code,
                    outcome.message,
                )
                read.stop = outcome
                return read
            assert isinstance(outcome, PageRead)
            tries = 0
            read.pages += 1
            read.items.extend(outcome.items)
            if outcome.skip is not None:
                # Recorded once a day, like a read that stops: the next runs read it again.
                once_a_day = f"{what}:{outcome.skip.code}:{self.clock():%Y%m%d}"
                read.skips.append(
                    replace(outcome.skip, item=f"a page of Graph {what}", fingerprint=once_a_day)
                )
            link = outcome.next_link
            if link is None:
                return read
            if link in links or read.pages >= MAX_PAGES:
                read.stop = Stop("InvalidGraphPage", "the paging links go round in a circle")
                return read
            if self.clock() > deadline:
                read.stop = Stop("RunBudget", "no time left in this run for more pages")
                return read
            links.add(link)
            call = _follow(self.graph, link)

    def _devices(self, read: Read, seen_at: datetime) -> tuple[dict[str, Device], list[Sighting]]:
        listed: dict[str, Device] = {}
        sightings: list[Sighting] = []
        for index, raw in enumerate(read.items):
            device = decide.parse_device(raw, index)
            if isinstance(device, Skip):
                read.skips.append(device)
                continue
            listed[device.intune_id] = device
            sighting = decide.device_sighting(device, seen_at)
            if sighting is not None:
                sightings.append(sighting)
        return listed, sightings

    def _events(self, read: Read) -> list[Event]:
        events: list[Event] = []
        for index, raw in enumerate(read.items):
            event = decide.parse_event(raw, index)
            if isinstance(event, Skip):
                read.skips.append(event)
            else:
                events.append(event)
        return sorted(events, key=lambda e: (e.at, e.id))

    # ---- the ledger ---------------------------------------------------------------------

    def _fold_actions(
        self, ledger: dict[str, Retirement], actions: dict[str, set[str]]
    ) -> dict[str, Retirement]:
        """Records every action seen for a device on its row (a delete after a retire)."""
        changed = []
        for intune_id, seen in actions.items():
            row = ledger.get(intune_id)
            if row is not None and not seen <= set(row.actions):
                changed.append((row, replace(row, actions=(*row.actions, *sorted(seen - set(row.actions))))))
        if changed:
            ledger.update(self.store.update(changed))
        return ledger

    def _submit(
        self,
        ledger: dict[str, Retirement],
        report: Report,
        deadline: datetime,
        noted: dict[str, str],
        checkpoint: Checkpoint,
        now: datetime,
    ) -> dict[str, Retirement]:
        unusable = [r for r in ledger.values() if not r.settled and r.lookup is None]
        if unusable:  # a row whose lookup no longer reads (changed by hand): never retried
            fixed = [
                (r, replace(r, settled=True, outcome="InvalidLedgerRow", error="its lookup is unreadable"))
                for r in unusable
            ]
            ledger.update(self.store.update(fixed))
            for _, row in fixed:
                report.skipped[row.outcome or ""] += 1
                self._record(row, noted, checkpoint, now)
        pending = sorted((r for r in ledger.values() if not r.settled and r.lookup), key=lambda r: r.at)
        for start in range(0, len(pending), BATCH):
            chunk = pending[start : start + BATCH]
            if self.clock() > deadline:
                report.deferred += len(pending) - start
                report.stops.append("submitting: no time left in this run")
                break
            items = [
                Item(decide.label(_sighting_of(row)), decide.offboard_request(row, self.mode), row.key)
                for row in chunk
            ]
            answers: list[Answer | Refusal]
            try:
                batch_id, answers = self.submissions.accept(
                    items, CALLER, batch=True, payload_format=PAYLOAD_FORMAT
                )
                if batch_id:
                    report.batches.append(batch_id)
            except Exception:
                log.exception("Intune watcher: accepting %d retirement(s) failed", len(chunk))
                answers = [ServiceUnavailable("StorageUnavailable", "accepting failed")] * len(chunk)
            changes: list[tuple[Retirement, Retirement]] = []
            storage_failed = False
            for row, item, answer in zip(chunk, items, answers, strict=True):
                settled = decide.settlement(answer, row.attempts + 1)
                if settled.storage_failed:
                    storage_failed = True
                    report.deferred += 1
                    continue
                changed = replace(
                    row,
                    request_id=settled.request_id or row.request_id,
                    outcome=settled.outcome,
                    settled=settled.settled,
                    attempts=row.attempts + 1,
                    error=settled.error,
                )
                changes.append((row, changed))
                report.submitted += 1
                if settled.request_id:
                    report.outcomes[settled.outcome] += 1
                    report.request_ids.append(settled.request_id)
                elif settled.settled:
                    report.skipped[settled.outcome] += 1
                    self._record(changed, noted, checkpoint, now)
                else:
                    report.deferred += 1
                    log.warning(
                        "Intune watcher: %s not accepted yet (%s: %s); the next run tries again",
                        item.label,
                        settled.outcome,
                        settled.error,
                    )
            if changes:
                ledger.update(self.store.update(changes))
            if storage_failed:
                report.deferred += len(pending) - start - len(chunk)
                report.stops.append("submitting: storage unavailable")
                log.error("Intune watcher: storage refused the requests; the rest wait for the next run")
                break
        return ledger

    # ---- recording what was skipped -----------------------------------------------------

    def _record(self, row: Retirement, noted: dict[str, str], checkpoint: Checkpoint, now: datetime) -> None:
        skip = Skip(
            decide.label(_sighting_of(row)),
            row.outcome or "Skipped",
            row.error or "",
            decide.fingerprint("ledger", row.intune_id, row.key, row.outcome),
        )
        self._note(skip, noted, checkpoint, now)

    def _note(
        self, skip: Skip, noted: dict[str, str], checkpoint: Checkpoint, now: datetime, *, log_it: bool = True
    ) -> None:
        """Records a skip in the audit table and the log, once: a bad item read again by the
        next run (or another run) is not recorded again."""
        if skip.fingerprint and (skip.fingerprint in checkpoint.noted or skip.fingerprint in noted):
            return
        if log_it:
            log.warning("Intune watcher skipped %s: %s: %s", skip.item, skip.code, skip.message)
        self.rejections.record(decide.CALLER, skip.code, f"{skip.item}: {skip.message}")
        if skip.fingerprint:
            noted[skip.fingerprint] = now.isoformat()


def _follow(graph: GraphClient, link: str) -> Callable[[], requests.Response]:
    return lambda: graph.follow(link)


def _sighting_of(row: Retirement) -> Sighting:
    return Sighting(
        row.intune_id, row.action, "audit" if row.source == "audit" else "device", row.at, name=row.name
    )
