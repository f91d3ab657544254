"""The process's long-lived objects, built on first use, once.

Nothing here runs at import: a cold start pays only for what the first invocation needs,
and tests build their own objects from `Settings` instead of touching these.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from azure.data.tables import TableClient

from .adapters.audit import AuditTrail
from .adapters.breaker import BlastRadiusBreaker
from .adapters.defender import DefenderClient
from .adapters.queues import WorkQueue
from .adapters.rate_limit import RateLimiter
from .adapters.request_store import RequestStore
from .adapters.storage import table_client
from .adapters.tokens import TokenProvider
from .domain.guardrails import Protection
from .domain.outcome import RetryPolicy
from .intake.cancel import Cancellations
from .intake.holds import Holds
from .intake.submission import Submissions
from .settings import Settings, get_settings
from .worker.pacing import Pacer
from .worker.worker import FollowUpPolicy, Guard, Worker


@dataclass(frozen=True)
class Services:
    """Everything the handlers use, wired from one Settings."""

    settings: Settings
    queue: WorkQueue
    state_table: TableClient
    store: RequestStore
    audit: AuditTrail
    defender: DefenderClient
    limiter: RateLimiter

    @classmethod
    def build(cls, settings: Settings) -> Services:
        def table(name: str) -> TableClient:
            return table_client(settings.storage, name)

        tokens = TokenProvider(settings.defender_scope, settings.managed_identity_client_id)
        state_table = table(settings.state_table_name)
        return cls(
            settings=settings,
            queue=WorkQueue.from_storage(settings.storage, settings.queue_name),
            state_table=state_table,
            store=RequestStore(state_table),
            audit=AuditTrail(table(settings.audit_table_name)),
            defender=DefenderClient(
                settings.defender_base_url,
                tokens,
                connect_timeout=settings.connect_timeout_seconds,
                read_timeout=settings.read_timeout_seconds,
            ),
            # One limiter per process: its threads share one table write per reservation
            # burst. Few, quick retries: with the table down the message is better off
            # redelivered by the host (visibilityTimeout) than holding a worker thread.
            limiter=RateLimiter(
                table_client(
                    settings.storage, settings.rate_limit_table, retry_total=2, retry_backoff_factor=0.2
                ),
                settings.rate_limits,
                margin=settings.rate_limit_margin_seconds,
            ),
        )

    def worker(self) -> Worker:
        s = self.settings
        return Worker(
            defender=self.defender,
            queue=self.queue,
            store=self.store,
            audit=self.audit,
            policy=RetryPolicy(
                max_attempts=s.max_attempts,
                base_seconds=s.retry_base_seconds,
                max_seconds=s.retry_max_seconds,
                config_seconds=s.config_retry_seconds,
            ),
            holds=self.holds(),
            pacer=Pacer(self.limiter, s.rate_limit_max_inline_wait_seconds),
            guard=Guard(
                precheck=s.precheck,
                proceed_without_permission=s.precheck_without_permission == "proceed",
                protection=Protection.of(
                    s.protected_tags, s.protected_group_ids, s.deny_list, s.platform_rules
                ),
                tag=s.tag_after_offboard,
            ),
            follow_up=FollowUpPolicy(
                initial_seconds=s.check_initial_seconds,
                max_seconds=s.check_max_seconds,
                horizon_seconds=s.check_horizon_seconds,
            ),
        )

    def submissions(self) -> Submissions:
        s = self.settings
        return Submissions(
            store=self.store,
            audit=self.audit,
            queue=self.queue,
            breaker=BlastRadiusBreaker(self.state_table, s.breaker_limit, s.breaker_window_seconds),
            hold_expiry_seconds=int(s.hold_expiry_seconds),
            dry_run=s.dry_run,
        )

    def holds(self) -> Holds:
        return Holds(store=self.store, audit=self.audit, queue=self.queue)

    def cancellations(self) -> Cancellations:
        return Cancellations(store=self.store, audit=self.audit, defender=self.defender)


@lru_cache(maxsize=1)
def services() -> Services:
    return Services.build(get_settings())


@lru_cache(maxsize=1)
def worker() -> Worker:
    return services().worker()
