"""Function and master keys: read from the environment or a prompt, held in memory only.

A key is never taken from the command line (shell history, `ps`), never written to a file,
never printed. `Secret` hides its value from repr() and str(), so a key that ends up in an
exception or a debug print shows as `***`; and every stream and file this tool writes goes
through `scrub()`, which replaces any key it has read, as a second line of defence.
"""

from __future__ import annotations

import getpass
import os
import re
from collections.abc import Mapping

from .errors import UsageError

# What a Functions key can be made of; also what requests can put in a header without
# raising an error that quotes the header's value.
_KEY = re.compile(r"[\x21-\x7e]{1,1024}")
_MIN_SCRUB = 4  # shorter "keys" would scrub ordinary words out of the output
_known: set[str] = set()


class Secret:
    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value
        if len(value) >= _MIN_SCRUB:
            _known.add(value)

    def reveal(self) -> str:
        """The key itself: only for the `x-functions-key` (or `Authorization`) header."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


def scrub(text: str) -> str:
    """`text` with every key this process has read replaced by `***`."""
    for value in sorted(_known, key=len, reverse=True):
        if value in text:
            text = text.replace(value, "***")
    return text


def read_key(name: str, what: str, environ: Mapping[str, str], *, prompt: bool) -> Secret:
    """The key in environment variable `name`, or typed at a prompt (never echoed) when
    `prompt` is set or the variable is empty. `what` names it in messages ("function key")."""
    value = "" if prompt else environ.get(name, "").strip()
    if not value:
        if not _can_prompt():
            raise UsageError(f"no {what}: set {name} (there is no terminal to prompt on)")
        try:
            value = getpass.getpass(f"{what[0].upper()}{what[1:]} (not echoed): ").strip()
        except EOFError:
            value = ""
        if not value:
            raise UsageError(f"no {what} given")
    if not _KEY.fullmatch(value):
        # Never quote it: a mistyped key is still mostly the key.
        raise UsageError(f"the {what} has spaces or control characters; a key has neither")
    return Secret(value)


def _can_prompt() -> bool:
    # getpass reads /dev/tty; without one it would fall back to stdin and echo the key, and
    # stdin may be the device list (`submit -`).
    if os.name == "nt":
        import sys

        return sys.stdin.isatty()
    try:
        with open("/dev/tty", "rb"):
            return True
    except OSError:
        return False
