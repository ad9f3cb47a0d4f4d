"""The audit log under concurrent transactions: real connections, one per thread, committed for real.

The chain is sealed at COMMIT (a deferred constraint trigger takes the audit lock last), so a
transaction never waits for the audit lock while holding row locks another audited transaction needs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from django.db import close_old_connections, connection, transaction

from fleet import audit, services
from fleet.models import Device
from security.audit import verify_chain
from security.models import AuditEntry
from tests.factories import make_device

pytestmark = pytest.mark.django_db(transaction=True)

STEP = 20  # seconds any single step may wait for the other thread before the test gives up


def _run_in_threads(*bodies: Callable[[], None]) -> list[BaseException | None]:
    """Run each body in its own thread (own DB connection); return what each raised, if anything."""
    errors: list[BaseException | None] = [None] * len(bodies)

    def runner(i: int, body: Callable[[], None]) -> None:
        try:
            body()
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            errors[i] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=runner, args=(i, b), daemon=True) for i, b in enumerate(bodies)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=3 * STEP)
        assert not t.is_alive(), "a transaction hung"
    close_old_connections()
    return errors


def _bounded_waits() -> None:
    with connection.cursor() as cursor:  # a lost wake-up fails the test instead of hanging it
        cursor.execute(f"SET LOCAL lock_timeout = '{STEP}s'")


def _wait(event: threading.Event) -> None:
    assert event.wait(STEP), "the other transaction never reached its step"


class Abort(Exception):
    pass


def _record_then_roll_back(action: str, before_rollback: Callable[[], None] = lambda: None) -> None:
    with transaction.atomic():
        audit.record(actor="test", action=action)
        before_rollback()
        raise Abort


def test_a_row_lock_then_audit_and_an_audit_then_row_lock_both_commit_without_deadlock():
    device = make_device(name="before")
    row_locked, audited_first = threading.Event(), threading.Event()

    def locks_the_device_then_audits() -> None:
        with transaction.atomic():
            _bounded_waits()
            locked = Device.objects.select_for_update().get(pk=device.pk)
            row_locked.set()
            _wait(audited_first)
            audit.record(actor="t1", action="test.t1", target=locked)

    def audits_then_updates_the_device() -> None:
        _wait(row_locked)
        with transaction.atomic():
            _bounded_waits()
            audit.record(actor="t2", action="test.t2", target=device)
            audited_first.set()
            services.device_update(actor="t2", device=device, name="after")  # waits for T1's row lock

    errors = _run_in_threads(locks_the_device_then_audits, audits_then_updates_the_device)

    assert errors == [None, None]
    assert Device.objects.get(pk=device.pk).name == "after"
    assert set(AuditEntry.objects.values_list("action", flat=True)) >= {"test.t1", "test.t2", "device.update"}
    assert verify_chain()[1] is None


def test_the_chain_follows_commit_order_not_insert_order():
    first_inserted, second_committed = threading.Event(), threading.Event()

    def inserts_first_commits_last() -> None:
        with transaction.atomic():
            audit.record(actor="early", action="test.inserted_first")
            first_inserted.set()
            _wait(second_committed)

    def inserts_second_commits_first() -> None:
        _wait(first_inserted)
        with transaction.atomic():
            audit.record(actor="late", action="test.inserted_second")
        second_committed.set()

    errors = _run_in_threads(inserts_first_commits_last, inserts_second_commits_first)

    assert errors == [None, None]
    early = AuditEntry.objects.get(action="test.inserted_first")
    late = AuditEntry.objects.get(action="test.inserted_second")
    assert early.id < late.id  # inserted first ...
    assert late.chain_seq < early.chain_seq  # ... but committed, so chained, second
    assert early.prev_hash == late.hash
    assert verify_chain() == (AuditEntry.objects.count(), None)


def test_a_rolled_back_transaction_leaves_no_entry_and_no_gap_in_the_chain():
    audit.record(actor="test", action="test.before")
    with pytest.raises(Abort):
        _record_then_roll_back("test.rolled_back")
    audit.record(actor="test", action="test.after")

    assert not AuditEntry.objects.filter(action="test.rolled_back").exists()
    seqs = list(AuditEntry.objects.order_by("chain_seq").values_list("chain_seq", flat=True))
    assert seqs == list(range(1, len(seqs) + 1))
    before, after = (AuditEntry.objects.get(action=a) for a in ("test.before", "test.after"))
    assert after.chain_seq == before.chain_seq + 1 and after.prev_hash == before.hash
    assert verify_chain() == (2, None)


def test_a_transaction_rolled_back_while_another_commits_leaves_no_gap():
    inserted, other_committed = threading.Event(), threading.Event()

    def inserts_then_rolls_back() -> None:
        def meanwhile() -> None:
            inserted.set()
            _wait(other_committed)

        with pytest.raises(Abort):
            _record_then_roll_back("test.rolled_back", meanwhile)

    def commits_meanwhile() -> None:
        _wait(inserted)
        with transaction.atomic():
            audit.record(actor="test", action="test.committed")
        other_committed.set()

    assert _run_in_threads(inserts_then_rolls_back, commits_meanwhile) == [None, None]
    audit.record(actor="test", action="test.after")

    assert list(AuditEntry.objects.order_by("chain_seq").values_list("action", "chain_seq")) == [
        ("test.committed", 1), ("test.after", 2)]
    assert verify_chain() == (2, None)
