"""Fixtures and helpers shared by the Intune watcher's tests (test_watcher*.py,
test_graph_sim.py): the Graph simulator behind the real credential, and a watcher on the
app's services (in memory, or on Azurite) built as the app builds it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from localdev.defender_sim import DefenderSimulator
from localdev.graph_sim import GraphSimulator
from localdev.identity import IdentityEndpoint
from shared.domain.records import RequestRecord
from shared.runtime import Services
from shared.watcher import build
from shared.watcher.decide import GraphPolicy
from shared.watcher.run import Report, Watcher
from tests.conftest import Memory

GRAPH_RESOURCE = "https://graph.microsoft.com"
# Backoff in hundredths of a second: the same rules, without the waiting.
FAST = GraphPolicy(base_seconds=0.01, max_backoff_seconds=0.05, max_inline_wait=3.0)


def graph_tokens(identity: IdentityEndpoint) -> Callable[[str], bool]:
    """Accepts only tokens the identity endpoint issued for Graph (not Defender's)."""
    return lambda token: any(t == token and r == GRAPH_RESOURCE for t, r, _ in list(identity.issued))


def graph_for(identity: IdentityEndpoint) -> GraphSimulator:
    """The Graph simulator a test's `graph` fixture serves (close it, or use it in `with`)."""
    return GraphSimulator(accept_token=graph_tokens(identity))


def watch_env(graph: GraphSimulator, mode: str = "offboard", **overrides: str) -> dict[str, str]:
    return {
        "INTUNE_WATCH_ENABLED": "true",
        "INTUNE_WATCH_MODE": mode,
        "GRAPH_API_BASE_URL": graph.url,
        **overrides,
    }


def fast(watcher: Watcher) -> Watcher:
    watcher.policy = FAST
    return watcher


@dataclass
class Watch:
    """A watcher on in-memory services (the same contracts as Azurite's), with the real
    credential, the Defender simulator and the Graph simulator over loopback."""

    memory: Memory
    graph: GraphSimulator
    defender: DefenderSimulator
    watcher: Watcher

    @property
    def services(self) -> Services:
        return self.memory.services

    def run(self) -> Report:
        return self.watcher.run()

    def another(self) -> Watcher:
        """A second watcher on the same storage (another instance)."""
        return fast(build(self.services))

    def deliver(self, rounds: int = 3) -> int:
        return self.memory.deliver(rounds=rounds)

    def records(self) -> list[RequestRecord]:
        """Every request the intake wrote, oldest first."""
        now = datetime.now(UTC).timestamp()
        found = list(self.services.store.created_between(now + 60, now - 86_400))
        return sorted(found, key=lambda r: r.created_at)

    def offboarded(self) -> list[str]:
        """Machine ids Defender received an offboard call for, in order."""
        return [c.path.split("/")[3] for c in self.defender.calls if c.path.endswith("/offboard")]

    def ledger(self) -> dict[str, Any]:
        return {row.intune_id: row for row in self.watcher.store.ledger().values()}


def watch_maker(
    memory: Callable[..., Memory], graph: GraphSimulator, defender: DefenderSimulator
) -> Callable[..., Watch]:
    """What a test's `watch` fixture gives: `watch(mode, **settings)` makes a `Watch`."""

    def make(mode: str = "offboard", **overrides: str) -> Watch:
        made = memory(**watch_env(graph, mode, **overrides))
        return Watch(made, graph, defender, fast(build(made.services)))

    return make
