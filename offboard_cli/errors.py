"""What can go wrong, by what the operator has to do about it; each maps to an exit code."""

from __future__ import annotations

# Exit codes (docs/operator.md).
OK = 0
NOT_ALL_DONE = 1  # a row refused or not successful, a request not found, a release refused
USAGE = 2  # bad usage or a bad file: nothing was sent
UNREACHABLE = 3  # the service could not be reached, or it refused the key
INTERRUPTED = 130  # Ctrl-C, as shells report it


class CliError(Exception):
    exit_code = NOT_ALL_DONE


class UsageError(CliError):
    """Bad arguments, settings or input file; nothing was sent."""

    exit_code = USAGE


class InvalidRows(UsageError):
    """A device file with rows that cannot be sent; `rows` lists each (row, input, errorCode,
    errorMessage) for `--json`."""

    def __init__(self, message: str, rows: list[dict[str, object]]) -> None:
        super().__init__(message)
        self.rows = rows


class Unreachable(CliError):
    """No usable answer from the service after the retries (connection errors, timeouts,
    502/503/504/429), or an answer that shows the URL is not the app's."""

    exit_code = UNREACHABLE


class KeyRefused(CliError):
    """401: the service did not accept the key."""

    exit_code = UNREACHABLE


class ServiceError(CliError):
    """The service answered with an error (`{"error": {"code", "message"}}`)."""

    def __init__(self, status: int, code: str, message: str, route: str = "") -> None:
        said = f"{code}: {message}" if message else code
        super().__init__(f"{route} answered {status} {said}" if route else said)
        self.status = status
        self.code = code
        self.message = message
