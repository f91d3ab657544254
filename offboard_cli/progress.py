"""How `submit --wait` shows requests moving: a live bar with counts by status on a
terminal (rich), one plain line per change anywhere else."""

from __future__ import annotations

import time
from collections import Counter
from typing import IO, TYPE_CHECKING, Any, Protocol, cast

from .output import plural

if TYPE_CHECKING:
    from .output import Out
    from .submit import Result

_FAILED = frozenset({"Failed", "Rejected", "Cancelled", "TimeOut", "Expired"})


class Display(Protocol):
    def begin(self, interval: float) -> None: ...
    def changed(self, result: Result, before: str) -> None: ...
    def tick(self) -> None: ...
    def end(self) -> None: ...


class Silent:
    """Shows nothing: for reading the current views of replayed rows, which is no change."""

    def begin(self, interval: float) -> None:
        pass

    def changed(self, result: Result, before: str) -> None:
        pass

    def tick(self) -> None:
        pass

    def end(self) -> None:
        pass


def display_for(out: Out, results: list[Result]) -> Display:
    followed = [r for r in results if r.accepted]
    return RichDisplay(out, followed) if out.fancy else PlainDisplay(out, followed)


def change_line(result: Result, before: str) -> str:
    why = f" ({result.error_code}: {result.error_message})" if result.error_code else ""
    note = f" ({result.note})" if result.note and not why else ""
    return (
        f"{time.strftime('%H:%M:%S')} line {result.row.number} {result.device}: "
        f"{before} -> {result.status}{why}{note}"
    )


def counts_text(results: list[Result]) -> str:
    counts = Counter(r.status for r in results)
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _waiting_for(results: list[Result]) -> str:
    """`3 requests`, or `1 of 3 requests` when some are final already (replayed rows)."""
    unfinished = sum(1 for r in results if not r.final)
    if unfinished == len(results):
        return plural(len(results), "request")
    return f"{unfinished} of {plural(len(results), 'request')}"


class PlainDisplay:
    def __init__(self, out: Out, results: list[Result]) -> None:
        self.out = out
        self.results = results

    def begin(self, interval: float) -> None:
        self.out.say(
            f"waiting for {_waiting_for(self.results)} (checking every {interval:g} s; "
            f"Ctrl-C stops waiting and cancels nothing): {counts_text(self.results)}"
        )

    def changed(self, result: Result, before: str) -> None:
        self.out.say(change_line(result, before))

    def tick(self) -> None:
        pass

    def end(self) -> None:
        pass


class RichDisplay:
    """The bar counts final requests; its text has the counts by status. Devices that end
    are printed above the bar as they end, so failures stay on screen."""

    def __init__(self, out: Out, results: list[Result]) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.results = results
        self.console = Console(file=cast(IO[str], out.human), highlight=False)
        self.progress = Progress(
            TextColumn("waiting"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[counts]}"),
            console=self.console,
            transient=False,
        )
        self.task: Any = None

    def begin(self, interval: float) -> None:
        self.console.print(
            f"Checking every {interval:g} s. Ctrl-C stops waiting and cancels nothing.", style="dim"
        )
        self.progress.start()
        self.task = self.progress.add_task("wait", total=len(self.results), counts=counts_text(self.results))
        self.tick()

    def changed(self, result: Result, before: str) -> None:
        if result.final:
            style = (
                "green"
                if result.status in ("Succeeded", "DryRun")
                else ("red" if result.status in _FAILED else "yellow")
            )
            from rich.text import Text

            self.progress.console.print(Text(change_line(result, before), style=style))

    def tick(self) -> None:
        done = sum(1 for r in self.results if r.final)
        self.progress.update(self.task, completed=done, counts=counts_text(self.results))

    def end(self) -> None:
        self.progress.stop()
