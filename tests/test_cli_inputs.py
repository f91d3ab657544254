"""The operator command's own rules, without a service: reading device files as the service
reads requests, the target and its keys, batching, the results file."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from localdev import host as localhost
from localdev.package import deployable_files
from offboard_cli import keys, target
from offboard_cli.errors import UsageError
from offboard_cli.inputs import identify, read_devices
from offboard_cli.output import csv_cell, write_csv
from offboard_cli.submit import MAX_BATCH_BYTES, MAX_BATCH_ITEMS, batches, idempotency_key, plan
from shared.domain.errors import InvalidInput
from shared.http import validate
from shared.http.callers import native

ROOT = Path(__file__).resolve().parent.parent
MACHINE = "1e5bc9d7e413ddd7902c2932e418702b84d0cc07"
GUID = "80fe8a4c-2b7e-4a6b-9d3c-2f1e0c5a7b61"


# ---- the same rules as the service -----------------------------------------------------------

SAMPLES = [
    MACHINE,
    MACHINE.upper(),
    MACHINE[:-1],
    MACHINE + "0",
    MACHINE[:-1] + "\u0660",  # ARABIC-INDIC DIGIT ZERO: a look-alike
    GUID,
    GUID.upper(),
    "00000000-0000-0000-0000-000000000000",
    GUID.replace("-", ""),
    "desktop-7f3k2.contoso.com",
    "DESKTOP-7F3K2",
    "kiosk_3",
    "-bad.example.com",
    "a" * 64,
    "x" * 254,
    "name with space",
    "o'brien.example.com",
    "../admin",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_a_plain_list_line_is_what_the_service_would_make_of_it(text: str) -> None:
    """Whatever kind the tool recognises, the service's own parser accepts that request with
    the same device; what it refuses, the service would refuse as that kind too."""
    by, value = identify(text)
    file = read_devices("f", text.encode())
    [row] = file.rows
    if by is None or not row.valid:
        assert row.item is None and row.code
        if by is not None:  # refused for the service's reason, in its words
            with pytest.raises(InvalidInput) as refused:
                native.request_of({by: value}, "default")
            assert refused.value.code == row.code
        return
    assert row.item is not None
    request = native.request_of(row.item, "default")
    if by == "machineId":
        assert request.machine_id == text.lower() == row.item["machineId"]
    else:
        assert request.lookup is not None and request.lookup.by == by
        assert request.lookup.value == row.item[by]


def test_the_kinds_are_told_apart_in_the_services_order() -> None:
    assert identify(MACHINE) == ("machineId", MACHINE)  # also a valid DNS label
    assert identify(GUID) == ("aadDeviceId", GUID)  # also a valid DNS name
    assert identify("pc1.contoso.com") == ("deviceName", "pc1.contoso.com")
    assert identify(MACHINE[:-1])[0] is None  # a truncated id is not a host name
    assert identify(GUID.replace("-", ""))[0] is None


@pytest.mark.parametrize(
    "comment",
    ["IR-1", "two\nlines\tand a tab", "x" * 1000, "x" * 1001, "bell\x07", "nul\x00", "del\x7f", "  "],
)
def test_comments_follow_the_services_rule(comment: str) -> None:
    sink = io.StringIO()
    csv.writer(sink).writerows([["machineId", "comment"], [MACHINE, comment]])
    [row] = read_devices("f", sink.getvalue().encode()).rows
    try:
        validate.comment_of(comment, "default")
        service_accepts = True
    except InvalidInput:
        service_accepts = False
    assert row.valid == service_accepts, row


@pytest.mark.parametrize("tenant", [GUID, GUID.upper(), "contoso.onmicrosoft.com", "1234"])
def test_tenant_ids_follow_the_services_rule(tenant: str) -> None:
    [row] = read_devices("f", f"machineId,tenantId\n{MACHINE},{tenant}\n".encode()).rows
    try:
        expected = validate.tenant_id_of(tenant)
    except InvalidInput as exc:
        assert row.code == exc.code
    else:
        assert row.item is not None and row.item["tenantId"] == expected


# ---- files -----------------------------------------------------------------------------------


def test_a_csv_uses_the_first_non_empty_device_column_in_the_services_order() -> None:
    text = (
        "\ufeffDeviceName , MACHINEID,aadDeviceId,comment,owner\n"  # Excel's BOM, any case, spaces
        f"pc1.contoso.com,{MACHINE},,laptop,alice\n"
        f",,{GUID},,bob\n"
        "pc2.contoso.com,,,,\n"
        "\n"
        "# a comment row\n"
        ',,,"only a comment",carol\n'
    )
    file = read_devices("devices.csv", text.encode())
    assert file.form == "CSV"
    assert file.notes == ["devices.csv: ignoring the columns 'owner'"]
    assert [(r.number, r.item) for r in file.rows] == [
        (2, {"machineId": MACHINE, "comment": "laptop"}),
        (3, {"aadDeviceId": GUID}),
        (4, {"deviceName": "pc2.contoso.com"}),
        (7, None),
    ]
    assert file.rows[3].code == "MissingMachineId"
    assert file.rows[3].text == ""  # `input` is the identifier columns only, not the comment or owner


def test_a_machine_id_column_with_a_bad_id_does_not_fall_back_to_the_name() -> None:
    """As the service: the first present identifier is the device, good or bad."""
    [row] = read_devices("f", f"machineId,deviceName\n{MACHINE[:-1]},pc1.contoso.com\n".encode()).rows
    assert row.code == "InvalidMachineId" and row.text == MACHINE[:-1]


def test_semicolons_and_tabs_are_understood_from_the_header() -> None:
    for sep in (";", "\t"):
        file = read_devices("f", f"deviceName{sep}comment\npc1.contoso.com{sep}a, b\n".encode())
        assert file.rows[0].item == {"deviceName": "pc1.contoso.com", "comment": "a, b"}


def test_row_numbers_are_line_numbers_even_with_quoted_newlines() -> None:
    text = f'machineId,comment\n{MACHINE},"two\nlines"\nnot-hex,\n'
    rows = read_devices("f", text.encode()).rows
    assert [(r.number, r.valid) for r in rows] == [(2, True), (4, False)]


def test_a_plain_list_skips_blanks_and_comments_and_keeps_line_numbers() -> None:
    text = f"# exported 2026-12-01\n\n{MACHINE}\r\n  {GUID}  # laptop\nbad name!\n"
    file = read_devices("hosts.txt", text.encode())
    assert file.form == "list"
    assert [(r.number, r.text, r.valid) for r in file.rows] == [
        (3, MACHINE, True),
        (4, GUID, True),
        (5, "bad name!", False),
    ]


def test_a_device_named_twice_is_a_bad_row_compared_as_the_service_compares() -> None:
    other = "2" * 40
    text = (
        "machineId,aadDeviceId,deviceName,tenantId\n"
        f"{MACHINE},,,\n"  # 2
        f",{GUID},,\n"  # 3
        ",,PC1.contoso.com,\n"  # 4
        f"{MACHINE.upper()},,,\n"  # 5: line 2 again, another case
        f",{GUID.upper()},,\n"  # 6: line 3 again
        ",,pc1.CONTOSO.com,\n"  # 7: line 4 again
        f"{MACHINE},,,{GUID}\n"  # 8: another tenant's machine: another device
        f"{other},,pc1.contoso.com,\n"  # 9: named by its machine id first: not line 4
        f"{MACHINE},,,{GUID.upper()}\n"  # 10: line 8 again
    )
    rows = read_devices("f", text.encode()).rows
    assert [(r.number, r.code, r.message) for r in rows if not r.valid] == [
        (5, "DuplicateDevice", "the same device as line 2"),
        (6, "DuplicateDevice", "the same device as line 3"),
        (7, "DuplicateDevice", "the same device as line 4"),
        (10, "DuplicateDevice", "the same device as line 8"),
    ]
    assert [r.number for r in rows if r.valid] == [2, 3, 4, 8, 9]
    listed = read_devices("f", f"{MACHINE}\n# again\n{MACHINE.upper()}  # the same\n".encode()).rows
    assert [(r.number, r.code) for r in listed] == [(1, None), (3, "DuplicateDevice")]


def test_the_example_files_send_no_readers_note_as_a_comment() -> None:
    """A note for the reader is a # line; a `comment` cell goes to Defender with the offboard."""
    csv_file = read_devices("devices.csv", (ROOT / "examples" / "devices.csv").read_bytes())
    assert all(r.valid for r in csv_file.rows) and not csv_file.notes
    assert [r.item.get("comment") for r in csv_file.rows if r.item] == [
        None,
        "lost laptop",
        "decommissioned",
        None,
        None,
    ]
    listing = read_devices("devices.txt", (ROOT / "examples" / "devices.txt").read_bytes())
    assert listing.form == "list" and all(r.item and "comment" not in r.item for r in listing.rows)
    assert len(listing.rows) == 3


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "names no device"),
        (b"\n# nothing\n\n", "names no device"),
        (b"machineId\n", "no device rows"),
        (b"machine,name\nx,y\n", "names none of the columns"),
        (b"machineId,machineid\nx,y\n", "twice"),
        (b"\xff\xfe m\x00", "not UTF-8"),
    ],
)
def test_unreadable_files_are_refused_whole(data: bytes, why: str) -> None:
    with pytest.raises(UsageError, match=why):
        read_devices("f", data)


