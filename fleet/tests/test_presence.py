import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from fleet import services
from fleet.models import Device, PresenceEvent
from fleet.tasks import prune_presence, sweep_presence
from tests.factories import make_device

pytestmark = pytest.mark.django_db


def test_the_sweep_marks_devices_offline_whose_connection_died_silently(settings):
    settings.FLEET_OFFLINE_AFTER_S = 90
    quiet, chatty = make_device(), make_device()
    services.presence_connected(device_id=quiet.id, session="a")
    services.presence_connected(device_id=chatty.id, session="b")
    Device.objects.filter(pk=quiet.pk).update(last_seen=timezone.now() - timedelta(seconds=91))
    assert sweep_presence() == 1
    assert not Device.objects.get(pk=quiet.pk).online
    assert Device.objects.get(pk=chatty.pk).online


def test_heartbeats_are_written_for_many_devices_in_one_statement(django_assert_num_queries):
    devices = [make_device() for _ in range(50)]
    with django_assert_num_queries(1):
        services.presence_mark_seen(device_ids=[d.id for d in devices])
    assert Device.objects.filter(online=True).count() == 50


def test_a_replaced_connection_closing_late_does_not_mark_its_successor_offline():
    device = make_device()
    services.presence_connected(device_id=device.id, session="old")
    services.presence_connected(device_id=device.id, session="new")
    services.presence_disconnected(device_id=device.id, session="old")
    assert Device.objects.get(pk=device.pk).online
    services.presence_disconnected(device_id=device.id, session="new")
    assert not Device.objects.get(pk=device.pk).online


def history(device) -> list[tuple[str, str]]:
    return [(e.kind, e.session) for e in PresenceEvent.objects.filter(device=device).order_by("at", "id")]


def test_presence_history_records_connects_real_disconnects_and_time_outs(settings):
    settings.FLEET_OFFLINE_AFTER_S = 90
    device = make_device()
    services.presence_connected(device_id=device.id, session="old")
    services.presence_connected(device_id=device.id, session="new")
    services.presence_disconnected(device_id=device.id, session="old")  # replaced: no change, no entry
    services.presence_mark_seen(device_ids=[device.id])  # heartbeats are not history
    Device.objects.filter(pk=device.pk).update(last_seen=timezone.now() - timedelta(seconds=91))
    assert sweep_presence() == 1
    assert history(device) == [("connected", "old"), ("connected", "new"), ("timed_out", "")]


def test_the_sweep_writes_the_history_of_many_devices_in_a_fixed_number_of_statements(django_assert_num_queries):
    devices = [make_device() for _ in range(40)]
    for d in devices:
        services.presence_connected(device_id=d.id, session="s")
    Device.objects.update(last_seen=timezone.now() - timedelta(hours=1))
    with django_assert_num_queries(4):  # savepoint, UPDATE … RETURNING, one INSERT, release
        assert services.presence_sweep(older_than_s=90) == 40
    assert PresenceEvent.objects.filter(kind="timed_out").count() == 40


def test_presence_history_older_than_the_retention_is_pruned(settings):
    settings.FLEET_PRESENCE_HISTORY_DAYS = 30
    device = make_device()
    services.presence_connected(device_id=device.id, session="a")
    PresenceEvent.objects.create(device=device, kind="disconnected", at=timezone.now() - timedelta(days=31))
    assert prune_presence() == 1
    assert history(device) == [("connected", "a")]


def test_the_agent_stub_never_imports_django():
    code = ("import sys, agent_stub.client, agent_stub.simulate, agent_stub.outbox, agent_stub.protocol; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('django', 'rest_framework', 'channels', 'fleet', 'security', 'telemetry', 'rollouts', 'console')); "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stdout + result.stderr
