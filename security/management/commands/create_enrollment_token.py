"""manage.py create_enrollment_token — prints a new enrollment token on its last line."""

from __future__ import annotations

import re
from datetime import timedelta

from django.core.management.base import BaseCommand, CommandError

from fleet.errors import DomainError
from fleet.models import Site
from security.services import enrollment_token_create

_DURATION = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_duration(text: str) -> timedelta:
    match = _DURATION.match(text.strip())
    if not match:
        raise CommandError(f"bad duration {text!r}: use a number and a unit, e.g. 90s, 30m, 12h, 7d, 2w")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


class Command(BaseCommand):
    help = "Create an enrollment token for new devices; the secret is printed once, on the last line."

    def add_arguments(self, parser):
        parser.add_argument("--auto-approve", action="store_true", help="devices enrolled with it start active")
        parser.add_argument("--site", help="site slug given to devices enrolled with it")
        parser.add_argument("--uses", type=int, default=1, help="how many devices may enroll with it (default 1)")
        parser.add_argument("--expires-in", default="24h", help="lifetime, e.g. 30m, 12h, 7d (default 24h)")
        parser.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                            help="label given to devices enrolled with it (repeatable)")
        parser.add_argument("--name", default="", help="a note to recognise the token by")

    def handle(self, *args, **opts):
        site = None
        if opts["site"]:
            site = Site.objects.filter(slug=opts["site"]).first()
            if site is None:
                raise CommandError(f"no site with slug {opts['site']!r}")
        labels = {}
        for item in opts["label"]:
            key, sep, value = item.partition("=")
            if not sep:
                raise CommandError(f"bad --label {item!r}: use KEY=VALUE")
            labels[key] = value
        try:
            token, secret = enrollment_token_create(
                actor="cli:create_enrollment_token", expires_in=parse_duration(opts["expires_in"]),
                max_uses=opts["uses"], name=opts["name"], site=site, labels=labels, auto_approve=opts["auto_approve"],
            )
        except DomainError as exc:
            raise CommandError(exc.message) from None
        self.stderr.write(
            f"Enrollment token {token.prefix}… for {token.max_uses} device(s), expires {token.expires_at:%Y-%m-%d %H:%M} UTC"
            f"{', auto-approve' if token.auto_approve else ''}:"
        )
        self.stdout.write(secret)