# ---- keys, batches, results ------------------------------------------------------------------


def test_the_idempotency_key_is_the_file_and_the_line() -> None:
    file = read_devices("f", f"{MACHINE}\n{GUID}\n".encode())
    assert [r.key for r in plan(file, dry_run=False)] == [f"cli:{file.digest}:1", f"cli:{file.digest}:2"]
    assert idempotency_key(file.digest, 7, dry_run=True) == f"cli-dry:{file.digest}:7"
    assert read_devices("g", f"{MACHINE}\n{GUID}\n".encode()).digest == file.digest  # bytes, not name
    assert read_devices("f", f"{MACHINE}\n{GUID}\n\n".encode()).digest != file.digest
    validate.idempotency_key_of(idempotency_key(file.digest, 99_999, dry_run=True))  # the service takes it


def test_batches_hold_at_most_50_rows_and_stay_under_the_body_limit() -> None:
    lines = "\n".join(f"{i:040x}" for i in range(1, 121))
    results = plan(read_devices("f", lines.encode()), dry_run=False)
    assert [len(b) for b in batches(results, None, dry_run=False)] == [50, 50, 20]
    rows = "\n".join(f'{i:040x},"{"é" * 999}"' for i in range(1, 51))
    results = plan(read_devices("f", f"machineId,comment\n{rows}\n".encode()), dry_run=False)
    groups = batches(results, "c" * 1000, dry_run=True)
    assert len(groups) > 1 and sum(map(len, groups)) == 50
    for group in groups:
        body = {"requests": [r.item(dry_run=True) for r in group], "comment": "c" * 1000}
        assert len(json.dumps(body, ensure_ascii=False).encode()) <= MAX_BATCH_BYTES < validate.MAX_BODY_BYTES
        assert len(group) <= MAX_BATCH_ITEMS


