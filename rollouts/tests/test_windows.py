"""The maintenance-window cron matcher."""

import datetime as dt
import zoneinfo

import pytest

from rollouts.windows import Cron, CronError, window_at

BERLIN = zoneinfo.ZoneInfo("Europe/Berlin")


def test_the_next_window_opens_at_the_cron_time_in_the_campaign_time_zone():
    now = dt.datetime(2026, 3, 2, 12, 0, tzinfo=dt.UTC)  # a Monday
    start, end = window_at("30 2 * * 1-5", "Europe/Berlin", 90, now)
    assert start == dt.datetime(2026, 3, 3, 2, 30, tzinfo=BERLIN) and end - start == dt.timedelta(minutes=90)


def test_a_window_that_is_open_now_is_returned_rather_than_the_next_one():
    now = dt.datetime(2026, 3, 3, 1, 45, tzinfo=dt.UTC)  # 02:45 in Berlin
    start, _ = window_at("30 2 * * *", "Europe/Berlin", 60, now)
    assert start == dt.datetime(2026, 3, 3, 2, 30, tzinfo=BERLIN)


def test_weekends_steps_and_lists():
    now = dt.datetime(2026, 3, 2, 0, 0, tzinfo=dt.UTC)  # Monday
    start, _ = window_at("0 */6 * * 0,6", "UTC", 30, now)
    assert start == dt.datetime(2026, 3, 7, 0, 0, tzinfo=dt.UTC)  # Saturday 00:00
    cron = Cron.parse("15,45 8-10/2 1 * *")
    assert sorted(cron.minutes) == [15, 45] and sorted(cron.hours) == [8, 10]


def test_day_of_month_or_day_of_week_as_in_vixie_cron():
    cron = Cron.parse("0 0 13 * 5")  # the 13th, or any Friday
    assert cron.day_matches(dt.date(2026, 3, 13)) and cron.day_matches(dt.date(2026, 3, 6))
    assert not cron.day_matches(dt.date(2026, 3, 7))


@pytest.mark.parametrize("text", ["* * * *", "60 * * * *", "*/0 * * * *", "MON * * * *", "5-1 * * * *"])
def test_bad_expressions_are_refused_with_a_reason(text):
    with pytest.raises(CronError):
        Cron.parse(text)
