"""The worker's steps on the in-memory twins of storage, with the real credential and the
Defender simulator over loopback: each guarantee in milliseconds. tests/test_worker.py,
tests/test_request_state.py and the end-to-end tests prove the same on Azurite."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from localdev.defender_sim import DefenderSimulator, Reply
from shared.domain.devices import Lookup
from shared.domain.offboard import Caller, OffboardRequest
from shared.domain.records import RequestRecord
from shared.domain.statuses import Status
from shared.worker.tagging import Tagger
from tests.conftest import MACHINE, Memory, adopt, events

OTHER = "2f6cd0e8f524eee8a13d3a43f529813c95e1dd18"


@pytest.fixture
def m(memory: Callable[..., Memory]) -> Memory:
    return memory()


def record(m: Memory, request_id: str) -> RequestRecord:
    found = m.services.store.get(request_id)
    assert found is not None
    return found


def claimed_by_a_dead_delivery(m: Memory, request_id: str) -> None:
    """The row as a first delivery ("delivery-1") left it: claimed, then its process died."""
    now = datetime.now(UTC).isoformat()
    m.services.store.change(
        record(m, request_id), None, claimed_by="delivery-1", claimed_attempt=1, claimed_at=now
    )


def test_a_first_delivery_is_five_storage_requests_and_claims_without_reading(
    m: Memory, defender: DefenderSimulator
) -> None:
    worker = m.services.worker()
    worker.process(adopt(m.services, machine_id=OTHER))  # warm the budgets' cache
    message = adopt(m.services)
    requests = m.state.requests + m.services.budgets.requests  # type: ignore[attr-defined]
    sent = len(m.work.sent)
    worker.process(message, "delivery-1")
    used = m.state.requests + m.services.budgets.requests - requests  # type: ignore[attr-defined]
    # two budget writes (the precheck's read, the offboard), the claim, the Submitted row with
    # its event, and the status check's message
    assert used + len(m.work.sent) - sent == 5
    assert record(m, message.request_id).status == Status.SUBMITTED
    assert len(defender.offboard_calls(MACHINE)) == 1


def test_a_cancel_before_the_claim_wins_and_nothing_is_called(m: Memory, defender: DefenderSimulator) -> None:
    message = adopt(m.services)
    answer = m.services.cancellations().cancel(message.request_id, "wrong device", Caller("agent:test"))
    assert answer.body["status"] == "Cancelled"
    m.services.worker().process(message, "delivery-1")  # its ETag is stale: it reads and stops
    assert defender.offboard_calls() == []
    assert events(m.services, message.request_id)[-1] == "Duplicate"


def test_a_redelivery_that_finds_its_own_claim_looks_before_calling_again(
    m: Memory, defender: DefenderSimulator
) -> None:
    message = adopt(m.services)
    # The first delivery claimed the row and reached Defender, then its process died.
    claimed_by_a_dead_delivery(m, message.request_id)
    action = defender.new_action(MACHINE, message.comment)
    m.services.worker().process(message, "delivery-1")  # the host delivers it again
    assert defender.offboard_calls() == []  # no second offboard call
    done = record(m, message.request_id)
    assert done.status == Status.SUBMITTED and done.action_id == action["id"]


def test_a_redelivery_whose_first_try_never_reached_defender_calls_once(
    m: Memory, defender: DefenderSimulator
) -> None:
    message = adopt(m.services)
    claimed_by_a_dead_delivery(m, message.request_id)
    m.services.worker().process(message, "delivery-1")
    assert len(defender.offboard_calls()) == 1
    assert record(m, message.request_id).status == Status.SUBMITTED


def test_an_offboard_that_timed_out_is_looked_for_before_it_is_sent_again(
    memory: Callable[..., Memory], defender: DefenderSimulator
) -> None:
    # Defender created the action but its answer came after the read timeout: the retry must
    # find that action and follow it, not offboard a second time.
    m = memory(DEFENDER_READ_TIMEOUT_SECONDS="0.2")
    defender.offboard_delay_seconds = 0.6
    message = adopt(m.services)
    worker = m.services.worker()
    worker.process(message, "delivery-1")
    [retry] = [s for s in m.work.sent if '"offboard"' in s.text]
    assert '"inDoubtSince"' in retry.text
    worker.handle(retry.text.encode(), "delivery-2")
    assert len(defender.offboard_calls(MACHINE)) == 1
    done = record(m, message.request_id)
    assert done.status == Status.SUBMITTED and done.action_id in defender.actions


def test_an_in_doubt_request_whose_lookup_is_never_allowed_ends_failed_without_calling(
    m: Memory, defender: DefenderSimulator
) -> None:
    from localdev.defender_sim import ACTION_LOOKUP

    message = adopt(m.services)
    claimed_by_a_dead_delivery(m, message.request_id)
    defender.script(ACTION_LOOKUP, *[Reply.error(403, "Forbidden")] * 5)
    worker = m.services.worker()
    worker.process(message, "delivery-1")
    for delivery in range(2, 6):  # OFFBOARD_MAX_ATTEMPTS is 3 here: it must end well before
        due = [s for s in m.work.sent if '"offboard"' in s.text]
        m.work.sent.clear()
        if not due:
            break
        worker.handle(due[-1].text.encode(), f"delivery-{delivery}")
    done = record(m, message.request_id)
    assert done.status == Status.FAILED and "Machine.Read.All" in (done.last_error_message or "")
    assert defender.offboard_calls() == []  # never called blindly


def test_requests_by_name_and_by_id_for_one_machine_are_one_request(
    m: Memory, defender: DefenderSimulator
) -> None:
    defender.add_machine(MACHINE, computer_dns_name="ws-0042.contoso.com")
    submissions = m.services.submissions(lambda r: r)
    by_id = submissions.submit(OffboardRequest(MACHINE, "by id"), Caller("agent:a")).body["requestId"]
    lookup = Lookup.of("deviceName", "ws-0042.contoso.com")
    by_name = submissions.submit(OffboardRequest(None, "by name", lookup), Caller("agent:b")).body[
        "requestId"
    ]
    worker = m.services.worker()
    [by_name_message] = [s for s in m.work.due() if by_name in s.text]
    worker.handle(by_name_message.text.encode(), "delivery-2")
    duplicate = record(m, by_name)
    assert duplicate.status == Status.REJECTED and duplicate.last_error_code == "DuplicateRequest"
    assert duplicate.duplicate_of == by_id and duplicate.machine_id == MACHINE
    assert defender.offboard_calls() == []  # the request by id offboards it, once


def test_a_duplicate_by_another_principal_is_refused_without_naming_their_request(
    m: Memory, defender: DefenderSimulator
) -> None:
    # With App Service authentication on, the intake never shows one principal another's
    # request (RequestByAnotherCaller); the worker's refusal must not show it either.
    defender.add_machine(MACHINE, computer_dns_name="ws-0042.contoso.com")
    submissions = m.services.submissions(lambda r: r)
    alice = Caller("alice@contoso.com", principal="alice-oid", scoped=True)
    bob = Caller("bob@contoso.com", principal="bob-oid", scoped=True)
    by_id = submissions.submit(OffboardRequest(MACHINE, "by id"), alice).body["requestId"]
    lookup = Lookup.of("deviceName", "ws-0042.contoso.com")
    by_name = submissions.submit(OffboardRequest(None, "by name", lookup), bob).body["requestId"]
    [by_name_message] = [s for s in m.work.due() if by_name in s.text]
    m.services.worker().handle(by_name_message.text.encode(), "delivery-2")
    duplicate = record(m, by_name)
    assert duplicate.status == Status.REJECTED and duplicate.last_error_code == "DuplicateRequest"
    assert duplicate.duplicate_of is None and by_id not in (duplicate.last_error_message or "")
    assert by_id not in str(duplicate.public())
    assert defender.offboard_calls() == []


def test_a_far_slot_re_queues_the_message_with_its_slot_and_marks_the_row(
    memory: Callable[..., Memory], defender: DefenderSimulator
) -> None:
    m = memory(DEFENDER_OFFBOARD_RATE_LIMITS="1/60", RATE_LIMIT_MAX_INLINE_WAIT_SECONDS="0")
    worker = m.services.worker()
    worker.process(adopt(m.services, machine_id=OTHER))  # spends the minute's only slot
    message = adopt(m.services)
    m.work.sent.clear()
    worker.process(message, "delivery-1")
    [paced] = m.work.bodies()
    waiting = record(m, message.request_id)
    assert paced["slotAt"] > 0 and paced["prechecked"] is True and paced["etag"] == waiting.etag
    assert waiting.status == Status.QUEUED and waiting.next_attempt_at and not waiting.untouched()
    assert len(defender.offboard_calls(MACHINE)) == 0


def test_a_check_that_finds_nothing_changed_writes_nothing(m: Memory, defender: DefenderSimulator) -> None:
    defender.action_progression = ["Pending"]  # an offline device: Pending for days
    worker = m.services.worker()
    message = adopt(m.services)
    worker.process(message)
    [first] = m.work.sent
    m.work.sent.clear()
    worker.handle(first.text.encode(), "check-1")  # Submitted -> Pending: a change, written
    assert record(m, message.request_id).status == Status.PENDING
    [second] = m.work.sent
    m.work.sent.clear()
    before = m.state.requests
    worker.handle(second.text.encode(), "check-2")  # still Pending
    assert m.state.requests == before  # no read, no write of the row
    assert [b["check"] for b in m.work.bodies()] == [3]


def test_a_retry_after_longer_than_the_window_is_capped_there(
    memory: Callable[..., Memory], defender: DefenderSimulator, caplog: pytest.LogCaptureFixture
) -> None:
    m = memory(DEFENDER_OFFBOARD_RATE_LIMITS="100/60,1500/3600")
    defender.script(MACHINE, Reply.error(429, "TooManyRequests", **{"Retry-After": "604800"}))
    message = adopt(m.services)
    m.services.worker().process(message)
    [retry] = m.work.sent
    assert retry.visible_at - m.work.clock() <= 3601  # an hour, not a week
    assert m.services.limiter.reserve("offboard") <= 3601  # and the shared back-off likewise
    assert "'604800'" in caplog.text and "longer than its longest rate-limit window" in caplog.text


def test_machines_offboarded_together_are_tagged_in_one_message(m: Memory) -> None:
    tagger = Tagger("Offboarded-by-automation", m.services.queue, gather_seconds=0.5)
    machines = [f"{i:040x}" for i in range(5)]
    threads = [
        threading.Thread(target=tagger.add, args=(mid, f"r{i}", None)) for i, mid in enumerate(machines)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    [message] = m.work.bodies()
    assert message["type"] == "tag" and sorted(message["machineIds"]) == machines


def test_a_poisoned_status_check_stops_the_follow_up_and_keeps_the_offboard(
    m: Memory, defender: DefenderSimulator
) -> None:
    worker = m.services.worker()
    message = adopt(m.services)
    worker.process(message)
    [check] = m.work.sent
    # The host gives up on the check after five deliveries (storage down, say): Defender has
    # the offboard, so the request keeps its status and only stops being followed.
    worker.give_up(check.text.encode(), "ServiceRequestError: storage down")
    after = record(m, message.request_id)
    assert after.status == Status.SUBMITTED and after.follow_up == "Stopped"
    assert events(m.services, message.request_id)[-1] == "FollowUpStopped"
    # An older attempt's offboard message, poisoned late, does not touch the request either.
    worker.give_up(message.to_json().encode(), "ServiceRequestError: storage down")
    assert record(m, message.request_id).status == Status.SUBMITTED
    assert len(defender.offboard_calls(MACHINE)) == 1


def test_a_redelivery_in_doubt_settles_before_it_takes_an_offboard_slot(
    memory: Callable[..., Memory], defender: DefenderSimulator
) -> None:
    m = memory(DEFENDER_OFFBOARD_RATE_LIMITS="2/60", RATE_LIMIT_MAX_INLINE_WAIT_SECONDS="0")
    worker = m.services.worker()
    worker.process(adopt(m.services, machine_id=OTHER))  # one of the minute's two slots
    message = adopt(m.services)
    # The first delivery claimed the row and reached Defender, then its process died; the
    # host delivers the message again (dequeue count 2).
    claimed_by_a_dead_delivery(m, message.request_id)
    action = defender.new_action(MACHINE, message.comment)
    worker.handle(message.to_json().encode(), "delivery-1", dequeue_count=2)
    done = record(m, message.request_id)
    assert done.status == Status.SUBMITTED and done.action_id == action["id"]
    assert defender.offboard_calls(MACHINE) == []
    # It spent no offboard slot: the minute's second one is still there for the next request.
    third = adopt(m.services, machine_id="3" * 40)
    worker.process(third)
    assert record(m, third.request_id).status == Status.SUBMITTED


def test_a_machine_guard_whose_request_is_still_being_accepted_is_waited_for_then_voided(
    m: Memory, defender: DefenderSimulator
) -> None:
    from shared.adapters.guards import ACCEPT_LEASE, machine_key
    from shared.domain import ids

    defender.add_machine(MACHINE, computer_dns_name="ws-0042.contoso.com")
    now = [datetime.now(UTC).timestamp()]
    m.services.guards._now = lambda: now[0]  # the guards' clock, moved by hand
    # Another request for the machine by id: its acceptor has taken the guard, not yet its row.
    accepting = ids.request_id(ids.new_batch_id(), 1)
    m.services.guards.take(machine_key(MACHINE), accepting, "acceptor-at-work")
    lookup = Lookup.of("deviceName", "ws-0042.contoso.com")
    by_name = m.services.submissions(lambda r: r).submit(
        OffboardRequest(None, "by name", lookup), Caller("agent:b")
    )
    worker = m.services.worker()
    [message] = [s for s in m.work.due() if by_name.body["requestId"] in s.text]
    worker.handle(message.text.encode(), "delivery-1")
    # Within the lease it waits: the other request may yet be written.
    [waiting] = m.work.sent
    assert 0 < waiting.visible_at - datetime.now(UTC).timestamp() <= ACCEPT_LEASE + 2
    assert defender.offboard_calls() == [] and record(m, by_name.body["requestId"]).status == Status.QUEUED
    # After it, the other id is voided (a slow acceptor can never write it) and this one goes on.
    now[0] += ACCEPT_LEASE + 1
    m.work.sent.clear()
    worker.handle(waiting.text.encode(), "delivery-2")
    assert m.services.store.get(accepting) is None
    assert m.services.store.void(accepting)  # still void: its acceptor's row can never land
    assert len(defender.offboard_calls(MACHINE)) == 1


def test_an_in_doubt_lookup_that_must_wait_keeps_its_action_read_slot(
    memory: Callable[..., Memory], defender: DefenderSimulator
) -> None:
    m = memory(DEFENDER_ACTION_READ_RATE_LIMITS="1/60", RATE_LIMIT_MAX_INLINE_WAIT_SECONDS="0")
    worker = m.services.worker()
    first, second = adopt(m.services, machine_id=OTHER), adopt(m.services)
    for message in (first, second):  # both claimed by deliveries that died mid-call
        claimed_by_a_dead_delivery(m, message.request_id)
    worker.handle(first.to_json().encode(), "delivery-1", dequeue_count=2)  # the minute's lookup
    m.work.sent.clear()
    worker.handle(second.to_json().encode(), "delivery-1", dequeue_count=2)
    [waiting] = m.work.bodies()
    held = waiting["actionSlotAt"]
    # Back from the queue before its slot: the same slot again, never a new one further out.
    m.work.sent.clear()
    worker.handle(json.dumps(waiting).encode(), "delivery-2")
    [again] = m.work.bodies()
    assert again["actionSlotAt"] == held and defender.offboard_calls(MACHINE) == []


def test_a_failure_before_the_claim_whose_poison_send_failed_is_poisoned_on_redelivery(
    m: Memory, defender: DefenderSimulator
) -> None:
    lookup = Lookup.of("deviceName", "nowhere.contoso.com")  # no such machine: DeviceNotFound
    message = adopt(m.services, machine_id=None, lookup=lookup)
    m.poison.fail_next = 1  # the row says Failed; then the poison send fails, and the host retries
    with pytest.raises(ConnectionError):
        m.services.worker().handle(message.to_json().encode(), "delivery-1")
    assert record(m, message.request_id).status == Status.FAILED and m.poison.sent == []
    m.services.worker().handle(message.to_json().encode(), "delivery-1", dequeue_count=2)
    [poisoned] = m.poison.bodies()
    assert poisoned["reason"]["code"] == "DeviceNotFound" and defender.offboard_calls() == []