def test_the_results_file_is_written_whole_and_opens_safely(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    path.write_text("old\n")
    write_csv(path, ("a", "b"), [["=HYPERLINK(1)", "plain"], ["-x", None]])
    assert list(csv.reader(path.open())) == [["a", "b"], ["'=HYPERLINK(1)", "plain"], ["'-x", ""]]
    assert [p.name for p in tmp_path.iterdir()] == ["results.csv"]  # no temporary left over
    assert csv_cell("x") == "x"


def test_keys_are_hidden_and_scrubbed_everywhere() -> None:
    secret = keys.Secret("pretend-function-key-123==")
    assert "pretend" not in repr(secret) and "pretend" not in str(secret) and "pretend" not in f"{secret}"
    assert keys.scrub("GET ?code=pretend-function-key-123== failed") == "GET ?code=*** failed"
    assert csv_cell("pretend-function-key-123==") == "***"


def test_a_key_with_spaces_is_refused_without_being_quoted() -> None:
    with pytest.raises(UsageError) as refused:
        keys.read_key("OFFBOARD_KEY", "function key", {"OFFBOARD_KEY": "abc def-secret"}, prompt=False)
    assert "secret" not in str(refused.value)


@pytest.mark.parametrize(
    ("url", "base"),
    [
        ("https://contoso.azurewebsites.net", "https://contoso.azurewebsites.net"),
        ("https://contoso.azurewebsites.net/", "https://contoso.azurewebsites.net"),
        ("https://contoso.azurewebsites.net/api/", "https://contoso.azurewebsites.net"),
        ("http://127.0.0.1:7071", "http://127.0.0.1:7071"),
        ("http://localhost:8080/api", "http://localhost:8080"),
    ],
)
def test_base_urls(url: str, base: str) -> None:
    assert target.base_url_of(url) == base


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://contoso.azurewebsites.net", "must be https"),
        ("https://contoso.azurewebsites.net/api/offboard", "no path"),
        ("https://contoso.azurewebsites.net/?code=s3cret-key", "no \\?query"),
        ("https://user:s3cret-key@contoso.azurewebsites.net", "no \\?query"),
        ("contoso.azurewebsites.net", "must look like"),
        ("ftp://contoso", "must look like"),
    ],
)
def test_bad_urls_are_refused_without_quoting_a_key(url: str, why: str) -> None:
    with pytest.raises(UsageError, match=why) as refused:
        target.base_url_of(url)
    assert "s3cret" not in str(refused.value)


def test_the_local_keys_are_the_local_hosts() -> None:
    assert target.LOCAL_FUNCTION_KEY == localhost.LOCAL_FUNCTION_KEY
    assert target.LOCAL_MASTER_KEY == localhost.LOCAL_MASTER_KEY


def test_the_command_is_not_deployed() -> None:
    assert not [f for f in deployable_files(ROOT) if f.startswith("offboard_cli/")]
    assert (ROOT / "offboard_cli" / "cli.py").exists()
