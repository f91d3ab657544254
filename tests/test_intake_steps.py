"""Accepting requests, step by step, on the in-memory twins of storage (the same contracts as
Azurite's, ETags and 412s included): guards and their leases, the breaker and approvals,
idempotency, healing, tenants, principals. Milliseconds each; tests/test_request_state.py and
the end-to-end tests prove the same on Azurite through the local host."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from shared.adapters.entities import EntityChanged, Write
from shared.adapters.guards import ACCEPT_LEASE, key_key, machine_key
from shared.domain import ids
from shared.domain.devices import Lookup
from shared.domain.errors import IdempotencyKeyReused, InvalidInput, Refusal, RequestConflict
from shared.domain.messages import HoldExpiryMessage
from shared.domain.offboard import Caller, OffboardRequest
from shared.domain.statuses import Status
from shared.http.errors import status_of
from shared.intake.reconcile import reconcile
from shared.intake.submission import Answer, Item, Submissions
from tests.conftest import MACHINE, Memory

OTHER = "2f6cd0e8f524eee8a13d3a43f529813c95e1dd18"
CALLER = Caller("agent:test")
TENANT = "9f0e1d2c-3b4a-4596-8877-665544332211"


class Clock:
    def __init__(self, now: float = 2_000_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def intake(memory: Callable[..., Memory]) -> Callable[..., tuple[Memory, Submissions]]:
    def make(**settings: str) -> tuple[Memory, Submissions]:
        m = memory(**settings)
        return m, m.services.submissions(lambda r: f"/api/offboard/{r}")

    return make


def submit(
    submissions: Submissions, request: OffboardRequest, key: str | None = None, caller: Caller = CALLER
) -> Answer:
    return submissions.submit(request, caller, key)


def refused(
    submissions: Submissions, request: OffboardRequest, key: str | None = None, caller: Caller = CALLER
) -> Refusal:
    with pytest.raises(Refusal) as caught:
        submissions.submit(request, caller, key)
    return caught.value


# ---- the normal path --------------------------------------------------------------------


def test_a_request_is_four_storage_requests_and_its_message_carries_the_rows_etag(intake) -> None:
    m, submissions = intake()
    submit(submissions, OffboardRequest(OTHER, "warm the breaker's cache"))
    sent, before = len(m.work.sent), m.state.requests
    answer = submit(submissions, OffboardRequest(MACHINE, "IR-1"))
    # guard, breaker, row with its events (one transaction), and the message
    assert m.state.requests - before == 3 and len(m.work.sent) - sent == 1
    message = m.work.sent[-1].json()
    record = m.services.store.get(answer.body["requestId"])
    assert record is not None and message["etag"] == record.etag and message["requestId"] == record.request_id
    assert [e["event"] for e in m.services.store.events(record.request_id)] == ["Received", "Queued"]


def test_a_batch_is_one_partition_one_transaction_per_33_items_and_a_batch_row(intake) -> None:
    m, submissions = intake()
    items = [Item(f"requests[{i}]", OffboardRequest(f"{i:040x}", "c")) for i in range(40)]
    batch_id, answers = submissions.accept(items, CALLER)
    assert batch_id is not None and ids.is_batch_id(batch_id)
    assert all(isinstance(a, Answer) and a.status == 202 for a in answers)
    request_ids = [a.body["requestId"] for a in answers if isinstance(a, Answer)]
    assert all(ids.batch_of(r) == batch_id for r in request_ids)
    listing, records = m.services.store.batch(batch_id)
    assert listing is not None and [rid for _, rid in listing.items] == request_ids
    assert set(records) == set(request_ids)


# ---- one unfinished request per device ----------------------------------------------------


def test_a_second_request_for_the_device_gets_the_first(intake) -> None:
    m, submissions = intake()
    first = submit(submissions, OffboardRequest(MACHINE, "a"))
    again = submit(submissions, OffboardRequest(MACHINE, "b"))
    assert again.body["requestId"] == first.body["requestId"] and again.body["existingRequest"] is True
    assert len(m.work.sent) == 1


def test_a_dry_run_never_stands_in_for_a_real_request(intake) -> None:
    m, submissions = intake()
    rehearsal = submit(submissions, OffboardRequest(MACHINE, "a", dry_run=True))
    real = submit(submissions, OffboardRequest(MACHINE, "a"))
    assert real.body["requestId"] != rehearsal.body["requestId"] and "existingRequest" not in real.body
    assert "dryRun" not in real.body and len(m.work.sent) == 2
    again = submit(submissions, OffboardRequest(MACHINE, "a", dry_run=True))
    # The unfinished rehearsal answers, and says it is one.
    assert again.body["requestId"] == rehearsal.body["requestId"] and again.body["dryRun"] is True


def test_a_guard_left_by_a_dead_acceptor_is_taken_over_after_the_lease(intake) -> None:
    m, submissions = intake()
    clock = Clock()
    m.services.guards._now = clock  # the guards' and the submission's clock, moved by hand
    submissions.clock = clock
    stranded = ids.request_id(ids.new_batch_id(), 1)
    m.services.guards.take(machine_key(MACHINE), stranded, "dead-acceptor")  # then the process died
    blocked = refused(submissions, OffboardRequest(MACHINE, "retry at once"))
    assert status_of(blocked) == 409 and blocked.code == "RequestBeingAccepted"
    clock.now += ACCEPT_LEASE + 1
    answer = submit(submissions, OffboardRequest(MACHINE, "retry after the lease"))
    assert answer.body["requestId"] != stranded and answer.body["status"] == "Queued"
    # The dead acceptor's id is void: were it only slow, it could never write its row now.
    voided = m.state.get(f"batch-{ids.batch_of(stranded)}", stranded)
    assert voided is not None and voided["kind"] == "void"
    assert m.services.store.get(stranded) is None


def test_two_takers_of_one_stale_guard_cannot_both_win(intake) -> None:
    m, submissions = intake()
    clock = Clock()
    m.services.guards._now = clock
    submissions.clock = clock
    m.services.guards.take(machine_key(MACHINE), ids.request_id(ids.new_batch_id(), 1), "dead")
    clock.now += ACCEPT_LEASE + 1
    found = m.services.guards.read(machine_key(MACHINE))
    assert found is not None
    assert m.services.guards.take_over(machine_key(MACHINE), found, "a", "taker-a", None) is not None
    assert m.services.guards.take_over(machine_key(MACHINE), found, "b", "taker-b", None) is None


def test_a_request_written_without_its_message_is_healed_by_the_next_request(intake) -> None:
    m, submissions = intake()
    clock = Clock()
    submissions.clock = clock
    m.work.fail_next = 1  # the acceptor "dies" between the row and the message
    with pytest.raises(Refusal):
        submit(submissions, OffboardRequest(MACHINE, "lost message"))
    # A failed send frees the device at once; a crash (no chance to free it) is the case below.
    assert submit(submissions, OffboardRequest(MACHINE, "again")).body["status"] == "Queued"


def test_a_stranded_queued_row_gets_its_message_from_a_retry_or_the_reconciler(intake) -> None:
    m, submissions = intake()
    first = submit(submissions, OffboardRequest(MACHINE, "c"), key="playbook-run-7")
    m.work.sent.clear()  # the acceptor died after the row, before the message
    record = m.services.store.get(first.body["requestId"])
    assert record is not None and record.untouched()
    now = ids.created_at(record.request_id) + ACCEPT_LEASE + 5
    submissions.clock = Clock(now)
    replayed = submit(submissions, OffboardRequest(MACHINE, "c"), key="playbook-run-7")
    assert replayed.body["requestId"] == record.request_id and replayed.body["replayed"] is True
    [healed] = m.work.bodies()
    assert healed["requestId"] == record.request_id
    # Healed once: the row says so, so another finder sends nothing more.
    assert submit(submissions, OffboardRequest(MACHINE, "c"), key="playbook-run-7").body["replayed"]
    assert len(m.work.sent) == 1
    # Nobody asks: the reconciler finds it (after the lease) and sends one.
    m.work.sent.clear()
    record = m.services.store.get(record.request_id)
    assert record is not None
    assert reconcile(m.services.store, m.services.queue, ACCEPT_LEASE, now=now + 3 * ACCEPT_LEASE) == 1
    assert len(m.work.sent) == 1


# ---- idempotency keys ---------------------------------------------------------------------


def test_a_key_replays_the_first_answer_and_refuses_another_request(intake) -> None:
    m, submissions = intake()
    first = submit(submissions, OffboardRequest(MACHINE, "c"), key="k1")
    again = submit(submissions, OffboardRequest(MACHINE, "c"), key="k1")
    assert again.body == {**first.body, "replayed": True}
    reused = refused(submissions, OffboardRequest(OTHER, "c"), key="k1")
    assert isinstance(reused, IdempotencyKeyReused) and status_of(reused) == 422
    assert len(m.work.sent) == 1


def test_a_key_whose_first_use_died_is_a_first_try_after_the_lease_never_409_forever(intake) -> None:
    m, submissions = intake()
    clock = Clock()
    m.services.guards._now = clock
    submissions.clock = clock
    fingerprint = OffboardRequest(MACHINE, "c").fingerprint
    m.services.guards.take(key_key("", "k2"), ids.request_id(ids.new_batch_id(), 1), "dead", fingerprint)
    in_progress = refused(submissions, OffboardRequest(MACHINE, "c"), key="k2")
    assert isinstance(in_progress, RequestConflict) and in_progress.code == "IdempotentRequestInProgress"
    clock.now += ACCEPT_LEASE + 1
    answer = submit(submissions, OffboardRequest(MACHINE, "c"), key="k2")
    assert answer.status == 202 and "replayed" not in answer.body
    assert submit(submissions, OffboardRequest(MACHINE, "c"), key="k2").body["replayed"] is True


def test_a_key_answered_by_an_older_version_is_replayed(intake) -> None:
    m, submissions = intake()
    body = {"requestId": "6fa240ec-e2bc-4e35-a722-2edb01bb2028", "machineId": MACHINE, "status": "Queued"}
    where = key_key("", "legacy-key")
    m.state.insert(
        {
            "PartitionKey": where[0],
            "RowKey": where[1],
            "fingerprint": OffboardRequest(MACHINE, "c").fingerprint,
            "status": 202,
            "body": json.dumps(body),
        }
    )
    assert submit(submissions, OffboardRequest(MACHINE, "c"), key="legacy-key").body == {
        **body,
        "replayed": True,
    }


def test_keys_are_scoped_to_the_principal(intake) -> None:
    _m, submissions = intake()
    alice = Caller("principal:alice", principal="a1", scoped=True)
    bob = Caller("principal:bob", principal="b2", scoped=True)
    first = submit(submissions, OffboardRequest(MACHINE, "c"), key="run-1", caller=alice)
    # Bob's "run-1" is his own key: it neither replays Alice's answer nor learns her request.
    other = refused(submissions, OffboardRequest(MACHINE, "c"), key="run-1", caller=bob)
    assert other.code == "RequestByAnotherCaller" and first.body["requestId"] not in other.message


# ---- the breaker and approvals ------------------------------------------------------------


def test_the_breaker_holds_what_is_over_its_limit_with_the_reason(intake) -> None:
    m, submissions = intake(OFFBOARD_BREAKER_LIMIT="2")
    items = [Item(f"requests[{i}]", OffboardRequest(f"{i:040x}", "c")) for i in range(3)]
    _, answers = submissions.accept(items, CALLER)
    statuses = [a.body["status"] for a in answers if isinstance(a, Answer)]
    assert statuses == ["Queued", "Queued", "Held"]
    held = answers[2]
    assert isinstance(held, Answer) and held.body["heldReason"]["code"] == "BreakerTripped"
    assert "2 offboards accepted in the last 3600s (limit 2)" in held.body["heldReason"]["message"]
    assert "master key" in held.body["heldReason"]["message"]
    kinds = [b["type"] for b in m.work.bodies()]
    assert kinds.count("offboard") == 2 and kinds.count("hold-expiry") == 1


def test_approval_always_holds_every_real_request_and_no_rehearsal(intake) -> None:
    m, submissions = intake(OFFBOARD_APPROVAL="always")
    real = submit(submissions, OffboardRequest(MACHINE, "c"))
    rehearsal = submit(submissions, OffboardRequest(OTHER, "c", dry_run=True))
    assert real.body["status"] == "Held" and real.body["heldReason"]["code"] == "ApprovalRequired"
    assert rehearsal.body["status"] == "Queued"
    record = m.services.store.get(real.body["requestId"])
    assert record is not None and record.status == Status.HELD


def test_a_release_that_died_before_its_message_is_healed_however_long_it_was_held(intake) -> None:
    import time

    m, submissions = intake(OFFBOARD_APPROVAL="always")
    request_id = submit(submissions, OffboardRequest(MACHINE, "c")).body["requestId"]
    m.work.sent.clear()
    m.work.fail_next = 1  # the releasing process "dies" between the row and the message
    with pytest.raises(ConnectionError):
        m.services.holds().release(request_id, Caller("agent:second-person"))
    record = m.services.store.get(request_id)
    assert record is not None and record.status == Status.QUEUED and m.work.sent == []
    # Two hours later: outside the reconciler's look-back for new requests, and still healed.
    later = time.time() + 2 * 3600
    holds = m.services.holds()
    assert reconcile(m.services.store, m.services.queue, ACCEPT_LEASE, holds, now=later) == 1
    [healed] = m.work.bodies()
    assert healed["requestId"] == request_id and healed["type"] == "offboard"
    assert reconcile(m.services.store, m.services.queue, ACCEPT_LEASE, holds, now=later + 120) == 0


def test_a_release_whose_message_cannot_be_queued_is_held_again_and_says_so(intake) -> None:
    from azure.core.exceptions import ServiceRequestError

    m, submissions = intake(OFFBOARD_APPROVAL="always")
    request_id = submit(submissions, OffboardRequest(MACHINE, "c")).body["requestId"]
    m.work.fail_with, m.work.fail_next = ServiceRequestError, 1
    with pytest.raises(ServiceRequestError):
        m.services.holds().release(request_id, Caller("agent:second-person"))
    record = m.services.store.get(request_id)
    assert record is not None and record.status == Status.HELD and record.released_by is None
    trail = [e["event"] for e in m.services.listing().events(request_id, CALLER)]
    assert trail[-2:] == ["Released", "ReleaseUndone"]  # the trail agrees with the row


def test_a_notification_is_queued_once_per_call_that_held_something(intake) -> None:
    m, submissions = intake(OFFBOARD_APPROVAL="always", OFFBOARD_HOLD_NOTIFY_URL="http://127.0.0.1:9/hook")
    items = [Item(f"requests[{i}]", OffboardRequest(f"{i:040x}", "c")) for i in range(3)]
    submissions.accept(items, CALLER)
    [notify] = [b for b in m.work.bodies() if b["type"] == "notify"]
    assert len(notify["requestIds"]) == 3


# ---- tenants ------------------------------------------------------------------------------


def test_a_tenant_not_listed_is_refused_and_changes_nothing(intake) -> None:
    m, submissions = intake()
    before = m.state.requests
    refusal = refused(submissions, OffboardRequest(MACHINE, "c", tenant_id=TENANT))
    assert isinstance(refusal, InvalidInput) and refusal.code == "TenantNotAllowed"
    assert m.state.requests == before and m.work.sent == []


def test_each_tenant_has_its_own_device_guard_and_breaker(intake) -> None:
    m, submissions = intake(
        OFFBOARD_TENANTS=TENANT,
        MULTITENANT_APP_CLIENT_ID="5e6f7a8b-0000-4000-8000-000000000003",
        MANAGED_IDENTITY_CLIENT_ID="0f1e2d3c-0000-4000-8000-000000000001",
        OFFBOARD_BREAKER_LIMIT="1",
    )
    home = submit(submissions, OffboardRequest(MACHINE, "c"))
    customer = submit(submissions, OffboardRequest(MACHINE, "c", tenant_id=TENANT))
    assert customer.body["requestId"] != home.body["requestId"] and customer.body["tenantId"] == TENANT
    assert home.body["status"] == customer.body["status"] == "Queued"  # one breaker each
    record = m.services.store.get(customer.body["requestId"])
    assert record is not None and record.tenant_id == TENANT
    assert m.work.bodies()[-1]["tenantId"] == TENANT


# ---- lookups ------------------------------------------------------------------------------


def test_a_request_by_name_answers_with_its_lookup(intake) -> None:
    m, submissions = intake()
    lookup = Lookup.of("deviceName", "WS-0042.contoso.com")
    answer = submit(submissions, OffboardRequest(None, "c", lookup))
    assert answer.body["machineId"] is None and answer.body["lookup"] == {
        "by": "deviceName",
        "value": "ws-0042.contoso.com",
    }
    [message] = m.work.bodies()
    assert message["lookup"] == answer.body["lookup"] and "machineId" not in message


def test_a_batch_replayed_whole_still_has_a_batch_to_follow(intake) -> None:
    m, submissions = intake()
    items = [Item(f"requests[{i}]", OffboardRequest(f"{i:040x}", "c"), key=f"file:{i}") for i in range(2)]
    first_batch, first = submissions.accept(items, CALLER)
    again_batch, again = submissions.accept(items, CALLER)
    assert again_batch is not None and again_batch != first_batch
    assert all(isinstance(a, Answer) and a.body["replayed"] for a in again)
    listing, records = m.services.store.batch(again_batch)
    assert listing is not None and set(records) == {
        a.body["requestId"] for a in first if isinstance(a, Answer)
    }


def test_a_replay_names_the_device_as_the_caller_did_even_once_resolved(intake) -> None:
    m, submissions = intake()
    lookup = Lookup.of("aadDeviceId", "6d5c4b3a-2f1e-4d0c-9b8a-7f6e5d4c3b2a")
    first = submit(submissions, OffboardRequest(None, "c", lookup), key="k")
    record = m.services.store.get(first.body["requestId"])
    assert record is not None
    m.services.store.update(record, machine_id=MACHINE)  # the worker resolved it since
    again = submit(submissions, OffboardRequest(None, "c", lookup), key="k")
    assert again.body == {**first.body, "replayed": True}


def test_refusals_are_in_the_audit_export_only_for_callers_who_see_every_request(intake) -> None:
    import time

    m, _ = intake()
    m.services.rejections.record("agent:curl", "InvalidMachineId", "machineId must be 40 hex characters")
    listing = m.services.listing()
    since = time.time() - 60
    alice = Caller("alice@contoso.com", principal="alice-oid", scoped=True)
    operator = Caller("ops@contoso.com", principal="ops-oid", operator=True, scoped=True)
    for caller, seen in ((CALLER, 1), (operator, 1), (alice, 0)):
        events = listing.events_since(since, caller)
        assert [e["outcome"] for e in events if e["event"] == "Rejected"] == ["InvalidMachineId"] * seen
    assert listing.events_since(time.time() + 1, CALLER) == []  # before `since`: not in it


def test_a_single_requests_batch_id_leads_to_a_batch_of_one(intake) -> None:
    m, submissions = intake()
    request_id = submit(submissions, OffboardRequest(MACHINE, "c")).body["requestId"]
    listing = m.services.listing()
    batch_id = listing.request(request_id, CALLER).public()["batchId"]
    batch = listing.batch(batch_id, CALLER)
    assert batch["total"] == 1 and batch["items"][0]["requestId"] == request_id
    assert batch["format"] == "native" and batch["counts"] == {"Queued": 1}


def test_since_takes_rfc_3339_times_in_either_case() -> None:
    from shared.intake.listing import since_of

    assert since_of("2026-12-01t09:00:00z") == since_of("2026-12-01T09:00:00Z") == 1_796_115_600.0


def test_a_held_requests_expiry_is_queued_before_its_row(intake) -> None:
    from azure.core.exceptions import ServiceRequestError

    m, submissions = intake(OFFBOARD_APPROVAL="always")
    # An expiry that cannot be queued: no Held row at all (one would hold the device until
    # someone released it by id), the device free for the caller's retry.
    m.work.fail_with, m.work.fail_next = ServiceRequestError, 1
    assert status_of(refused(submissions, OffboardRequest(MACHINE, "c"))) == 503
    assert list(m.services.holds().held()) == []
    # A process that dies after the expiry, before the row: the expiry finds nothing, later.
    m.work.fail_with, m.work.fail_next = ConnectionError, 0
    state_transact = m.state.transact

    def dies_at_the_rows(writes: list[Write]) -> list[str]:
        if any(w.entity["PartitionKey"].startswith("batch-") for w in writes):
            raise ConnectionError("the acceptor died before its rows")
        written: list[str] = state_transact(writes)
        return written

    m.state.transact = dies_at_the_rows
    with pytest.raises(ConnectionError):
        submit(submissions, OffboardRequest(MACHINE, "c"))
    m.state.transact = state_transact
    [expiry] = m.work.bodies()
    assert expiry["type"] == "hold-expiry" and m.services.store.get(expiry["requestId"]) is None
    m.services.holds().expire(HoldExpiryMessage(expiry["requestId"]))  # nothing to expire, no error
    # The normal path: the expiry first, then the row, then the answer.
    m.work.sent.clear()
    held = submit(submissions, OffboardRequest(OTHER, "c"))
    assert [b["type"] for b in m.work.bodies()] == ["hold-expiry"]
    assert m.work.bodies()[0]["requestId"] == held.body["requestId"] and held.body["status"] == "Held"


def test_a_breaker_changing_under_a_mass_event_holds_rather_than_fails(intake) -> None:
    m, submissions = intake()
    transact = m.state.transact

    def others_always_win(writes: list[Write]) -> list[str]:
        # Every breaker write loses its race (HTTP 412), as under many instances at once.
        if any(w.entity["PartitionKey"] == "breaker" for w in writes):
            raise EntityChanged("breaker/offboard")
        written: list[str] = transact(writes)
        return written

    m.state.transact = others_always_win
    answer = submit(submissions, OffboardRequest(MACHINE, "c"))
    assert answer.body["status"] == "Held" and answer.body["heldReason"]["code"] == "BreakerTripped"
    assert "the breaker unreadable" in answer.body["heldReason"]["message"]


def test_the_watchers_idempotency_keys_are_its_own(intake) -> None:
    from shared.watcher.run import CALLER as WATCHER

    _, submissions = intake()
    key = "intune-watcher:5e3f9a2b:retire:2026-12-01T10:00:00Z"  # the shape the watcher uses
    first = submit(submissions, OffboardRequest(MACHINE, "c"), key=key, caller=WATCHER)
    # A caller the platform let through without a principal sends the same key: it gets a
    # request of its own, never the watcher's answer (nor a refusal that confirms the key).
    anonymous = Caller("agent:curl/8.5.0", scoped=True)
    other = submit(submissions, OffboardRequest(OTHER, "c"), key=key, caller=anonymous)
    assert other.body["requestId"] != first.body["requestId"] and "replayed" not in other.body


def test_rows_whose_write_answer_was_lost_are_read_back_never_written_twice(intake) -> None:
    from azure.core.exceptions import ServiceResponseError

    m, submissions = intake()
    clock = Clock()
    m.services.guards._now = clock  # the guards' and the submission's clock, moved by hand
    submissions.clock = clock
    commit, read = m.state.transact, m.state.get
    lost = {"answers": 1, "reads": 0}

    def committed_but_unanswered(writes: list[Write]) -> list[str]:
        etags: list[str] = commit(writes)
        if lost["answers"] and any(w.entity["PartitionKey"].startswith("batch-") for w in writes):
            lost["answers"] -= 1
            raise ServiceResponseError("the answer timed out after the transaction committed")
        return etags

    def reads(partition: str, row: str) -> Any:
        if lost["reads"] and partition.startswith("batch-"):
            lost["reads"] -= 1
            raise ServiceResponseError("storage unreachable")
        return read(partition, row)

    m.state.transact, m.state.get = committed_but_unanswered, reads
    # Read back: the row is there, so the request is accepted as if the answer had come.
    first = submit(submissions, OffboardRequest(MACHINE, "c"))
    assert first.body["status"] == "Queued" and len(m.work.sent) == 1
    # Read back fails too: 503, and the guards stay, so no second request starts beside it:
    # the caller's retry finds the row its first try wrote, and heals it (its message).
    lost.update(answers=1, reads=1)
    assert status_of(refused(submissions, OffboardRequest(OTHER, "c"), key="run-9")) == 503
    assert m.work.bodies()[-1]["requestId"] == first.body["requestId"]  # nothing sent for it yet
    clock.now += ACCEPT_LEASE + 1  # the heal waits for the acceptance lease
    retried = submit(submissions, OffboardRequest(OTHER, "c"), key="run-9")
    again = submit(submissions, OffboardRequest(OTHER, "c"))
    assert retried.body["replayed"] is True and again.body["requestId"] == retried.body["requestId"]
    assert [b["requestId"] for b in m.work.bodies()].count(retried.body["requestId"]) == 1
