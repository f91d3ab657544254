"""Reading the device file of `submit`: a CSV with a header, or a plain list of identifiers.

Every row is checked here, before anything is sent, with the service's own rules:
`shared.domain.devices.Lookup` for Entra device ids and DNS names (the same function the
service calls), and for machine ids, tenant ids and comments the same patterns as
shared/http/validate.py (tests/test_cli_inputs.py keeps the two in step). Row numbers are
line numbers in the file, which is what an editor shows.

- CSV: the first line names the columns (case and spaces do not matter): `machineId`,
  `aadDeviceId`, `deviceName` (the first non-empty of these, in that order, is the row's
  device, as the service reads a request), optional `comment` and `tenantId`. Separated by
  commas, semicolons or tabs (whichever the header uses). Other columns are ignored, and
  named on stderr.
- A plain list: one identifier per line, its kind recognised by its form: 40 hexadecimal
  characters is a machine id, a GUID an Entra device id, a DNS name a device name. Blank
  lines and `#` comments are skipped. One refusal the service would not make, because it
  never guesses a kind: 32 or more hexadecimal characters, but not 40, are a damaged machine
  id (or a GUID without hyphens), not a host name to look up.
- Either form: a device named twice (the same machine id, Entra device id or name, in any
  case, and tenant) is a bad row, "the same device as line N".
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from dataclasses import dataclass, field
from typing import Any

from shared.domain.devices import GUID, InvalidLookup, Lookup
from shared.domain.messages import TENANT_ID

from .errors import UsageError

ID_COLUMNS = ("machineId", "aadDeviceId", "deviceName")
COLUMNS = {name.lower(): name for name in (*ID_COLUMNS, "comment", "tenantId")}
# The service's rules (shared/http/validate.py): ASCII hex only, so look-alike digits from
# other scripts never pass; comments up to 1,000 characters, tab and newlines allowed.
MACHINE_ID = re.compile(r"[0-9a-fA-F]{40}")
MAX_COMMENT_CHARS = 1000
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_HEX = re.compile(r"[0-9a-fA-F]+")
_LOOKUP_CODES = {"aadDeviceId": "InvalidAadDeviceId", "deviceName": "InvalidDeviceName"}
_INLINE_COMMENT = re.compile(r"\s+#.*$")
_BLANKS = " \t\r\n"


@dataclass(frozen=True)
class Row:
    number: int  # the line it starts on
    text: str  # the identifier as written (the results' `input`)
    item: dict[str, Any] | None  # the request to send (without its idempotency key)
    code: str | None = None  # why it cannot be sent, in the service's terms
    message: str | None = None

    @property
    def valid(self) -> bool:
        return self.item is not None


@dataclass(frozen=True)
class DeviceFile:
    name: str
    digest: str  # sha256 of the file's bytes, first 32 hex: half the idempotency key
    form: str  # "CSV" or "list"
    rows: list[Row]
    notes: list[str] = field(default_factory=list)

    @property
    def invalid(self) -> list[Row]:
        return [row for row in self.rows if not row.valid]


def digest_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def read_devices(name: str, data: bytes) -> DeviceFile:
    try:
        text = data.decode("utf-8-sig")  # Excel writes a byte-order mark
    except UnicodeDecodeError as exc:
        raise UsageError(f"{name} is not UTF-8 text (byte {exc.start + 1}); save it as UTF-8") from None
    lines = text.split("\n")
    first = next((line for line in lines if line.strip(_BLANKS) and not _is_comment(line)), None)
    if first is None:
        raise UsageError(f"{name} names no device (it is empty, or only blank lines and # comments)")
    delimiter = _header_delimiter(first)
    if delimiter is not None:
        rows, notes = _csv_rows(name, text, delimiter)
        form = "CSV"
    else:
        if "," in first or ";" in first or "\t" in first:
            raise UsageError(
                f"{name}: the first line looks like a CSV header but names none of the columns "
                f"{', '.join(ID_COLUMNS)}"
            )
        rows, notes, form = _list_rows(lines), [], "list"
    if not rows:
        raise UsageError(f"{name} has a header but no device rows")
    return DeviceFile(name, digest_of(data), form, _without_repeats(rows), notes)


def _without_repeats(rows: list[Row]) -> list[Row]:
    """A device named twice in one file is a bad row (the second naming): the service would
    make one request and refuse the other as a duplicate, after the first was sent. Compared
    as the service compares them: identifiers in lower case (Lookup and the machine id rule
    lower them), the same kind, the same tenant. A name and a machine id of one device are
    told apart only by the service, once it has looked the name up."""
    first: dict[tuple[str, str, str | None], int] = {}
    kept = []
    for row in rows:
        if row.item is not None:
            by = next(kind for kind in ID_COLUMNS if kind in row.item)
            device = (by, str(row.item[by]), row.item.get("tenantId"))
            if device in first:
                row = Row(
                    row.number, row.text, None, "DuplicateDevice", f"the same device as line {first[device]}"
                )
            else:
                first[device] = row.number
        kept.append(row)
    return kept


def check_comment(value: str, what: str = "comment") -> str | None:
    """Why the service would refuse this comment, or None."""
    if len(value) > MAX_COMMENT_CHARS:
        return f"{what} is over {MAX_COMMENT_CHARS} characters"
    if _CONTROL.search(value):
        return f"{what} contains control characters"
    return None


def identify(text: str) -> tuple[str, str] | tuple[None, str]:
    """A plain-list line's kind: (`machineId` | `aadDeviceId` | `deviceName`, value), or
    (None, why not). Order matters: a machine id and a GUID are DNS names too."""
    if MACHINE_ID.fullmatch(text):
        return "machineId", text
    if GUID.fullmatch(text):
        return "aadDeviceId", text
    if _HEX.fullmatch(text) and len(text) >= 32:
        # A DNS name by its form, but surely a machine id (or a GUID without its hyphens)
        # that lost or gained characters: a lookup by that name could only fail later.
        return None, f"{len(text)} hexadecimal characters: a machine id has exactly 40"
    if _dns_ok(text):
        return "deviceName", text
    return None, "not a machine id (40 hex), an Entra device id (GUID) or a DNS name"


def _dns_ok(text: str) -> bool:
    try:
        Lookup.of("deviceName", text)
    except InvalidLookup:
        return False
    return True


def _item(by: str, value: str, comment: str | None, tenant: str | None) -> dict[str, Any]:
    """The request item for a device; raises _Bad with the service's code and message."""
    item: dict[str, Any]
    if by == "machineId":
        if not MACHINE_ID.fullmatch(value):
            raise _Bad(
                "InvalidMachineId",
                "machineId must be exactly 40 hexadecimal characters (the Defender device id)",
            )
        item = {"machineId": value.lower()}
    else:
        try:
            lookup = Lookup.of(by, value)
        except InvalidLookup as exc:
            raise _Bad(_LOOKUP_CODES[by], str(exc)) from None
        item = {lookup.by: lookup.value}
    if comment:
        why = check_comment(comment)
        if why:
            raise _Bad("InvalidComment", why)
        item["comment"] = comment
    if tenant:
        if not TENANT_ID.fullmatch(tenant.lower()):
            raise _Bad("InvalidTenantId", "tenantId must be a tenant id (a GUID)")
        item["tenantId"] = tenant.lower()
    return item


