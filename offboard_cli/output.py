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
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, cast

from .errors import UsageError
from .keys import scrub


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

    def table(self, headers: Sequence[str], rows: Iterable[Sequence[Any]], title: str | None = None) -> None:
        cells = [[_text(c) for c in row] for row in rows]
        if self.fancy:
            from rich.console import Console
            from rich.table import Table

            table = Table(*headers, title=title, title_justify="left", show_lines=False)
            for row in cells:
                table.add_row(*row)
            Console(file=cast(IO[str], self.human), highlight=False).print(table)
            return
        if title:
            self.say(title)
        widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
        lines = [headers, *cells]
        for line in lines:
            self.say("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())


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
