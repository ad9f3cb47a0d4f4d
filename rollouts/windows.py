"""Maintenance windows: a 5-field cron expression (when a window opens) in an IANA time
zone, plus a duration. No cron library is installed, so this is a small matcher of our own.

Fields: minute hour day-of-month month day-of-week (0 or 7 = Sunday). Each field takes `*`,
numbers, ranges `a-b`, steps `*/n` and `a-b/n`, and comma lists. As in Vixie cron, when both
day-of-month and day-of-week are restricted a day matching either one matches.
Names (MON, JAN), `L`, `W`, `#` and seconds are not supported.
"""

from __future__ import annotations

import datetime as dt
import zoneinfo
from dataclasses import dataclass

_RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]
_NAMES = ["minute", "hour", "day of month", "month", "day of week"]


class CronError(ValueError):
    pass


def _field(text: str, lo: int, hi: int, what: str) -> tuple[frozenset[int], bool]:
    values: set[int] = set()
    for part in text.split(","):
        step = 1
        if "/" in part:
            part, step_text = part.split("/", 1)
            if not step_text.isdigit() or int(step_text) == 0:
                raise CronError(f"{what}: step must be a positive number, not {step_text!r}")
            step = int(step_text)
        if part == "*":
            start, end = lo, hi
        elif "-" in part:
            a, b = part.split("-", 1)
            if not (a.isdigit() and b.isdigit()):
                raise CronError(f"{what}: bad range {part!r}")
            start, end = int(a), int(b)
        elif part.isdigit():
            start = end = int(part)
            if step != 1:
                end = hi
        else:
            raise CronError(f"{what}: expected *, a number or a range, not {part!r}")
        if not (lo <= start <= hi and lo <= end <= hi and start <= end):
            raise CronError(f"{what}: {part!r} is outside {lo}-{hi}")
        values.update(range(start, end + 1, step))
    return frozenset(values), text == "*"


@dataclass(frozen=True)
class Cron:
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    days_any: bool
    weekdays_any: bool

    @classmethod
    def parse(cls, text: str) -> Cron:
        parts = text.split()
        if len(parts) != 5:
            raise CronError("a cron expression has 5 fields: minute hour day-of-month month day-of-week")
        fields = [_field(p, lo, hi, name) for p, (lo, hi), name in zip(parts, _RANGES, _NAMES, strict=True)]
        weekdays = frozenset(d % 7 for d in fields[4][0])
        return cls(fields[0][0], fields[1][0], fields[2][0], fields[3][0], weekdays, fields[2][1], fields[4][1])

    def day_matches(self, day: dt.date) -> bool:
        if day.month not in self.months:
            return False
        dom = day.day in self.days
        dow = (day.isoweekday() % 7) in self.weekdays
        if self.days_any or self.weekdays_any:
            return dom and dow
        return dom or dow

    def next_fire(self, after: dt.datetime, tz: zoneinfo.ZoneInfo, *, max_days: int = 400) -> dt.datetime | None:
        """First fire time >= `after` (aware), computed on the local wall clock of `tz`."""
        local = after.astimezone(tz)
        day = local.date()
        for offset in range(max_days):
            date = day + dt.timedelta(days=offset)
            if not self.day_matches(date):
                continue
            for hour in sorted(self.hours):
                for minute in sorted(self.minutes):
                    fire = dt.datetime(date.year, date.month, date.day, hour, minute, tzinfo=tz)
                    if fire >= after:
                        return fire
        return None


def validate(cron: str, tz: str, duration_min: int) -> None:
    if not cron:
        return
    Cron.parse(cron)
    try:
        zoneinfo.ZoneInfo(tz)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise CronError(f"{tz!r} is not an IANA time zone (e.g. Europe/Berlin)") from None
    if duration_min <= 0:
        raise CronError("a maintenance window needs a duration in minutes")


def window_at(cron: str, tz: str, duration_min: int, now: dt.datetime) -> tuple[dt.datetime, dt.datetime] | None:
    """The window open now, or else the next one: (start, end). None without a window."""
    if not cron or duration_min <= 0:
        return None
    zone = zoneinfo.ZoneInfo(tz)
    duration = dt.timedelta(minutes=duration_min)
    start = Cron.parse(cron).next_fire(now - duration, zone)
    if start is None:
        return None
    return start, start + duration