class _Bad(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _is_comment(line: str) -> bool:
    return line.strip(_BLANKS).startswith("#")


def _header_delimiter(line: str) -> str | None:
    for delimiter in (",", ";", "\t"):
        cells = next(csv.reader([line], delimiter=delimiter), [])
        if any(cell.strip().lower() in {c.lower() for c in ID_COLUMNS} for cell in cells):
            return delimiter
    return None


def _list_rows(lines: list[str]) -> list[Row]:
    rows = []
    for number, raw in enumerate(lines, start=1):
        text = _INLINE_COMMENT.sub("", raw).strip(_BLANKS)
        if not text or text.startswith("#"):
            continue
        by, value = identify(text)
        if by is None:
            rows.append(Row(number, text, None, "UnknownIdentifier", value))
            continue
        try:
            rows.append(Row(number, text, _item(by, value, None, None)))
        except _Bad as bad:
            rows.append(Row(number, text, None, bad.code, bad.message))
    return rows


def _csv_rows(name: str, text: str, delimiter: str) -> tuple[list[Row], list[str]]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    columns: dict[str, int] | None = None
    width = 0
    rows: list[Row] = []
    notes: list[str] = []
    start = 1
    try:
        for record in reader:
            number, start = start, reader.line_num + 1
            cells = [cell.strip(_BLANKS) for cell in record]
            if not any(cells) or cells[0].startswith("#"):
                continue
            if columns is None:
                columns, ignored = _header(name, cells)
                width = len(cells)
                if ignored:
                    notes.append(f"{name}: ignoring the columns {', '.join(ignored)}")
                continue
            rows.append(_csv_row(number, cells, columns, width))
    except csv.Error as exc:
        raise UsageError(f"{name} line {reader.line_num}: not readable as CSV ({exc})") from None
    return rows, notes


def _header(name: str, cells: list[str]) -> tuple[dict[str, int], list[str]]:
    columns: dict[str, int] = {}
    ignored = []
    for index, cell in enumerate(cells):
        canonical = COLUMNS.get(cell.lower())
        if canonical is None:
            ignored.append(repr(cell) if cell else f"#{index + 1} (no name)")
            continue
        if canonical in columns:
            raise UsageError(f"{name}: the header names the column {canonical} twice")
        columns[canonical] = index
    return columns, ignored


def _csv_row(number: int, cells: list[str], columns: dict[str, int], width: int) -> Row:
    def cell(column: str) -> str:
        index = columns.get(column)
        return cells[index] if index is not None and index < len(cells) else ""

    extra = [c for c in cells[width:] if c]
    present = [(by, cell(by)) for by in ID_COLUMNS if cell(by)]
    text = present[0][1] if present else ""  # the results' `input`: the device as named, or none
    if extra:
        return Row(number, text, None, "InvalidRow", f"{len(cells)} fields, but the header names {width}")
    if not present:
        return Row(number, text, None, "MissingMachineId", f"no {', '.join(ID_COLUMNS)} in this row")
    by, value = present[0]
    try:
        return Row(number, value, _item(by, value, cell("comment") or None, cell("tenantId") or None))
    except _Bad as bad:
        return Row(number, value, None, bad.code, bad.message)
