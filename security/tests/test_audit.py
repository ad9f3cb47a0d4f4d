import itertools

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from fleet import services
from security.audit import GENESIS, content_digest, link_digest, seal_pending, verify_chain
from security.models import AppendOnlyError, AuditEntry
from tests.factories import make_device

pytestmark = pytest.mark.django_db


def _some_history():
    device = make_device(status="pending")
    services.device_approve(actor="test", device=device, reason="ok")
    services.device_quarantine(actor="test", device=device, reason="suspicious")
    seal_pending()  # the test's transaction never commits: seal now what COMMIT would seal
    return device


def _sealed() -> list[AuditEntry]:
    return list(AuditEntry.objects.order_by("chain_seq"))


def test_an_entry_is_written_unsealed_and_joins_the_chain_when_its_transaction_commits():
    device = make_device(status="pending")
    entry = AuditEntry.objects.get(action="device.register")
    assert (entry.chain_seq, entry.prev_hash, entry.hash) == (None, None, None)
    assert entry.content_hash == content_digest(entry)
    seal_pending()
    entry.refresh_from_db()
    assert (entry.chain_seq, entry.prev_hash) == (1, GENESIS)
    assert entry.hash == link_digest(GENESIS, entry.content_hash)
    assert entry.target_id == str(device.pk)


def test_every_entry_is_chained_to_the_previous_one():
    _some_history()
    entries = _sealed()
    assert [e.chain_seq for e in entries] == [1, 2, 3]
    assert entries[0].prev_hash == GENESIS
    for before, after in itertools.pairwise(entries):
        assert after.prev_hash == before.hash
        assert after.hash == link_digest(before.hash, after.content_hash)
    assert verify_chain() == (3, None)


def test_audit_entries_cannot_be_changed_or_deleted_through_the_orm():
    _some_history()
    entry = AuditEntry.objects.first()
    entry.action = "nothing.happened"
    with pytest.raises(AppendOnlyError):
        entry.save()
    with pytest.raises(AppendOnlyError):
        entry.delete()
    with pytest.raises(AppendOnlyError):
        AuditEntry.objects.filter(pk=entry.pk).update(action="x")
    with pytest.raises(AppendOnlyError):
        AuditEntry.objects.all().delete()


def test_audit_verify_names_the_entry_edited_by_direct_sql(capsys):
    _some_history()
    call_command("audit_verify")
    assert "3 entries verified" in capsys.readouterr().out
    second = _sealed()[1]
    with connection.cursor() as cursor:
        cursor.execute("UPDATE security_auditentry SET data = '{\"reason\": \"forged\"}' WHERE id = %s", [second.id])
    with pytest.raises(CommandError, match=rf"broken at entry #{second.id}: content does not match"):
        call_command("audit_verify")


def test_audit_verify_notices_a_deleted_entry():
    _some_history()
    _first, second, third = _sealed()
    with connection.cursor() as cursor:
        cursor.execute("DELETE FROM security_auditentry WHERE id = %s", [second.id])
    _checked, broken = verify_chain()
    assert broken is not None and broken.entry_id == third.id
    assert "prev_hash" in broken.reason


def test_audit_verify_notices_the_last_entry_deleted_only_by_its_count_so_it_names_nothing():
    # Truncating the tail cannot be seen from the chain itself: the remaining prefix verifies.
    _some_history()
    last = _sealed()[-1]
    with connection.cursor() as cursor:
        cursor.execute("DELETE FROM security_auditentry WHERE id = %s", [last.id])
    assert verify_chain() == (2, None)


def test_audit_verify_notices_two_entries_swapped_in_the_chain():
    _some_history()
    _first, second, third = _sealed()
    with connection.cursor() as cursor:
        cursor.execute("UPDATE security_auditentry SET chain_seq = chain_seq + 1000000 WHERE id IN (%s, %s)",
                       [second.id, third.id])
        cursor.execute("UPDATE security_auditentry SET chain_seq = %s WHERE id = %s", [2, third.id])
        cursor.execute("UPDATE security_auditentry SET chain_seq = %s WHERE id = %s", [3, second.id])
    _checked, broken = verify_chain()
    assert broken is not None and broken.entry_id == third.id
    assert "reordered" in broken.reason


def test_audit_verify_notices_an_edit_even_when_the_forger_recomputes_the_content_hash():
    _some_history()
    second = _sealed()[1]
    with connection.cursor() as cursor:
        cursor.execute("UPDATE security_auditentry SET action = 'device.nothing' WHERE id = %s", [second.id])
    forged = AuditEntry.objects.get(pk=second.pk)
    with connection.cursor() as cursor:
        cursor.execute("UPDATE security_auditentry SET content_hash = %s WHERE id = %s", [content_digest(forged), second.id])
    _checked, broken = verify_chain()
    assert broken is not None and broken.entry_id == second.id
    assert "edited" in broken.reason


def test_audit_verify_notices_an_entry_taken_out_of_the_chain():
    _some_history()
    last = _sealed()[-1]
    with connection.cursor() as cursor:
        cursor.execute("UPDATE security_auditentry SET chain_seq = NULL WHERE id = %s", [last.id])
    _checked, broken = verify_chain()
    assert broken is not None and broken.entry_id == last.id
    assert "not in the chain" in broken.reason


def test_a_failed_change_leaves_no_audit_entry():
    device = make_device(status="active")
    before = AuditEntry.objects.count()
    with pytest.raises(Exception, match="cannot approve"):
        services.device_approve(actor="test", device=device)
    assert AuditEntry.objects.count() == before


@pytest.mark.django_db(transaction=True)
def test_the_chain_format_migration_rechains_old_entries_in_id_order_and_reverses():
    from django.db.migrations.executor import MigrationExecutor

    _some_history()
    ids = list(AuditEntry.objects.order_by("id").values_list("id", flat=True))
    executor = MigrationExecutor(connection)
    try:
        executor.migrate([("security", "0003_attestation")])  # reverse: the old format, in id order
        with connection.cursor() as cursor:
            cursor.execute("SELECT id, prev_hash, hash FROM security_auditentry ORDER BY id")
            old = cursor.fetchall()
        assert [row[0] for row in old] == ids
        assert old[0][1] == GENESIS and all(after[1] == before[2] for before, after in itertools.pairwise(old))
        with connection.cursor() as cursor:  # an entry written by the old code, after the chain
            cursor.execute("INSERT INTO security_auditentry (at, actor_type, actor, action, target_type, target_id, "
                           "target_repr, data, prev_hash, hash) VALUES (now(), 'system', 'old', 'old.entry', '', '', "
                           "'', '{}', %s, %s)", [old[-1][2], "f" * 64])
    finally:
        executor = MigrationExecutor(connection)
        executor.migrate(executor.loader.graph.leaf_nodes())

    entries = _sealed()
    assert [e.id for e in entries] == [*ids, entries[-1].id] and entries[-1].action == "old.entry"
    assert [e.chain_seq for e in entries] == [1, 2, 3, 4]
    assert verify_chain() == (4, None)
    services.device_approve(actor="test", device=make_device(status="pending"))  # the trigger is back
    assert AuditEntry.objects.filter(chain_seq__isnull=True).count() == 0
    assert verify_chain() == (AuditEntry.objects.count(), None) and AuditEntry.objects.count() > 4
