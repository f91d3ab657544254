"""The command line: arguments, help, and the one place errors become exit codes."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, NoReturn, cast

from . import __version__, commands, submit
from .client import DEFAULT_RETRIES, Client
from .errors import INTERRUPTED, NOT_ALL_DONE, USAGE, CliError, InvalidRows, ServiceError, UsageError
from .inputs import check_comment, read_devices
from .keys import scrub
from .output import Out, no_broken_pipe, plural, writable
from .target import Where, where

PROG = "scripts/offboard"
MAX_INTERVAL = 5.0

DESCRIPTION = """\
The operator command for the Defender offboarding service: submit a file of devices,
follow the requests to their end, list and inspect them, release held ones, read the audit.

Where: --url URL or OFFBOARD_URL (the app's base URL, https://<app>.azurewebsites.net), or
--local for the stack `scripts/run-local --serve` starts (http://127.0.0.1:7071, its fixed
local keys; --port for another port). Keys: OFFBOARD_KEY (a function key) and, for
`release` only, OFFBOARD_ADMIN_KEY (the master key); when unset, they are asked for at a
prompt and never echoed. With App Service authentication on, OFFBOARD_TOKEN carries an
Entra ID access token for the app as well (az account get-access-token --resource
api://<app id> --query accessToken -o tsv). Keys and tokens are never taken from the
command line, written to a file or printed.

exit codes: 0 done (every row accepted; with --wait every row Succeeded or DryRun),
            1 some row refused or not successful (or an id not found),
            2 bad usage or a bad file (nothing was sent),
            3 the service could not be reached, or it refused the key (401),
            130 interrupted (Ctrl-C; nothing is cancelled)
"""

EXAMPLES = """\
examples:
  export OFFBOARD_URL=https://contoso-offboard.azurewebsites.net
  read -rs OFFBOARD_KEY && export OFFBOARD_KEY       # a function key, typed unseen
  scripts/offboard submit devices.csv --comment "IR-2001: lost laptops" --wait --out results.csv
  scripts/offboard list --status Failed --since 24h
  scripts/offboard held && scripts/offboard release --all
  scripts/offboard --local submit - --dry-run <<< 1e5bc9d7e413ddd7902c2932e418702b84d0cc07

run `scripts/offboard COMMAND --help` for each command's options.
"""

SUBMIT_HELP = """\
FILE is a CSV file with a header, a plain list, or - for standard input.

CSV: columns machineId, aadDeviceId, deviceName (the first non-empty one of a row names its
device), optional comment (the row's own, over --comment) and tenantId; other columns are
ignored. Separated by commas, semicolons or tabs. A plain list: one identifier per line,
recognised as the service does: 40 hexadecimal characters = machineId, a GUID = aadDeviceId,
a DNS name = deviceName (but 32+ hex characters that are not 40 are refused, not looked up);
blank lines and # comments are skipped. Row numbers are line numbers.

Every row is checked first, and a device named twice (the same machineId, aadDeviceId or
deviceName, in any case) is a bad row too; a file with bad rows is refused whole (exit 2),
each bad row listed with its line and why, unless --skip-invalid. Rows go in batches of up
to 50, each with an idempotency key from the file's contents and its line
(cli:<sha256>:<line>): running the same file again (after Ctrl-C, a crash, a network error)
creates no new request for rows already accepted; they are `replayed`, and show their
request's current status. Editing the file makes new keys.

--out writes one row per input row, in input order: row,input,requestId,machineId,status,
errorCode,errorMessage. status is the request's (with --wait its final one); for rows not
accepted: Invalid (refused by this command), Refused (refused by the service, no request
made), NotSent (the run stopped first), Error (the service refused the whole batch).

examples:
  scripts/offboard submit devices.csv --dry-run                 # everything but the offboard
  scripts/offboard submit devices.csv --comment "IR-2001" --wait --out results.csv
  scripts/offboard submit hosts.txt --skip-invalid
  grep -v decommissioned inventory.txt | scripts/offboard submit - --wait
"""

STATUS_HELP = """\
Each ID is a request id, or a batch id (every request of that batch).

examples:
  scripts/offboard status 6fa240ec-1a2b-8c3d-9e4f-5a6b7c8d9001
  scripts/offboard status --json 6fa240ec-1a2b-8c3d-9e4f-5a6b7c8d9000 | jq '.requests[].status'
"""

LIST_HELP = """\
Requests newest first (every page), by default those of the last 7 days.
--since is ISO 8601 with a zone (2026-12-01T09:00:00Z) or a duration back from now (30m, 12h, 7d).

examples:
  scripts/offboard list --status Failed --since 24h
  scripts/offboard list --machine 1e5bc9d7e413ddd7902c2932e418702b84d0cc07
  scripts/offboard list --batch 6fa240ec-1a2b-8c3d-9e4f-5a6b7c8d9000 --json
"""

HELD_HELP = """\
Requests the blast-radius breaker (or OFFBOARD_APPROVAL=always) is holding: who asked
(the request's caller), its comment, and why it is held.

examples:
  scripts/offboard held
  scripts/offboard held --json | jq -r '.requests[].requestId'
"""

RELEASE_HELP = """\
Releasing queues a held request as if just accepted, past the breaker: an operator's
decision, so it needs the app's master key (OFFBOARD_ADMIN_KEY, or typed at the prompt).

examples:
  scripts/offboard release 6fa240ec-1a2b-8c3d-9e4f-5a6b7c8d9001 6fa240ec-1a2b-8c3d-9e4f-5a6b7c8d9002
  scripts/offboard release --all
"""

AUDIT_HELP = """\
One request's story (--request), or every event since a time (--since: ISO 8601 with a zone,
or a duration such as 24h), oldest first. --out writes them as CSV (at,requestId,event,
outcome,detail,caller,machineId,tenantId) instead of a table.

examples:
  scripts/offboard audit --request 6fa240ec-1a2b-8c3d-9e4f-5a6b7c8d9001
  scripts/offboard audit --since 2026-12-01T00:00:00Z --out audit.csv
"""


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line naming what is wrong (and where the help is), not a usage block."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    target = common.add_argument_group("where")
    target.add_argument(
        "--url", metavar="URL", default=argparse.SUPPRESS, help="the app's base URL (else OFFBOARD_URL)"
    )
    target.add_argument(
        "--local",
        action="store_true",
        default=argparse.SUPPRESS,
        help="the local stack of `scripts/run-local --serve` (127.0.0.1:7071, its local keys)",
    )
    target.add_argument(
        "--port", type=int, metavar="N", default=argparse.SUPPRESS, help="with --local: its port"
    )
    target.add_argument(
        "--key",
        action="store_true",
        default=argparse.SUPPRESS,
        help="type the key at a prompt (not echoed) even if OFFBOARD_KEY (for release: "
        "OFFBOARD_ADMIN_KEY) is set; takes no value",
    )
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output on stdout"
    )
    common.add_argument(
        "--retries",
        type=int,
        metavar="N",
        default=argparse.SUPPRESS,
        help="retries of a transient failure (connection, 429, 502, 503, 504), with backoff "
        f"(default {DEFAULT_RETRIES})",
    )

    top = _Parser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    top.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = top.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, summary: str, epilog: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=summary,
            description=summary,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            parents=[common],
        )

    p = command("submit", "send a file of devices to offboard (safe to run again)", SUBMIT_HELP)
    p.add_argument("file", metavar="FILE", help="CSV or plain list of devices, or - for stdin")
    p.add_argument("--comment", metavar="TEXT", help="recorded by Defender (a row's own comment wins)")
    p.add_argument("--dry-run", action="store_true", help="everything but the offboard call (status DryRun)")
    p.add_argument("--wait", action="store_true", help="follow every request to its final state")
    p.add_argument("--out", metavar="RESULTS.csv", help="write one result row per input row")
    p.add_argument("--skip-invalid", action="store_true", help="send the valid rows of a file with bad ones")
    p.add_argument(
        "--interval",
        type=float,
        metavar="S",
        default=2.0,
        help=f"with --wait: seconds between checks (0.5-{MAX_INTERVAL:g}, default 2)",
    )

    p = command("status", "show requests (or batches) by id", STATUS_HELP)
    p.add_argument("ids", nargs="+", metavar="ID", help="request ids or batch ids")

    p = command("list", "list requests (a table; every page)", LIST_HELP)
    p.add_argument("--status", metavar="S", help="only this status (Queued, Held, Succeeded, Failed, ...)")
    p.add_argument("--since", metavar="TIME", help="created at or after (ISO 8601 with a zone, or 12h, 7d)")
    p.add_argument("--batch", metavar="ID", help="only this batch")
    p.add_argument("--machine", metavar="ID", help="only this machine id")

    command("held", "show held requests and why they are held", HELD_HELP)

    p = command("release", "release held requests (the master key)", RELEASE_HELP)
    p.add_argument("ids", nargs="*", metavar="ID", help="held request ids")
    p.add_argument("--all", action="store_true", help="every held request")

    p = command("audit", "read the audit trail", AUDIT_HELP)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--request", metavar="ID", help="one request's events")
    which.add_argument("--since", metavar="TIME", help="every event since (ISO 8601 with a zone, or 24h)")
    p.add_argument("--out", metavar="FILE.csv", help="write the events as CSV")
    return top


def main(
    argv: Sequence[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    stdin: IO[bytes] | None = None,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    env = os.environ if environ is None else environ
    out = Out(stdout or sys.stdout, stderr or sys.stderr, json_mode="--json" in args_list)
    try:
        with no_broken_pipe():
            return _run(args_list, env, stdin, out, sleep)
    except CliError as exc:
        out.error(str(exc))
        if out.json_mode:
            error: dict[str, Any]
            if isinstance(exc, ServiceError):
                error = {"code": exc.code, "message": exc.message, "status": exc.status}
            else:
                error = {"code": type(exc).__name__, "message": str(exc)}
            if isinstance(exc, InvalidRows):
                error["rows"] = exc.rows
            out.document({"error": error})
        return exc.exit_code
    except KeyboardInterrupt:
        out.error("interrupted; nothing was cancelled")
        return INTERRUPTED
    except Exception as exc:  # a bug: say so, with the trace, never with a key (scrubbed)
        out.error(f"unexpected error: {type(exc).__name__}: {scrub(str(exc))}")
        print(scrub(traceback.format_exc()), file=out.stderr)
        return NOT_ALL_DONE


def _run(
    argv: list[str], env: Mapping[str, str], stdin: IO[bytes] | None, out: Out, sleep: Callable[[float], None]
) -> int:
    for arg in argv:
        option_name = arg.split("=", 1)[0]
        if "=" in arg and len(option_name) >= 3 and "--key".startswith(option_name):
            # Refused before argparse, which would quote the value in its error.
            raise UsageError(
                "--key takes no value: keys come from OFFBOARD_KEY or a prompt, never the command line"
            )
    try:
        with (
            contextlib.redirect_stdout(cast(IO[str], out.stdout)),
            contextlib.redirect_stderr(cast(IO[str], out.stderr)),
        ):
            args = parser().parse_args(argv)
    except SystemExit as exc:  # argparse has printed usage and the error, or the help
        return int(exc.code) if isinstance(exc.code, int) else USAGE

    def option(name: str, default: Any = None) -> Any:
        return getattr(args, name, default)  # target options are absent unless given

    retries = option("retries", DEFAULT_RETRIES)
    if not 0 <= retries <= 10:
        raise UsageError(f"--retries must be 0-10, not {retries}")
    place = where(option("url"), option("local", False), option("port"), option("key", False), env)

    def client(admin: bool = False) -> Client:
        key = place.master_key(env) if admin else place.function_key(env)
        return Client(
            place.base_url,
            key,
            retries=retries,
            sleep=sleep,
            what_key="master key" if admin else "function key",
            token=place.token(env),
        )

    if args.command == "submit":
        return _submit(args, argv, place, client, stdin, out, sleep, retries)
    if args.command == "status":
        request_ids = [commands.request_id_of(i, batch_ok=True) for i in args.ids]
        return commands.status(client(), request_ids, out)
    if args.command == "list":
        params = {}
        if args.status:
            params["status"] = commands.status_filter_of(args.status)
        if args.since:
            params["since"] = commands.since_of(args.since)
        if args.batch:
            params["batchId"] = commands.batch_id_of(args.batch)
        if args.machine:
            params["machineId"] = commands.machine_id_of(args.machine)
        return commands.list_requests(client(), params, out)
    if args.command == "held":
        return commands.held(client(), out)
    if args.command == "release":
        if not args.ids and not args.all:
            raise UsageError(
                "release needs the ids of the held requests to release (`scripts/offboard held` "
                "lists them), or --all for every held request"
            )
        if args.ids and args.all:
            raise UsageError("release takes request ids or --all, not both")
        request_ids = [commands.request_id_of(i) for i in args.ids]
        return commands.release(client(admin=True), request_ids, args.all, out)
    if args.command == "audit":
        request_id = commands.request_id_of(args.request) if args.request else None
        since = commands.since_of(args.since) if args.since else None
        csv_path = writable(args.out) if args.out else None
        return commands.audit(client(), request_id, since, out, csv_path)
    raise UsageError(f"unknown command {args.command}")  # argparse refuses it first


def _submit(
    args: argparse.Namespace,
    argv: list[str],
    place: Where,
    client: Callable[..., Client],
    stdin: IO[bytes] | None,
    out: Out,
    sleep: Callable[[float], None],
    retries: int,
) -> int:
    if not 0.5 <= args.interval <= MAX_INTERVAL:
        raise UsageError(f"--interval must be 0.5-{MAX_INTERVAL:g} seconds, not {args.interval:g}")
    if args.comment is not None:
        why = check_comment(args.comment, "--comment")
        if why:
            raise UsageError(why)
    if args.file == "-":
        name, data = "<stdin>", (stdin or sys.stdin.buffer).read()
    else:
        name = args.file
        try:
            data = Path(args.file).read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read {args.file}: {exc.strerror or exc}") from None
    results_path = (
        writable(args.out, not_the_same_as=None if args.file == "-" else args.file) if args.out else None
    )
    devices = read_devices(name, data)
    for note in devices.notes:
        out.note(note)
    if devices.invalid and not args.skip_invalid:
        for row in devices.invalid:
            shown = f" (input {_quoted(row.text)})" if row.text else ""
            out.error(f"{name} line {row.number}: {row.code}: {row.message}{shown}")
        raise InvalidRows(
            f"{name}: {len(devices.invalid)} of {plural(len(devices.rows), 'row')} cannot be sent; "
            "nothing was sent (fix them, or --skip-invalid to send the others)",
            [
                {"row": r.number, "input": r.text, "errorCode": r.code, "errorMessage": r.message}
                for r in devices.invalid
            ],
        )
    options = submit.Options(
        comment=(args.comment or "").strip() or None,
        dry_run=args.dry_run,
        wait=args.wait,
        out=results_path,
        skip_invalid=args.skip_invalid,
        interval=args.interval,
        retries=retries,
        argv=argv,
    )
    service = client()
    try:
        return submit.run(service, devices, options, out, sleep)
    finally:
        service.close()


def _quoted(text: str, limit: int = 80) -> str:
    shown = repr(text[:limit])
    return shown + ("..." if len(text) > limit else "")
