"""Where the command's words go: scrubbed streams, tables, JSON, and CSV files written whole.

On a terminal, tables and the live progress are drawn by rich; anywhere else (a pipe, a
file, CI) the output is plain text with no escape codes, one line per event, whatever
FORCE_COLOR or TERM say, so logs and `grep` read it as it is.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
from collections.abc import Collection, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, cast

from .errors import UsageError
from .keys import scrub

# The narrowest a column that may wrap is drawn before a table goes to one block per row.
MIN_WRAP_WIDTH = 16


class Scrubbed(io.TextIOBase):
    """A text stream that never lets a key through (keys.scrub), for rich and print alike."""

    def __init__(self, inner: IO[str]) -> None:
        self.inner = inner

    def write(self, text: str) -> int:
        self.inner.write(scrub(text))
        return len(text)

    def flush(self) -> None:
        self.inner.flush()

    def isatty(self) -> bool:
        try:
            return self.inner.isatty()
        except (AttributeError, ValueError):
            return False

    def fileno(self) -> int:
        return self.inner.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.inner, "encoding", None) or "utf-8"


class Out:
    """The command's stdout and stderr. `json` mode keeps stdout for the JSON document, so
    human lines (progress, notes) go to stderr then."""

    def __init__(self, stdout: IO[str], stderr: IO[str], *, json_mode: bool = False) -> None:
        self.stdout = Scrubbed(stdout)
        self.stderr = Scrubbed(stderr)
        self.json_mode = json_mode

    @property
    def human(self) -> Scrubbed:
        return self.stderr if self.json_mode else self.stdout

    @property
    def fancy(self) -> bool:
        """Draw with rich: only when the human stream is a terminal."""
        return self.human.isatty() and os.environ.get("TERM") != "dumb"

    def say(self, text: str = "") -> None:
        print(text, file=self.human, flush=True)

    def note(self, text: str) -> None:
        print(text, file=self.stderr, flush=True)

    def error(self, text: str) -> None:
        print(f"offboard: {text}", file=self.stderr, flush=True)

    def document(self, value: Any) -> None:
        print(json.dumps(value, indent=2, ensure_ascii=False), file=self.stdout, flush=True)

    def table(
        self,
        headers: Sequence[str],
        rows: Iterable[Sequence[Any]],
        title: str | None = None,
        *,
        wrap: Collection[str] = (),
    ) -> None:
        """Rows under `headers`. Only the columns named in `wrap` (messages, comments) may
        wrap; every other cell (ids, statuses, times) is printed whole, never cut or broken.
        On a terminal too narrow for that, each row is printed as a block of `header value`
        lines instead (as psql's expanded display), so an id is never cut to fit."""
        cells = [[_text(c) for c in row] for row in rows]
        if self.fancy:
            self._rich_table(headers, cells, title, frozenset(wrap))
            return
        if title:
            self.say(title)
        widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
        lines = [headers, *cells]
        for line in lines:
            self.say("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())

    def _rich_table(
        self, headers: Sequence[str], cells: list[list[str]], title: str | None, wrap: frozenset[str]
    ) -> None:
        from rich.console import Console
        from rich.table import Table

        console = Console(file=cast(IO[str], self.human), highlight=False)
        longest = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
        needed = sum(
            min(width, MIN_WRAP_WIDTH) if header in wrap else width
            for header, width in zip(headers, longest, strict=True)
        )
        # A rich table draws a line before each column and after the last, and pads every
        # cell with a space on each side.
        if needed + 3 * len(headers) + 1 <= console.width:
            table = Table(title=title, title_justify="left", show_lines=False)
            for header, width in zip(headers, longest, strict=True):
                if header in wrap:
                    table.add_column(header, overflow="fold")
                else:
                    table.add_column(header, no_wrap=True, min_width=width)
            for row in cells:
                table.add_row(*row)
            console.print(table)
            return
        if title:
            console.print(title)
        label_width = max(len(h) for h in headers)
        for number, row in enumerate(cells):
            block = Table.grid(padding=(0, 2))
            block.add_column(no_wrap=True, min_width=label_width, style="dim")
            block.add_column(overflow="fold")
            for header, value in zip(headers, row, strict=True):
                if value:
                    block.add_row(header, value)
            if number:
                console.print()
            console.print(block)


def plural(count: int, word: str, many: str | None = None) -> str:
    """`1 row`, `2 rows`; `many` for words that do not take an s (`batch`, `batches`)."""
    return f"{count} {word if count == 1 else (many or word + 's')}"


def _text(value: Any) -> str:
    if value is None:
        return ""
    # One line per row: a multi-line comment or message would break the columns.
    return str(value).replace("\r", " ").replace("\n", " ").replace("\t", " ")


def writable(path: str, *, not_the_same_as: str | None = None) -> Path:
    """Checks before anything is sent that `path` can be written (and is not the input)."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise UsageError(f"cannot write {path}: the folder {folder} does not exist")
    if target.is_dir():
        raise UsageError(f"cannot write {path}: it is a folder")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"cannot write {path}: the folder {folder} is not writable")
    if not_the_same_as and target.exists() and Path(not_the_same_as).exists():
        with contextlib.suppress(OSError):
            if os.path.samefile(target, not_the_same_as):
                raise UsageError(f"--out {path} is the input file; write the results elsewhere")
    return target


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Writes the whole file beside `path` and renames it into place: a crash or Ctrl-C
    leaves the old file or the new one, never half of one."""
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as sink:
            writer = csv.writer(sink)
            writer.writerow(header)
            for row in rows:
                writer.writerow([csv_cell(value) for value in row])
            sink.flush()
            os.fsync(sink.fileno())
        os.chmod(temporary, 0o666 & ~_umask())  # as an ordinary new file; mkstemp makes 0600
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def csv_cell(value: Any) -> str:
    """A value as a spreadsheet may safely open it: scrubbed of keys, and text that a
    spreadsheet would run as a formula (=, +, -, @ first) quoted with a leading '."""
    text = scrub("" if value is None else str(value))
    if text[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + text
    return text


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def no_broken_pipe() -> Iterator[None]:
    """`scripts/offboard list | head` stops reading early: that is not an error."""
    try:
        yield
    except BrokenPipeError:
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
