"""The Intune watcher: Intune's retiring, wiped and deleted devices, read from Microsoft
Graph on a timer, become offboard requests through the same intake as every other caller.

- `decide.py`: the pure rules (what is a retirement, which device, the key, the comment,
  the checkpoint, the inventory's changes, what a Graph answer means);
- `store.py`: the checkpoint, the inventory and the ledger in the state table;
- `run.py`: one run, start to finish, and its one log line.

`build(services)` wires a watcher from the app's services, as the timer function uses it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..adapters.graph import GraphClient
    from ..runtime import Services
    from .run import Watcher


def build(services: Services, graph: GraphClient | None = None) -> Watcher:
    """The watcher for these services: a Graph client with the app's managed identity
    (GRAPH_API_BASE_URL, GRAPH_API_SCOPE, MANAGED_IDENTITY_CLIENT_ID) unless one is given,
    its rows in the state table, and the intake every caller goes through."""
    from ..adapters.graph import GraphClient
    from ..adapters.tokens import TokenProvider
    from .decide import Mode
    from .run import Watcher
    from .store import WatchStore

    s = services.settings
    mode: Mode = "offboard" if s.intune_watch_mode == "offboard" else "report"
    if graph is None:
        graph = GraphClient(
            s.graph_base_url,
            TokenProvider(s.graph_scope, s.managed_identity_client_id),
            connect_timeout=s.connect_timeout_seconds,
            read_timeout=s.read_timeout_seconds,
        )
    return Watcher(
        graph=graph,
        store=WatchStore(services.state, mode),
        # The status route's path: the watcher has no caller to give an absolute URL to.
        submissions=services.submissions(lambda request_id: f"/api/offboard/{request_id}"),
        rejections=services.rejections,
        mode=mode,
        default_comment=s.default_comment,
    )
