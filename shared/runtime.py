"""The process's long-lived objects, built on first use, once.

Nothing here runs at import: a cold start pays only for what the first invocation needs,
and tests build their own objects from `Settings` (or from in-memory stand-ins) instead of
touching these.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import TYPE_CHECKING

from .adapters.audit import Rejections
from .adapters.breaker import BlastRadiusBreaker
from .adapters.defender import DefenderClient
from .adapters.entities import Entities
from .adapters.guards import Guards
from .adapters.queues import WorkQueue
from .adapters.rate_limit import RateLimiter
from .adapters.request_store import RequestStore
from .adapters.tokens import CustomerTenants, TokenProvider
from .adapters.webhook import Webhook
from .domain.guardrails import Protection
from .domain.outcome import RetryPolicy
from .intake.cancel import Cancellations
from .intake.holds import Holds
from .intake.listing import Listing
from .intake.submission import Submissions
from .settings import Settings, get_settings
from .worker.calls import Calls
from .worker.follow_up import FollowUp
from .worker.notify import Notifier
from .worker.offboard import FollowUpPolicy, Guardrails, OffboardFlow
from .worker.pacing import Pacer
from .worker.recorder import Recorder
from .worker.tagging import Tagger, Tagging
from .worker.worker import Worker

if TYPE_CHECKING:
    from .watcher.run import Watcher

# The Azure SDKs log every HTTP exchange (headers included) at INFO. Under the Functions
# Python worker every record at INFO and above becomes a user log, paid per GB in
# Application Insights, around the lines that matter: so they log at OFFBOARD_SDK_LOG_LEVEL.
SDK_LOGGERS = ("azure", "msal", "urllib3")


@dataclass
class Services:
    """Everything the handlers use, wired from one Settings and the storage behind it."""

    settings: Settings
    state: Entities
    audit: Entities
    budgets: Entities
    queue: WorkQueue
    defender: DefenderClient
    clock: Callable[[], float] | None = None
    store: RequestStore = field(init=False)
    guards: Guards = field(init=False)
    breaker: BlastRadiusBreaker = field(init=False)
    limiter: RateLimiter = field(init=False)
    rejections: Rejections = field(init=False)

    def __post_init__(self) -> None:
        s = self.settings
        self.store = RequestStore(self.state, self.audit)
        self.rejections = Rejections(self.audit)
        self.guards = Guards(self.state, s.accept_lease_seconds)
        # One breaker and one limiter per process: each keeps its rows in memory between calls.
        self.breaker = BlastRadiusBreaker(self.state, s.breaker_limit, s.breaker_window_seconds)
        self.limiter = RateLimiter(self.budgets, s.rate_limits, margin=s.rate_limit_margin_seconds)

    @classmethod
    def build(cls, settings: Settings) -> Services:
        from .adapters.storage import entities

        quiet_sdk_logs(settings.sdk_log_level)
        storage = settings.storage
        customers = (
            CustomerTenants(settings.multitenant_app_client_id, settings.token_exchange_audience)
            if settings.multitenant_app_client_id
            else None
        )
        tokens = TokenProvider(settings.defender_scope, settings.managed_identity_client_id, customers)
        return cls(
            settings=settings,
            state=entities(storage, settings.state_table_name),
            audit=entities(storage, settings.audit_table_name),
            # Few, quick retries: with the table down the message is better off redelivered
            # by the host (visibilityTimeout) than holding a worker thread.
            budgets=entities(storage, settings.rate_limit_table, retry_total=2, retry_backoff_factor=0.2),
            queue=WorkQueue.from_storage(storage, settings.queue_name),
            defender=DefenderClient(
                settings.defender_base_url,
                tokens,
                connect_timeout=settings.connect_timeout_seconds,
                read_timeout=settings.read_timeout_seconds,
            ),
        )

    def submissions(self, status_url: Callable[[str], str]) -> Submissions:
        s = self.settings
        return Submissions(
            store=self.store,
            guards=self.guards,
            queue=self.queue,
            breaker=self.breaker,
            hold_expiry_seconds=int(s.hold_expiry_seconds),
            status_url=status_url,
            dry_run=s.dry_run,
            approval=s.approval,
            allowed_tenants=frozenset(t.id for t in s.tenants),
            notify=s.hold_notify_url is not None,
        )

    def holds(self) -> Holds:
        return Holds(self.store, self.queue, self.state)

    def cancellations(self) -> Cancellations:
        return Cancellations(self.store, self.defender)

    def listing(self) -> Listing:
        return Listing(self.store, self.rejections)

    def worker(self, status_url: Callable[[str], str | None] = lambda _: None) -> Worker:
        s = self.settings
        clock: Callable[[], datetime] = lambda: datetime.now(UTC)  # noqa: E731
        pacer = Pacer(self.limiter, s.rate_limit_max_inline_wait_seconds)
        calls = Calls(
            self.defender,
            pacer,
            RetryPolicy(
                max_attempts=s.max_attempts,
                base_seconds=s.retry_base_seconds,
                max_seconds=s.retry_max_seconds,
                config_seconds=s.config_retry_seconds,
            ),
            random.Random(),
            clock,
        )
        follow_up = FollowUpPolicy(s.check_initial_seconds, s.check_max_seconds, s.check_horizon_seconds)

        def protection(tags: tuple[str, ...] | None, groups: tuple[int, ...] | None) -> Protection:
            chosen_tags = s.protected_tags if tags is None else tags
            chosen_groups = s.protected_group_ids if groups is None else groups
            return Protection.of(chosen_tags, chosen_groups, s.deny_list, s.platform_rules)

        guardrails = Guardrails(
            precheck=s.precheck,
            proceed_without_permission=s.precheck_without_permission == "proceed",
            protection=protection(None, None),
            by_tenant={t.id: protection(t.protected_tags, t.protected_group_ids) for t in s.tenants},
        )
        recorder = Recorder(self.store, self.queue, clock)
        tagger = Tagger(s.tag_after_offboard, self.queue) if s.tag_after_offboard else None
        offboards = OffboardFlow(
            calls, recorder, self.store, self.queue, self.guards, pacer, guardrails, follow_up, tagger, clock
        )
        return Worker(
            offboards=offboards,
            checks=FollowUp(calls, self.store, self.queue, pacer, follow_up, clock),
            holds=self.holds(),
            tagging=Tagging(calls, self.store, self.queue, pacer),
            queue=self.queue,
            store=self.store,
            notifier=Notifier(Webhook(s.hold_notify_url), self.store, self.queue, status_url)
            if s.hold_notify_url
            else None,
        )


def quiet_sdk_logs(level: str) -> None:
    number = logging.getLevelName(level)
    for name in SDK_LOGGERS:
        # urllib3 logs every request line, query included, at DEBUG: the hold-notify webhook's
        # URL carries its signature there, so urllib3 never logs below INFO.
        logging.getLogger(name).setLevel(max(number, logging.INFO) if name == "urllib3" else number)


# The first invocations of a cold instance arrive together (a batch of queue messages, a
# burst of HTTP requests): without the lock each would build its own services, and with them
# its own limiter, breaker cache and credential, racing each other for the same rows.
_building = threading.Lock()


def services() -> Services:
    with _building:
        return _services()


def worker() -> Worker:
    with _building:
        return _worker()


@lru_cache(maxsize=1)
def _services() -> Services:
    return Services.build(get_settings())


@lru_cache(maxsize=1)
def _worker() -> Worker:
    from .http.responses import PublicUrls

    urls = PublicUrls(get_settings().public_base_url)
    return _services().worker(lambda request_id: urls.status("", request_id) if urls.base else None)


def watcher() -> Watcher:
    """The Intune watcher of this process (the timer function intune_retirements)."""
    with _building:
        return _watcher()


@lru_cache(maxsize=1)
def _watcher() -> Watcher:
    from .watcher import build

    return build(_services())
