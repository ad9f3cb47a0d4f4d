"""Small template helpers: times in the operator's time zone, numbers with separators."""

from __future__ import annotations

import datetime as dt

from django import template
from django.utils import timezone
from django.utils.html import format_html

register = template.Library()


@register.simple_tag
def ts(value: dt.datetime | None, empty: str = "never") -> str:
    """A <time> the page's script rewrites into the browser's time zone (UTC until then)."""
    if value is None:
        return format_html('<span class="muted">{}</span>', empty)
    utc = value.astimezone(dt.UTC)
    return format_html('<time datetime="{}" title="{} UTC">{} UTC</time>', utc.isoformat(),
                       utc.strftime("%Y-%m-%d %H:%M:%S"), utc.strftime("%Y-%m-%d %H:%M"))


@register.simple_tag
def ago(value: dt.datetime | None, empty: str = "never") -> str:
    if value is None:
        return format_html('<span class="muted">{}</span>', empty)
    seconds = max(0, int((timezone.now() - value).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            text = f"{seconds // size} {unit} ago"
            break
    else:
        text = f"{seconds} s ago"
    utc = value.astimezone(dt.UTC)
    return format_html('<time datetime="{}" data-relative="1" title="{} UTC">{}</time>', utc.isoformat(),
                       utc.strftime("%Y-%m-%d %H:%M:%S"), text)


@register.filter
def num(value: int | float | None) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.1f}"
    return f"{value:,}"


@register.filter
def get(mapping: dict, key: str):
    return (mapping or {}).get(key)


@register.filter
def pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}" if whole else "0"


@register.filter
def duration(seconds: float | None) -> str:
    """A span of time in its two largest units: 3 d 4 h, 2 h 5 min, 40 s."""
    if seconds is None:
        return "—"
    seconds = max(0, int(seconds))
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if seconds >= size or (unit == "s" and not parts):
            parts.append(f"{seconds // size} {unit}")
            seconds %= size
        if len(parts) == 2:
            break
    return " ".join(parts)
