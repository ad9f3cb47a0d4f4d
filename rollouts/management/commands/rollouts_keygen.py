"""manage.py rollouts_keygen [--inactive] — add an artifact signing key to the keyring.

By default the new key becomes the active signer (rotation); older keys keep verifying."""

from django.core.management.base import BaseCommand

from rollouts import services


class Command(BaseCommand):
    help = "Create an Ed25519 artifact signing key (active unless --inactive) and print its key id."

    def add_arguments(self, parser):
        parser.add_argument("--inactive", action="store_true", help="add the key without making it the signer")

    def handle(self, *args, **opts):
        key = services.signing_key_create(actor="cli:rollouts_keygen", activate=not opts["inactive"])
        self.stderr.write(f"Created signing key ({'inactive' if opts['inactive'] else 'active'}):")
        self.stdout.write(key.key_id)
