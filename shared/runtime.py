"""The process's long-lived objects, built on first use, once.

Nothing here runs at import: a cold start pays only for what the first invocation needs,
and tests build their own objects from `Settings` instead of touching these.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

from .defender import DefenderClient
from .outcome import RetryPolicy
from .queues import WorkQueue
from .settings import Settings, get_settings
from .token import TokenProvider
from .worker import Worker

if TYPE_CHECKING:
    from .pacing import Pacer
    from .rate_limit import RateLimiter


def build_work_queue(settings: Settings) -> WorkQueue:
    return WorkQueue.from_connection_string(settings.storage_connection, settings.queue_name)


def build_worker(settings: Settings, queue: WorkQueue, limiter: RateLimiter | None = None) -> Worker:
    tokens = TokenProvider(settings.defender_scope, settings.managed_identity_client_id)
    defender = DefenderClient(
        settings.defender_base_url,
        tokens,
        connect_timeout=settings.connect_timeout_seconds,
        read_timeout=settings.read_timeout_seconds,
    )
    policy = RetryPolicy(
        max_attempts=settings.max_attempts,
        base_seconds=settings.retry_base_seconds,
        max_seconds=settings.retry_max_seconds,
        config_seconds=settings.config_retry_seconds,
    )
    return Worker(defender=defender, queue=queue, policy=policy, pacer=build_pacer(settings, limiter))


def build_pacer(settings: Settings, limiter: RateLimiter | None = None) -> Pacer:
    from .pacing import Pacer

    return Pacer(limiter or build_rate_limiter(settings), settings.rate_limit_max_inline_wait_seconds)


def build_rate_limiter(settings: Settings) -> RateLimiter:
    # Imported here: azure-data-tables is paid for by the first message, not by every cold
    # start of the HTTP intake.
    from azure.data.tables import TableClient

    from .rate_limit import RateLimiter

    # Few, quick retries: with the table down the message is better off redelivered by the
    # host (visibilityTimeout) than holding a worker thread for long backoffs.
    table = TableClient.from_connection_string(
        settings.storage_connection, settings.rate_limit_table, retry_total=2, retry_backoff_factor=0.2
    )
    return RateLimiter(table, settings.rate_limits, margin=settings.rate_limit_margin_seconds)


@lru_cache(maxsize=1)
def work_queue() -> WorkQueue:
    return build_work_queue(get_settings())


@lru_cache(maxsize=1)
def rate_limiter() -> RateLimiter:
    """The process's one limiter: every Defender call of this instance reserves through it
    (`reserve("offboard" | "machine-read" | "action-read")`), so its threads share writes."""
    return build_rate_limiter(get_settings())


@lru_cache(maxsize=1)
def worker() -> Worker:
    return build_worker(get_settings(), work_queue(), rate_limiter())
