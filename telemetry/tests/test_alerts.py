"""Alert rules on rollups: open after the for-duration, stay open, resolve with hysteresis,
absence, webhook delivery with retries."""

from __future__ import annotations

import datetime as dt
import http.server
import threading

import pytest
from django.utils import timezone

from fleet import services as fleet_services
from security.models import AuditEntry
from telemetry import alerts, rollups, services
from telemetry.models import Alert, AlertState, RollupState
from telemetry.tasks import deliver_alert_webhook
from telemetry.tests.helpers import insert_points
from tests.factories import make_device

pytestmark = pytest.mark.django_db
T0 = dt.datetime(2030, 1, 1, 11, 0, tzinfo=dt.UTC)


def at(hh: int, mm: int, ss: int = 0) -> dt.datetime:
    return T0.replace(hour=hh, minute=mm, second=ss)


def minutes(device_id: int, first: dt.datetime, last: dt.datetime, value: float) -> None:
    rows, t = [], first
    while t <= last:
        rows += [(t + dt.timedelta(seconds=10), device_id, "cpu.temp", value),
                 (t + dt.timedelta(seconds=40), device_id, "cpu.temp", value)]
        t += dt.timedelta(minutes=1)
    insert_points(rows)


def tick(now: dt.datetime) -> None:
    rollups.refresh(now=now)
    alerts.evaluate_all(now=now)


def test_a_threshold_alert_opens_after_its_duration_stays_open_and_resolves_with_hysteresis():
    device, calm = make_device(), make_device()
    RollupState.objects.create(name="rollup", watermark=T0)
    rule = services.alert_rule_create(actor="test", name="hot", metric="cpu.temp", comparison=">", threshold=80,
                                      clear_threshold=70, for_duration_s=300, scope="all", severity="critical")
    minutes(device.id, at(11, 40), at(11, 49), 50)
    minutes(device.id, at(11, 50), at(11, 56), 90)
    minutes(calm.id, at(11, 40), at(11, 56), 20)

    tick(at(11, 55, 30))  # window 11:48–11:53: the breach is only 3 minutes old
    assert not Alert.objects.exists()

    tick(at(12, 0, 30))  # window 11:53–11:58: breaching all along
    alert = Alert.objects.get()
    assert (alert.device_id, alert.state, alert.last_value, alert.severity) == (device.id, "open", 90.0, "critical")
    assert AuditEntry.objects.filter(action="alert.open").count() == 1

    minutes(device.id, at(11, 57), at(12, 2), 75)  # below the threshold, above the clear threshold
    tick(at(12, 5, 30))
    alert.refresh_from_db()
    assert alert.state == "open"
    assert alert.last_value == 75.0
    assert Alert.objects.count() == 1  # opened once

    minutes(device.id, at(12, 3), at(12, 5), 60)
    tick(at(12, 8, 30))
    alert.refresh_from_db()
    assert alert.state == "resolved"
    assert alert.resolved_at == at(12, 8, 30)
    assert [h["state"] for h in alert.history] == ["open", "resolved"]
    assert Alert.objects.count() == 1
    assert rule.alerts.count() == 1


def test_an_acknowledged_alert_is_not_reopened_and_still_resolves():
    device = make_device()
    RollupState.objects.create(name="rollup", watermark=T0)
    services.alert_rule_create(actor="test", name="cold", metric="cpu.temp", comparison="<", threshold=0,
                               for_duration_s=120, scope="device", device=device)
    minutes(device.id, at(11, 50), at(11, 57), -5)
    tick(at(12, 0, 30))
    alert = services.alert_acknowledge(alert=Alert.objects.get(), actor="test", note="heater ordered")
    tick(at(12, 1, 30))
    assert list(Alert.objects.values_list("state", flat=True)) == [AlertState.ACKNOWLEDGED]
    minutes(device.id, at(11, 58), at(12, 1), 5)
    tick(at(12, 4, 30))
    alert.refresh_from_db()
    assert alert.state == "resolved"


def test_an_absence_rule_alerts_on_silent_devices_and_resolves_when_they_return():
    silent, chatty, never = make_device(), make_device(), make_device()
    now = timezone.now()
    fleet_services.presence_mark_seen(device_ids=[silent.id], at=now - dt.timedelta(minutes=20))
    fleet_services.presence_mark_seen(device_ids=[chatty.id], at=now - dt.timedelta(seconds=30))
    services.alert_rule_create(actor="test", name="silent", kind="absence", for_duration_s=600, scope="all")

    alerts.evaluate_all(now=now)
    assert list(Alert.objects.values_list("device_id", flat=True)) == [silent.id]
    alerts.evaluate_all(now=now)
    assert Alert.objects.count() == 1

    fleet_services.presence_mark_seen(device_ids=[silent.id], at=now)
    alerts.evaluate_all(now=now + dt.timedelta(seconds=5))
    assert Alert.objects.get().state == "resolved"
    assert not Alert.objects.filter(device=never).exists()


class FlakyHook(http.server.BaseHTTPRequestHandler):
    received: list[bytes] = []
    failures_left = 2

    def do_POST(self) -> None:
        FlakyHook.received.append(self.rfile.read(int(self.headers["Content-Length"])))
        if FlakyHook.failures_left > 0:
            FlakyHook.failures_left -= 1
            self.send_response(503)
        else:
            self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hook_url():
    FlakyHook.received, FlakyHook.failures_left = [], 2
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FlakyHook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()


def test_the_webhook_is_sent_after_commit_and_retried_until_it_is_accepted(hook_url, django_capture_on_commit_callbacks,
                                                                           monkeypatch):
    device = make_device()
    rule = services.alert_rule_create(actor="test", name="hook", kind="absence", for_duration_s=60, scope="all",
                                      webhook_url=hook_url)
    sent = []
    monkeypatch.setattr(deliver_alert_webhook, "delay", lambda *args: sent.append(args))
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        alert = services.alert_open(rule=rule, device_id=device.id, value=None)
    assert sent == []  # nothing before the commit
    assert len(callbacks) == 1
    callbacks[0]()
    assert sent == [(alert.id, "open")]

    result = deliver_alert_webhook.apply(args=[alert.id, "open"])  # eager: retries run inline
    assert result.successful()
    assert len(FlakyHook.received) == 3
    assert b'"event": "open"' in FlakyHook.received[-1]
    assert device.uid.encode() in FlakyHook.received[-1]


def test_rule_validation_gives_readable_errors():
    from fleet.errors import InvalidInput

    with pytest.raises(InvalidInput, match="needs a metric"):
        services.alert_rule_create(actor="test", name="x", kind="threshold", scope="all")
    with pytest.raises(InvalidInput, match="safe side"):
        services.alert_rule_create(actor="test", name="x", metric="m", comparison=">", threshold=10,
                                   clear_threshold=20, scope="all")
