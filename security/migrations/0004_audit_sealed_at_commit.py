"""Seal audit entries into the chain at COMMIT, in commit order (chain format v2).

Before: `record_entry` took the audit advisory lock when a service called it and wrote
hash = SHA-256(prev_hash + canonical JSON) in id order, so a transaction could hold the audit lock
while waiting for a row lock another audited transaction held -> deadlock.
Now: an entry stores content_hash = SHA-256(canonical JSON); a deferred constraint trigger takes
the lock at commit and sets chain_seq, prev_hash and hash = SHA-256(prev_hash + content_hash).
Existing entries are re-chained here in id order in the new format (reversible: the reverse
re-chains them in the old format).
"""

import hashlib

from django.db import migrations, models

from security.audit import GENESIS, LOCK_KEY, SEAL_TRIGGER, canonical_content, content_digest, link_digest

BATCH = 2000

CREATE_SEAL = f"""
CREATE FUNCTION {SEAL_TRIGGER}() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    last_seq bigint;
    last_hash varchar(64);
BEGIN
    -- Runs at COMMIT (deferred), after every row lock this transaction takes: the audit lock is last.
    PERFORM pg_advisory_xact_lock({LOCK_KEY});
    SELECT chain_seq, hash INTO last_seq, last_hash
      FROM security_auditentry WHERE chain_seq IS NOT NULL ORDER BY chain_seq DESC LIMIT 1;
    IF last_seq IS NULL THEN
        last_seq := 0;
        last_hash := '{GENESIS}';
    END IF;
    UPDATE security_auditentry
       SET chain_seq = last_seq + 1,
           prev_hash = last_hash,
           hash = encode(sha256(convert_to(last_hash || NEW.content_hash, 'UTF8')), 'hex')
     WHERE id = NEW.id;
    RETURN NULL;
END
$$;
CREATE CONSTRAINT TRIGGER {SEAL_TRIGGER} AFTER INSERT ON security_auditentry
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {SEAL_TRIGGER}();
"""  # noqa: S608 - built from module constants only

DROP_SEAL = f"""
DROP TRIGGER IF EXISTS {SEAL_TRIGGER} ON security_auditentry;
DROP FUNCTION IF EXISTS {SEAL_TRIGGER}();
"""


def _in_id_order(AuditEntry):
    last_id = 0
    while True:
        chunk = list(AuditEntry.objects.filter(id__gt=last_id).order_by("id")[:BATCH])
        if not chunk:
            return
        yield chunk
        last_id = chunk[-1].id


def rechain_v2(apps, schema_editor):
    AuditEntry = apps.get_model("security", "AuditEntry")
    prev, seq = GENESIS, 0
    for chunk in _in_id_order(AuditEntry):
        for entry in chunk:
            seq += 1
            entry.content_hash = content_digest(entry)
            entry.chain_seq, entry.prev_hash = seq, prev
            entry.hash = prev = link_digest(prev, entry.content_hash)
        AuditEntry.objects.bulk_update(chunk, ["content_hash", "chain_seq", "prev_hash", "hash"])


def rechain_v1(apps, schema_editor):
    AuditEntry = apps.get_model("security", "AuditEntry")
    prev = GENESIS
    for chunk in _in_id_order(AuditEntry):
        for entry in chunk:
            entry.prev_hash = prev
            entry.hash = prev = hashlib.sha256((prev + canonical_content(entry)).encode()).hexdigest()
        AuditEntry.objects.bulk_update(chunk, ["prev_hash", "hash"])


class Migration(migrations.Migration):

    dependencies = [
        ("security", "0003_attestation"),
    ]

    operations = [
        migrations.AddField(
            model_name="auditentry",
            name="content_hash",
            field=models.CharField(default="", editable=False, max_length=64),
            preserve_default=False,
        ),
        migrations.AddField(
            model_name="auditentry",
            name="chain_seq",
            field=models.PositiveBigIntegerField(blank=True, editable=False, null=True, unique=True),
        ),
        migrations.AlterField(
            model_name="auditentry",
            name="prev_hash",
            field=models.CharField(blank=True, editable=False, max_length=64, null=True),
        ),
        migrations.AlterField(
            model_name="auditentry",
            name="hash",
            field=models.CharField(blank=True, editable=False, max_length=64, null=True, unique=True),
        ),
        migrations.RunPython(rechain_v2, rechain_v1, elidable=False),
        migrations.RunSQL(CREATE_SEAL, DROP_SEAL),
    ]
