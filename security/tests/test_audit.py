import itertools

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from fleet import services
from security.audit import verify_chain
from security.models import AppendOnlyError, AuditEntry
from tests.factories import make_device

pytestmark = pytest.mark.django_db


def _some_history():
    device = make_device(status="pending")
    services.device_approve(actor="test", device=device, reason="ok")
    services.device_quarantine(actor="test", device=device, reason="suspicious")
    return device


def test_every_entry_is_chained_to_the_previous_one():
    _some_history()
    entries = list(AuditEntry.objects.order_by("id"))
    assert len(entries) == 3
    for before, after in itertools.pairwise(entries):
        assert after.prev_hash == before.hash
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
    second = AuditEntry.objects.order_by("id")[1]
    with connection.cursor() as cursor:
        cursor.execute("UPDATE security_auditentry SET data = '{\"reason\": \"forged\"}' WHERE id = %s", [second.id])
    with pytest.raises(CommandError, match=rf"broken at entry #{second.id}: content does not match"):
        call_command("audit_verify")


def test_audit_verify_notices_a_deleted_entry():
    _some_history()
    second = AuditEntry.objects.order_by("id")[1]
    with connection.cursor() as cursor:
        cursor.execute("DELETE FROM security_auditentry WHERE id = %s", [second.id])
    _checked, broken = verify_chain()
    assert broken is not None and broken.entry_id == second.id + 1
    assert "prev_hash" in broken.reason


def test_a_failed_change_leaves_no_audit_entry():
    device = make_device(status="active")
    before = AuditEntry.objects.count()
    with pytest.raises(Exception, match="cannot approve"):
        services.device_approve(actor="test", device=device)
    assert AuditEntry.objects.count() == before
