"""manage.py create_operator USERNAME --role viewer|operator|admin — prints an API token."""

from django.core.management.base import BaseCommand, CommandError

from fleet.errors import DomainError
from security.roles import ROLES
from security.services import operator_upsert


class Command(BaseCommand):
    help = "Create or update an operator with a role and print their API token on the last line."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--role", required=True, choices=ROLES)
        parser.add_argument("--email", default="")
        parser.add_argument("--password", help="set a password for browser login (default: API token only)")

    def handle(self, *args, **opts):
        try:
            user, token, created = operator_upsert(
                actor="cli:create_operator", username=opts["username"], role=opts["role"],
                email=opts["email"], password=opts["password"],
            )
        except DomainError as exc:
            raise CommandError(exc.message) from None
        verb = "Created" if created else "Updated"
        self.stderr.write(f"{verb} {opts['role']} {user.username}. API token:")
        self.stdout.write(token)
