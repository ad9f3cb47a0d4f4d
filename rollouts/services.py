"""Every state change of rollouts: keyring, artifacts, campaigns, executions. Keyword-only,
atomic, audited; side effects (doorbells, orchestrator kicks) only after commit.

Contracts used by the agent connection (console/agent_consumer.py):
- `execution_report(device_id=, report=)` applies a device's `rollout.status` inside the
  frame's transaction. A report naming an unknown execution or another device's raises
  `UnknownExecution` (the connection turns it into a refusal in the frame's ack); stale or
  out-of-order states of the device's own executions are ignored (logged): states only move
  forward, and a late report is legitimate.
- `pending_offers(device_id=)` returns the `rollout.offer` frames a device should (re)receive
  when it connects, with fresh download URLs.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import semver
from django.core import signing as dj_signing
from django.core.files.base import File
from django.db import connection, transaction
from django.urls import reverse
from django.utils import timezone

from agent_stub import protocol as p
from fleet import audit, push
from fleet import services as fleet_services
from fleet.errors import Conflict, DomainError, InvalidInput
from fleet.models import Device, DeviceGroup, DeviceStatus
from fleet.selector import compile_selector
from rollouts import conf, gates, windows
from rollouts import signing as keyring
from rollouts.models import Artifact, ArtifactVariant, Campaign, Execution, Kind, SigningKey

log = logging.getLogger(__name__)

S = Execution.State
CS = Campaign.State

# States a device moves through after an offer, in order: reports only move forward.
RANK = {S.PENDING: 0, S.OFFERED: 1, S.ACKED: 2, S.DOWNLOADING: 3, S.DOWNLOADED: 4, S.INSTALLING: 5,
        S.VERIFYING: 6}
LIVE = (S.OFFERED, S.ACKED, S.DOWNLOADING, S.DOWNLOADED, S.INSTALLING, S.VERIFYING)
REOFFER = (S.OFFERED, S.ACKED, S.DOWNLOADING, S.DOWNLOADED)  # an agent that reconnects gets these again
DEVICE_FINAL = (S.COMMITTED, S.FAILED, S.ROLLED_BACK, S.REJECTED)
SERVER_FINAL = (S.TIMED_OUT, S.CANCELED)  # decided here; a late final outcome from the device still counts
SKIPPED = (S.INCOMPATIBLE, S.PINNED, S.SUPERSEDED)
GATE_RECHECK_S = 60
BUSY_RECHECK_S = 30


class TooLarge(DomainError):
    status = 413
    code = "too_large"


class UnknownExecution(DomainError):
    """A `rollout.status` naming no execution of the reporting device. One message for an
    unknown id and another device's: the answer must not tell a device which ids exist."""

    status = 404
    code = "unknown_execution"


# --- keyring ----------------------------------------------------------------------------

@transaction.atomic
def signing_key_create(*, actor: Any, activate: bool = True) -> SigningKey:
    """A new keyring key. Activating it retires the previous active key (which still verifies)."""
    key_id, public, encrypted = keyring.generate()
    now = timezone.now()
    if activate:
        SigningKey.objects.filter(active=True).update(active=False, retired_at=now)
    key = SigningKey.objects.create(key_id=key_id, public_key=public, private_key_encrypted=encrypted,
                                    active=activate)
    audit.record(actor=actor, action="rollouts.key.create", target=key, data={"key_id": key_id, "active": activate})
    return key


@transaction.atomic
def signing_key_activate(*, actor: Any, key: SigningKey) -> SigningKey:
    key = SigningKey.objects.select_for_update().get(pk=key.pk)
    if key.revoked_at:
        raise Conflict(f"key {key.key_id} is revoked and cannot sign again")
    now = timezone.now()
    SigningKey.objects.filter(active=True).exclude(pk=key.pk).update(active=False, retired_at=now)
    key.active, key.retired_at = True, None
    key.save(update_fields=["active", "retired_at"])
    audit.record(actor=actor, action="rollouts.key.activate", target=key, data={"key_id": key.key_id})
    return key


@transaction.atomic
def signing_key_revoke(*, actor: Any, key: SigningKey, reason: str) -> SigningKey:
    """A revoked key neither signs nor verifies; artifacts it signed must be re-signed."""
    if not reason:
        raise InvalidInput("a reason is required to revoke a signing key")
    key = SigningKey.objects.select_for_update().get(pk=key.pk)
    key.active = False
    key.revoked_at = key.revoked_at or timezone.now()
    key.save(update_fields=["active", "revoked_at"])
    audit.record(actor=actor, action="rollouts.key.revoke", target=key, data={"key_id": key.key_id, "reason": reason})
    return key


def active_signing_key() -> SigningKey:
    """The key that signs new manifests; the first one is created on first need (audited)."""
    key = SigningKey.objects.filter(active=True).first()
    if key is not None:
        return key
    with transaction.atomic():
        # One creator at a time; the loser of the race finds the winner's key.
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [0x726B6579])  # "rkey"
        key = SigningKey.objects.filter(active=True).first()
        return key or signing_key_create(actor="system:auto-keygen", activate=True)


# --- artifacts --------------------------------------------------------------------------

class _HashingFile(File):
    """Feeds SHA-256 and the byte count while storage streams the upload to disk: one pass,
    never the whole file in memory. (Hides `temporary_file_path` on purpose so storage
    copies through `chunks()` instead of moving the temp file unseen.)"""

    def __init__(self, upload: Any) -> None:
        super().__init__(upload, name=getattr(upload, "name", None))
        self.digest = hashlib.sha256()
        self.count = 0

    def chunks(self, chunk_size: int | None = None):
        self.file.seek(0)
        while True:
            chunk = self.file.read(chunk_size or self.DEFAULT_CHUNK_SIZE)
            if not chunk:
                return
            self.digest.update(chunk)
            self.count += len(chunk)
            yield chunk

    def __iter__(self):
        return self.chunks()


@dataclass
class VariantUpload:
    name: str
    tiers: list[int]
    file: Any  # an UploadedFile or any file object with a name


def _clean_version(version: str) -> str:
    try:
        return str(semver.Version.parse(version))
    except (ValueError, TypeError):
        raise InvalidInput(f"version {version!r} is not semantic versioning (e.g. 1.4.0 or 2.0.0-rc.1)") from None


def _clean_tiers(tiers: Iterable[Any], what: str) -> list[int]:
    out = sorted({int(t) for t in tiers})
    if not out or any(t not in (1, 2, 3) for t in out):
        raise InvalidInput(f"{what}: tiers are 1, 2 or 3")
    return out


@transaction.atomic
def artifact_create(*, actor: Any, name: str, kind: str, version: str, variants: list[VariantUpload],
                    hardware_models: list[str] | None = None, accelerators: list[str] | None = None,
                    min_tier: int = 3, description: str = "") -> Artifact:
    """Store an artifact's files, hash them while streaming, and sign one manifest per variant.

    One variant without tiers serves every tier up to `min_tier`. Tiers no variant serves
    are incompatible (e.g. tier 1 full, tier 2 quantized, tier 3 nothing)."""
    if kind not in Kind.values:
        raise InvalidInput(f"kind must be one of {', '.join(Kind.values)}")
    if not name or len(name) > 100:
        raise InvalidInput("an artifact needs a name of at most 100 characters")
    version = _clean_version(version)
    if min_tier not in (1, 2, 3):
        raise InvalidInput("min_tier is 1, 2 or 3")
    if not variants:
        raise InvalidInput("an artifact needs at least one file")
    if Artifact.objects.filter(name=name, kind=kind, version=version).exists():
        raise Conflict(f"{kind} {name} {version} already exists; versions are immutable", code="duplicate_version")
    limit = conf.get("MAX_ARTIFACT_BYTES")
    seen: set[int] = set()
    for v in variants:
        size = getattr(v.file, "size", None)
        if size is not None and size > limit:
            raise TooLarge(f"{v.name}: {size:,} bytes is over the {limit:,}-byte artifact limit "
                           "(ROLLOUTS_MAX_ARTIFACT_BYTES)")
        v.tiers = _clean_tiers(v.tiers or range(1, min_tier + 1), f"variant {v.name}")
        if seen & set(v.tiers):
            raise InvalidInput(f"variant {v.name}: tier(s) {sorted(seen & set(v.tiers))} already have a variant")
        seen |= set(v.tiers)
    artifact = Artifact.objects.create(
        name=name, kind=kind, version=version, description=description, hardware_models=list(hardware_models or []),
        accelerators=list(accelerators or []), min_tier=min_tier, created_by=str(actor)[:200],
    )
    key = active_signing_key()
    created = int(artifact.created_at.timestamp() * 1000)
    stored: list[ArtifactVariant] = []
    try:
        for v in variants:
            stored.append(_store_variant(artifact, v, key=key, created=created, limit=limit))
    except BaseException:
        # The rows roll back with the transaction; the files would not.
        for variant in stored:
            variant.file.delete(save=False)
        raise
    audit.record(actor=actor, action="rollouts.artifact.create", target=artifact,
                 data={"version": version, "variants": [v.name for v in variants], "key_id": key.key_id})
    return artifact


def _store_variant(artifact: Artifact, v: VariantUpload, *, key: SigningKey, created: int, limit: int) -> ArtifactVariant:
    upload = _HashingFile(v.file)
    filename = (getattr(v.file, "name", "") or f"{artifact.name}-{artifact.version}").rsplit("/", 1)[-1]
    variant = ArtifactVariant(artifact=artifact, name=v.name, tiers=v.tiers, size=0, sha256="", key=key)
    variant.file.save(filename, upload, save=False)
    if upload.count > limit:
        variant.file.delete(save=False)
        raise TooLarge(f"{v.name}: upload is over the {limit:,}-byte artifact limit (ROLLOUTS_MAX_ARTIFACT_BYTES)")
    variant.size, variant.sha256 = upload.count, upload.digest.hexdigest()
    variant.manifest = keyring.manifest_bytes(name=artifact.name, kind=artifact.kind, version=artifact.version,
                                              sha256=variant.sha256, size=variant.size, variant=v.name,
                                              created=created)
    variant.signature = keyring.sign(variant.manifest, key_id=key.key_id,
                                     private_key_encrypted=bytes(key.private_key_encrypted))
    try:
        variant.save()
    except BaseException:
        variant.file.delete(save=False)
        raise
    return variant


# --- campaigns --------------------------------------------------------------------------

def _clean_waves(waves: Any) -> list[dict]:
    if not isinstance(waves, list) or not waves:
        raise InvalidInput("waves: give at least one wave, e.g. [{\"size\": \"5%\"}, {\"size\": \"100%\"}]")
    if len(waves) > 20:
        raise InvalidInput("waves: at most 20 waves")
    cleaned: list[dict] = []
    last_pct, last_count = 0.0, 0
    for i, wave in enumerate(waves):
        if not isinstance(wave, dict):
            raise InvalidInput(f"wave {i + 1}: an object with size, soak_s and gates")
        size = wave.get("size")
        if isinstance(size, str) and size.endswith("%"):
            try:
                pct = float(size[:-1])
            except ValueError:
                raise InvalidInput(f"wave {i + 1}: size {size!r} is not a percentage") from None
            if not 0 < pct <= 100 or pct < last_pct:
                raise InvalidInput(f"wave {i + 1}: sizes are cumulative percentages in (0, 100], never decreasing")
            last_pct = pct
        elif isinstance(size, int) and not isinstance(size, bool) and size > 0:
            if size < last_count:
                raise InvalidInput(f"wave {i + 1}: sizes are cumulative device counts, never decreasing")
            last_count = size
        else:
            raise InvalidInput(f"wave {i + 1}: size is a cumulative percentage like \"10%\" or a device count")
        soak = wave.get("soak_s", 0)
        if not isinstance(soak, int) or isinstance(soak, bool) or soak < 0:
            raise InvalidInput(f"wave {i + 1}: soak_s is a number of seconds")
        wave_gates = wave.get("gates", [])
        if not isinstance(wave_gates, list):
            raise InvalidInput(f"wave {i + 1}: gates is a list")
        cleaned.append({"size": size, "soak_s": soak,
                        "gates": [gates.validate_gate(g, gates.WAVE_GATES) for g in wave_gates]})
    return cleaned


CAMPAIGN_FIELDS = {
    "name", "target_selector", "target_group", "target_site", "target_tiers", "target_uids", "waves",
    "offer_gates", "on_gate_failure", "rate_per_min", "ramp_initial_per_min", "max_concurrent", "window_cron",
    "window_tz", "window_duration_min", "ack_timeout_s", "download_timeout_s", "install_timeout_s",
    "online_timeout_s", "max_retries", "retry_backoff_s",
}


def _apply_campaign_fields(campaign: Campaign, fields: dict) -> None:
    unknown = set(fields) - CAMPAIGN_FIELDS
    if unknown:
        raise InvalidInput(f"cannot set {', '.join(sorted(unknown))} on a campaign")
    for key, value in fields.items():
        setattr(campaign, key, value)
    if not campaign.name:
        raise InvalidInput("a campaign needs a name")
    if campaign.target_selector:
        compile_selector(campaign.target_selector)  # raises SelectorError with the column
    campaign.target_tiers = _clean_tiers(campaign.target_tiers, "target_tiers") if campaign.target_tiers else []
    if not isinstance(campaign.target_uids, list) or not all(isinstance(u, str) for u in campaign.target_uids):
        raise InvalidInput("target_uids is a list of device uids")
    if len(campaign.target_uids) > 100_000:
        raise InvalidInput("target_uids: at most 100,000 devices; use a selector or a group")
    campaign.waves = _clean_waves(campaign.waves)
    if not isinstance(campaign.offer_gates, list):
        raise InvalidInput("offer_gates is a list")
    campaign.offer_gates = [gates.validate_gate(g, gates.OFFER_GATES) for g in campaign.offer_gates]
    if campaign.on_gate_failure not in Campaign.Action.values:
        raise InvalidInput(f"on_gate_failure must be one of {', '.join(Campaign.Action.values)}")
    if campaign.rate_per_min < 1 or campaign.max_concurrent < 1:
        raise InvalidInput("rate_per_min and max_concurrent must be at least 1")
    try:
        windows.validate(campaign.window_cron, campaign.window_tz, campaign.window_duration_min)
    except windows.CronError as exc:
        raise InvalidInput(f"maintenance window: {exc}") from None


@transaction.atomic
def campaign_create(*, actor: Any, artifact: Artifact, name: str, **fields: Any) -> Campaign:
    """A draft campaign. Nothing is offered until it is scheduled or started."""
    fields.setdefault("waves", [{"size": "100%", "soak_s": 0, "gates": []}])
    campaign = Campaign(artifact=artifact, kind=artifact.kind, artifact_name=artifact.name, name=name,
                        created_by=str(actor)[:200])
    _apply_campaign_fields(campaign, {"name": name, **fields})
    campaign.save()
    audit.record(actor=actor, action="campaign.create", target=campaign,
                 data={"artifact": str(artifact), "waves": campaign.waves})
    return campaign


def _locked(campaign: Campaign) -> Campaign:
    return Campaign.objects.select_for_update().get(pk=campaign.pk)


@transaction.atomic
def campaign_update(*, actor: Any, campaign: Campaign, **fields: Any) -> Campaign:
    """Edit a draft (anything) or a scheduled campaign. A running or paused campaign only
    accepts wave changes that add devices (later waves grow; offered waves stay)."""
    campaign = _locked(campaign)
    if campaign.state in (CS.DRAFT, CS.SCHEDULED):
        _apply_campaign_fields(campaign, fields)
        campaign.save()
    elif campaign.state in (CS.RUNNING, CS.PAUSED):
        allowed = {"waves", "rate_per_min", "max_concurrent", "name"}
        if set(fields) - allowed:
            raise Conflict(f"a {campaign.state} campaign only accepts changes to {', '.join(sorted(allowed))}")
        old_waves = campaign.waves
        _apply_campaign_fields(campaign, fields)
        if "waves" in fields:
            _regrow_waves(campaign, old_waves)
        campaign.save()
    else:
        raise Conflict(f"campaign is {campaign.state}; it cannot change")
    audit.record(actor=actor, action="campaign.update", target=campaign, data={"changed": sorted(fields)})
    return campaign


def _wave_case(waves: list[dict], rank_sql: str, total_sql: str, params: list) -> str:
    """SQL: the wave of a device from its rank among eligible devices (cumulative sizes)."""
    parts = []
    for i, wave in enumerate(waves[:-1]):
        size = wave["size"]
        if isinstance(size, str):
            parts.append(f"WHEN {rank_sql} <= ceil(%s::float8 * {total_sql} / 100.0) THEN {i}")
            params.append(float(size[:-1]))
        else:
            parts.append(f"WHEN {rank_sql} <= %s THEN {i}")
            params.append(size)
    # The last wave takes everyone left.
    return f"(CASE {' '.join(parts)} ELSE {len(waves) - 1} END)" if parts else "0"


def _regrow_waves(campaign: Campaign, old_waves: list[dict]) -> None:
    if len(campaign.waves) < campaign.current_wave + 1:
        raise Conflict("waves: the campaign is already in a later wave than the new plan has")
    params: list = []
    case = _wave_case(campaign.waves, "rank", str(int(campaign.eligible_count)), params)
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE rollouts_execution SET wave = LEAST(wave, {case}) "  # noqa: S608 -- generated from validated waves
            "WHERE campaign_id = %s AND state = 'pending'",
            [*params, campaign.id],
        )


def target_queryset(campaign: Campaign) -> Any:
    """The campaign's devices (decommissioned ones never take part)."""
    qs = Device.objects.exclude(status=DeviceStatus.DECOMMISSIONED)
    if campaign.target_selector:
        qs = qs.filter(compile_selector(campaign.target_selector))
    if campaign.target_group_id:
        qs = qs.filter(id__in=DeviceGroup.devices.through.objects.filter(
            devicegroup_id=campaign.target_group_id).values("device_id"))
    if campaign.target_site_id:
        qs = qs.filter(site_id=campaign.target_site_id)
    if campaign.target_tiers:
        qs = qs.filter(tier__in=campaign.target_tiers)
    if campaign.target_uids:
        qs = qs.filter(uid__in=campaign.target_uids)
    return qs


def plan_sql(campaign: Campaign) -> tuple[str, list]:
    """SELECT of the campaign's plan: one row per targeted device with its variant, hash
    bucket, rank, wave and either `pending` or the reason it is left out. Shared by the
    dry-run preview and by materialisation, so both agree exactly."""
    artifact = campaign.artifact
    target_sql, target_params = target_queryset(campaign).values("id").query.sql_with_params()
    variants = list(artifact.variants.values("id", "tiers"))
    params: list = [str(campaign.id)]
    variant_case = "CASE " + " ".join("WHEN d.tier = ANY(%s::int[]) THEN %s" for _ in variants) + " END"
    for v in variants:
        params += [list(v["tiers"]), v["id"]]
    params += [campaign.kind, campaign.kind]
    hw_ok = "(cardinality(%s::text[]) = 0 OR d.hardware_model = ANY(%s::text[]))"
    acc_ok = "(cardinality(%s::text[]) = 0 OR d.accelerator = ANY(%s::text[]))"
    params += [artifact.hardware_models, artifact.hardware_models, artifact.accelerators, artifact.accelerators]
    params += list(target_params)
    version = artifact.version
    classify_params = [version, version, version]
    wave_params: list = []
    wave_case = _wave_case(campaign.waves, "rank", "n_eligible", wave_params)
    sql = f"""
        WITH plan AS (
          SELECT d.id AS device_id, d.uid, d.online, d.status, d.tier,
                 ('x' || substr(md5(%s || ':' || d.uid), 1, 8))::bit(32)::bigint / 4294967296.0 AS bucket,
                 {variant_case} AS variant_id,
                 coalesce(d.installed_versions ->> %s, '') AS previous_version,
                 d.pinned_versions ->> %s AS pinned,
                 {hw_ok} AS hw_ok, {acc_ok} AS acc_ok
          FROM fleet_device d WHERE d.id IN ({target_sql})
        ), classified AS (
          SELECT plan.*, CASE
              WHEN NOT hw_ok THEN 'incompatible:hardware_model'
              WHEN NOT acc_ok THEN 'incompatible:accelerator'
              WHEN variant_id IS NULL THEN 'incompatible:tier'
              WHEN pinned IS NOT NULL AND pinned <> %s THEN 'pinned:pinned'
              WHEN previous_version = %s OR previous_version LIKE '%%-' || %s THEN 'canceled:already_installed'
              WHEN status = 'quarantined' THEN 'canceled:quarantined'
              WHEN status = 'pending' THEN 'canceled:pending_approval'
              ELSE 'pending:' END AS verdict
          FROM plan
        ), ranked AS (
          SELECT classified.*, split_part(verdict, ':', 1) AS state, split_part(verdict, ':', 2) AS reason,
                 CASE WHEN verdict = 'pending:' THEN
                   row_number() OVER (PARTITION BY verdict = 'pending:' ORDER BY bucket, device_id) ELSE 0 END AS rank,
                 count(*) FILTER (WHERE verdict = 'pending:') OVER () AS n_eligible
          FROM classified
        )
        SELECT device_id, uid, online, tier, bucket, variant_id, previous_version, pinned, state, reason, rank,
               CASE WHEN state = 'pending' THEN {wave_case} ELSE 0 END AS wave
        FROM ranked
    """  # noqa: S608 -- fragments are generated here from validated campaign fields; values are parameters
    return sql, [*params, *classify_params, *wave_params]


REASON_DETAIL = {
    "hardware_model": "hardware model not in the artifact's compatibility list",
    "accelerator": "accelerator not in the artifact's compatibility list",
    "tier": "no variant of the artifact for this device's capability tier",
    "pinned": "the device pins this component to another version",
    "already_installed": "this version is already installed",
    "quarantined": "the device is quarantined",
    "pending_approval": "the device is waiting for approval",
}


def _materialize(campaign: Campaign) -> int:
    """Create every execution in one INSERT … SELECT (no per-device Python loop)."""
    sql, params = plan_sql(campaign)
    detail_case = "CASE reason " + " ".join("WHEN %s THEN %s" for _ in REASON_DETAIL) + " ELSE '' END"
    detail_params = [x for item in REASON_DETAIL.items() for x in item]
    with connection.cursor() as cursor:
        cursor.execute(
            f"""INSERT INTO rollouts_execution (campaign_id, device_id, variant_id, component, wave, rank, bucket, state,
                    hold, progress, attempt, error, previous_version, target_version, created_at, updated_at)
                SELECT %s, device_id, variant_id, %s, wave, rank, bucket, state, '', 0, 0,
                       CASE WHEN state = 'pending' THEN NULL ELSE jsonb_build_object(
                           'code', reason, 'retryable', false, 'detail', {detail_case}) END,
                       previous_version, %s, now(), now()
                FROM ({sql}) AS plan
                ON CONFLICT (campaign_id, device_id) DO NOTHING""",  # noqa: S608 -- generated SQL, values are parameters
            [campaign.id, campaign.kind, *detail_params, campaign.artifact.version, *params],
        )
    return Execution.objects.filter(campaign=campaign, state=S.PENDING).count()


def _supersede(campaign: Campaign, actor: Any) -> int:
    """Queued executions of older campaigns for the same component on the same devices
    become `superseded` (and this campaign's, where an active campaign is newer)."""
    new_version = semver.Version.parse(campaign.artifact.version)
    others = (Campaign.objects.filter(kind=campaign.kind, artifact_name=campaign.artifact_name,
                                      state__in=[CS.RUNNING, CS.PAUSED], artifact__isnull=False)
              .exclude(pk=campaign.pk).select_related("artifact"))
    total = 0
    for other in others:
        older, newer = (other, campaign) if semver.Version.parse(other.artifact.version) < new_version else (campaign, other)
        n = Execution.objects.filter(
            campaign=older, state=S.PENDING,
            device_id__in=Execution.objects.filter(campaign=newer, state__in=[S.PENDING, *LIVE]).values("device_id"),
        ).update(state=S.SUPERSEDED, hold="", finished_at=timezone.now(),
                 error={"code": "superseded", "retryable": False,
                        "detail": f"superseded by campaign {newer.id} ({newer.artifact.version})"})
        if n:
            total += n
            audit.record(actor=actor, action="campaign.supersede", target=older,
                         data={"by": newer.id, "executions": n})
    return total


def _start(campaign: Campaign, *, actor: Any, reason: str) -> Campaign:
    """scheduled → running: materialise executions, supersede older queues. Campaign row locked."""
    now = timezone.now()
    campaign.eligible_count = _materialize(campaign)
    campaign.state = CS.RUNNING
    campaign.started_at = campaign.wave_started_at = now
    campaign.current_wave = 0
    campaign.wave_drained_at = None
    campaign.rate_updated_at = now
    campaign.rate_tokens = _burst(campaign)
    campaign.state_reason = reason
    campaign.save()
    superseded = _supersede(campaign, actor)
    counts = dict(Execution.objects.filter(campaign=campaign).values_list("state").annotate(n=_count()).order_by())
    audit.record(actor=actor, action="campaign.start", target=campaign,
                 data={"reason": reason, "executions": counts, "superseded": superseded})
    _kick_after_commit(campaign.id)
    return campaign


def _count() -> Any:
    from django.db.models import Count

    return Count("id")


@transaction.atomic
def campaign_schedule(*, actor: Any, campaign: Campaign, start_at: dt.datetime | None = None,
                      reason: str = "") -> Campaign:
    """draft → scheduled. The orchestrator starts it at `start_at` (default: its next tick)."""
    campaign = _locked(campaign)
    if campaign.state != CS.DRAFT:
        raise Conflict(f"campaign is {campaign.state}; only a draft can be scheduled")
    if campaign.artifact is None:
        raise Conflict("a revert campaign is started by the abort that creates it")
    campaign.state = CS.SCHEDULED
    campaign.scheduled_at = start_at or timezone.now()
    campaign.state_reason = reason
    campaign.save(update_fields=["state", "scheduled_at", "state_reason", "updated_at"])
    audit.record(actor=actor, action="campaign.schedule", target=campaign,
                 data={"reason": reason, "start_at": campaign.scheduled_at.isoformat()})
    _kick_after_commit(campaign.id)
    return campaign


@transaction.atomic
def campaign_start(*, actor: Any, campaign: Campaign, reason: str = "") -> Campaign:
    """draft or scheduled → running now."""
    campaign = _locked(campaign)
    if campaign.state == CS.DRAFT:
        campaign_schedule(actor=actor, campaign=campaign, reason=reason)
        campaign = _locked(campaign)
    if campaign.state != CS.SCHEDULED:
        raise Conflict(f"campaign is {campaign.state}; only a draft or scheduled campaign can start")
    return _start(campaign, actor=actor, reason=reason)


def start_due(*, now: dt.datetime | None = None) -> list[int]:
    """Start scheduled campaigns whose time has come (each claimed under a row lock)."""
    now = now or timezone.now()
    started = []
    for cid in Campaign.objects.filter(state=CS.SCHEDULED, scheduled_at__lte=now).values_list("id", flat=True)[:20]:
        with transaction.atomic():
            campaign = Campaign.objects.select_for_update(skip_locked=True).filter(
                id=cid, state=CS.SCHEDULED).first()
            if campaign is not None:
                _start(campaign, actor="system:orchestrator", reason="scheduled start")
                started.append(cid)
    return started


def _set_state(campaign: Campaign, *, to: str, actor: Any, action: str, reason: str, **data: Any) -> None:
    before = campaign.state
    campaign.state = to
    campaign.state_reason = reason
    if to in (CS.COMPLETED, CS.ABORTED):
        campaign.finished_at = timezone.now()
    campaign.save()
    audit.record(actor=actor, action=action, target=campaign, data={"from": before, "to": to, "reason": reason, **data})


@transaction.atomic
def campaign_pause(*, actor: Any, campaign: Campaign, reason: str) -> Campaign:
    """running → paused: no new offers; executions already offered continue and report."""
    campaign = _locked(campaign)
    if campaign.state != CS.RUNNING:
        raise Conflict(f"campaign is {campaign.state}; only a running campaign can be paused")
    _set_state(campaign, to=CS.PAUSED, actor=actor, action="campaign.pause", reason=reason)
    return campaign


@transaction.atomic
def campaign_resume(*, actor: Any, campaign: Campaign, reason: str) -> Campaign:
    """paused → running. Gates that failed in the current wave are overridden for that wave
    (the operator has looked and accepts them); other gates still apply."""
    campaign = _locked(campaign)
    if campaign.state != CS.PAUSED:
        raise Conflict(f"campaign is {campaign.state}; only a paused campaign can be resumed")
    wave = str(campaign.current_wave)
    failed = [g for g, r in campaign.gate_results.get(wave, {}).items() if r.get("ok") is False]
    if failed:
        campaign.gate_overrides = {**campaign.gate_overrides,
                                   wave: sorted(set(campaign.gate_overrides.get(wave, [])) | set(failed))}
    campaign.rate_updated_at = timezone.now()
    _set_state(campaign, to=CS.RUNNING, actor=actor, action="campaign.resume", reason=reason, overridden=failed)
    _kick_after_commit(campaign.id)
    return campaign


@transaction.atomic
def campaign_abort(*, actor: Any, campaign: Campaign, reason: str, revert: bool = False) -> Campaign:
    """→ aborted. Queued executions are canceled; offered ones not yet installing are canceled
    and sent `rollout.cancel`; installing and verifying ones finish and report. With
    `revert`, devices that committed get a revert campaign to their previous version."""
    campaign = _locked(campaign)
    if campaign.state in (CS.COMPLETED, CS.ABORTED) and not revert:
        raise Conflict(f"campaign is already {campaign.state}")
    if campaign.state == CS.ABORTED and campaign.reverts.exists():
        raise Conflict("campaign is already aborted and reverted")
    return _abort(campaign, actor=actor, reason=reason, revert=revert)


def _abort(campaign: Campaign, *, actor: Any, reason: str, revert: bool) -> Campaign:
    now = timezone.now()
    error = {"code": "campaign_aborted", "retryable": False, "detail": reason[:500]}
    canceled_queue = Execution.objects.filter(campaign=campaign, state=S.PENDING).update(
        state=S.CANCELED, hold="", finished_at=now, error=error)
    to_cancel = list(Execution.objects.filter(campaign=campaign, state__in=REOFFER)
                     .values_list("id", "device_id", "delivered_at"))
    Execution.objects.filter(id__in=[e for e, _, _ in to_cancel], state__in=REOFFER).update(
        state=S.CANCELED, finished_at=now, deadline_at=None, error=error)
    if campaign.state not in (CS.COMPLETED, CS.ABORTED):
        _set_state(campaign, to=CS.ABORTED, actor=actor, action="campaign.abort", reason=reason,
                   canceled_queued=canceled_queue, canceled_offered=len(to_cancel), revert=revert)
    notify = [(e, d) for e, d, delivered in to_cancel if delivered is not None]
    transaction.on_commit(lambda: _push_cancels(notify))
    if revert:
        _create_revert(campaign, actor=actor, reason=reason)
    return campaign


def _push_cancels(pairs: list[tuple[int, int]]) -> None:
    push.send_many((device_id, {"type": "device.frame", "frame": p.rollout_cancel(execution_id)})
                   for execution_id, device_id in pairs)


_REVERT_SQL = """
    INSERT INTO rollouts_execution (campaign_id, device_id, variant_id, component, wave, rank, bucket, state, hold,
        progress, attempt, error, previous_version, target_version, created_at, updated_at, finished_at)
    SELECT %(revert)s, e.device_id, v.id, e.component, 0, row_number() OVER (ORDER BY e.bucket, e.device_id),
           e.bucket, CASE WHEN v.id IS NULL THEN 'canceled' ELSE 'pending' END, '', 0, 0,
           CASE WHEN v.id IS NULL THEN jsonb_build_object('code', 'no_previous_artifact', 'retryable', false,
                'detail', 'no artifact ' || %(name)s || ' ' || e.previous_version || ' for this tier to revert to')
           END, e.target_version, e.previous_version, now(), now(), CASE WHEN v.id IS NULL THEN now() END
    FROM rollouts_execution e
    JOIN fleet_device d ON d.id = e.device_id
    LEFT JOIN LATERAL (
        SELECT v.id FROM rollouts_artifactvariant v JOIN rollouts_artifact a ON a.id = v.artifact_id
        WHERE a.name = %(name)s AND a.kind = %(kind)s AND a.version = e.previous_version
          AND v.tiers @> to_jsonb(d.tier) LIMIT 1) v ON true
    WHERE e.campaign_id = %(original)s AND e.state = 'committed' AND e.previous_version <> ''
      AND d.status <> 'decommissioned' {extra}
    ON CONFLICT (campaign_id, device_id) DO NOTHING
"""


def _create_revert(campaign: Campaign, *, actor: Any, reason: str) -> Campaign:
    now = timezone.now()
    revert = Campaign.objects.create(
        name=f"Revert of {campaign.name}"[:200], artifact=None, kind=campaign.kind,
        artifact_name=campaign.artifact_name, state=CS.RUNNING, state_reason=reason, revert_of=campaign,
        waves=[{"size": "100%", "soak_s": 0, "gates": []}], rate_per_min=campaign.rate_per_min,
        max_concurrent=campaign.max_concurrent, window_cron=campaign.window_cron, window_tz=campaign.window_tz,
        window_duration_min=campaign.window_duration_min, ack_timeout_s=campaign.ack_timeout_s,
        download_timeout_s=campaign.download_timeout_s, install_timeout_s=campaign.install_timeout_s,
        online_timeout_s=campaign.online_timeout_s, max_retries=campaign.max_retries,
        retry_backoff_s=campaign.retry_backoff_s, created_by=str(actor)[:200], scheduled_at=now, started_at=now,
        wave_started_at=now, rate_updated_at=now,
    )
    with connection.cursor() as cursor:
        cursor.execute(_REVERT_SQL.format(extra=""), {"revert": revert.id, "name": campaign.artifact_name,
                                                      "kind": campaign.kind, "original": campaign.id})
    revert.eligible_count = Execution.objects.filter(campaign=revert, state=S.PENDING).count()
    revert.rate_tokens = _burst(revert)
    revert.save(update_fields=["eligible_count", "rate_tokens"])
    audit.record(actor=actor, action="campaign.revert", target=revert,
                 data={"reason": reason, "of": campaign.id, "devices": revert.eligible_count})
    _kick_after_commit(revert.id)
    return revert


def _revert_late_commit(campaign: Campaign, device_id: int) -> None:
    """A device of an aborted-and-reverted campaign committed after the abort: revert it too."""
    revert = campaign.reverts.filter(state__in=[CS.RUNNING, CS.PAUSED, CS.COMPLETED]).first()
    if revert is None:
        return
    with connection.cursor() as cursor:
        cursor.execute(_REVERT_SQL.format(extra="AND e.device_id = %(device)s"),
                       {"revert": revert.id, "name": campaign.artifact_name, "kind": campaign.kind,
                        "original": campaign.id, "device": device_id})
    if revert.state == CS.COMPLETED:
        Campaign.objects.filter(pk=revert.pk, state=CS.COMPLETED).update(state=CS.RUNNING, finished_at=None)


# --- offers and downloads -----------------------------------------------------------------

_SALT = "rollouts.download"


def download_token(execution: Execution) -> str:
    return dj_signing.TimestampSigner(salt=_SALT).sign_object(
        {"e": execution.id, "v": execution.variant_id, "a": execution.attempt})


def read_download_token(token: str) -> dict:
    """The token's claims. Raises SignatureExpired (→ 410) or BadSignature (→ 403)."""
    return dj_signing.TimestampSigner(salt=_SALT).unsign_object(token, max_age=conf.get("DOWNLOAD_TTL_S"))


def download_url(execution: Execution) -> str:
    path = reverse("rollouts-download", kwargs={"token": download_token(execution)})
    return conf.get("DOWNLOAD_BASE_URL").rstrip("/") + path


def _ms(when: dt.datetime) -> int:
    return int(when.timestamp() * 1000)


def current_window(campaign: Campaign, now: dt.datetime) -> tuple[dt.datetime, dt.datetime] | None:
    return windows.window_at(campaign.window_cron, campaign.window_tz, campaign.window_duration_min, now)


def offer_frame(execution: Execution, campaign: Campaign, now: dt.datetime,
                window: tuple[dt.datetime, dt.datetime] | None = None) -> dict:
    """`rollout.offer` for one execution (its variant, a fresh URL, the install window)."""
    variant = execution.variant
    artifact = variant.artifact
    base = now + dt.timedelta(seconds=campaign.ack_timeout_s + campaign.download_timeout_s)
    if window is None:
        window = current_window(campaign, now)
    ready = max(base, window[1]) if window else base
    deadline = ready + dt.timedelta(seconds=campaign.install_timeout_s + campaign.online_timeout_s)
    return p.rollout_offer(
        execution.id, name=artifact.name, kind=artifact.kind, version=artifact.version, url=download_url(execution),
        sha256=variant.sha256, size=variant.size, manifest=bytes(variant.manifest),
        signature=bytes(variant.signature), key_id=variant.key.key_id, deadline=_ms(deadline),
        window=(_ms(window[0]), _ms(window[1])) if window else None,
    )


def push_offers(frames: list[tuple[int, dict]]) -> None:
    """All of a step's offers in one batch (one event loop, one set of Redis connections)."""
    push.send_many((device_id, {"type": "device.frame", "frame": frame}) for device_id, frame in frames)


@transaction.atomic
def pending_offers(*, device_id: int) -> list[dict]:
    """Offers a device should (re)receive on connect: its executions that are offered and not
    yet installing, with fresh download URLs. First delivery starts the ack timeout.

    Every connect calls it and almost always finds nothing: one cheap raw statement (the
    device is active and has such an execution) answers that case before the locking read."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT EXISTS (SELECT 1 FROM rollouts_execution e JOIN rollouts_campaign c ON c.id = e.campaign_id"
            " JOIN fleet_device d ON d.id = e.device_id WHERE e.device_id = %s AND d.status = %s"
            " AND e.state = ANY(%s) AND e.variant_id IS NOT NULL AND c.state <> %s)",
            [device_id, DeviceStatus.ACTIVE, list(REOFFER), CS.ABORTED])
        if not cursor.fetchone()[0]:
            return []
    now = timezone.now()
    executions = list(
        Execution.objects.select_for_update(of=("self",))
        .select_related("campaign", "variant__artifact", "variant__key")
        .filter(device_id=device_id, state__in=REOFFER, variant__isnull=False)
        .exclude(campaign__state=CS.ABORTED)
        .order_by("id")[:20]
    )
    frames = []
    for execution in executions:
        campaign = execution.campaign
        if execution.delivered_at is None:
            Execution.objects.filter(pk=execution.pk).update(
                delivered_at=now, deadline_at=now + dt.timedelta(seconds=campaign.ack_timeout_s), updated_at=now)
        elif execution.state == S.OFFERED:
            # A re-send on reconnect counts as a delivery: the orchestrator's lost-push re-send
            # (orchestrator._redeliver_lost) waits from here, so the device gets no second copy.
            Execution.objects.filter(pk=execution.pk, state=S.OFFERED).update(delivered_at=now, updated_at=now)
        frames.append(offer_frame(execution, campaign, now))
    return frames


# --- device reports ---------------------------------------------------------------------

# A live phase's deadline: the campaign's timeouts (fields) summed, from when the phase began (for
# `downloaded`, from when the maintenance window lets the install start). One table for both
# `_deadline_for` and the one-statement path of `execution_progress`.
_PHASE_TIMEOUTS = {
    S.ACKED: ("download_timeout_s",), S.DOWNLOADING: ("download_timeout_s",),
    S.DOWNLOADED: ("install_timeout_s",),
    S.INSTALLING: ("install_timeout_s", "online_timeout_s"), S.VERIFYING: ("install_timeout_s", "online_timeout_s"),
}


def _deadline_for(state: str, campaign: Campaign, now: dt.datetime) -> dt.datetime | None:
    fields = _PHASE_TIMEOUTS.get(state)
    if fields is None:
        return None
    start = now
    if state == S.DOWNLOADED:
        window = current_window(campaign, now)
        start = max(now, window[1]) if window else now
    return start + dt.timedelta(seconds=sum(getattr(campaign, name) for name in fields))


def _retry_at(campaign: Campaign, attempt: int, now: dt.datetime) -> dt.datetime:
    return now + dt.timedelta(seconds=campaign.retry_backoff_s * (2 ** min(attempt, 10)))


def execution_report(*, device_id: int, report: p.RolloutStatus) -> None:
    """Apply a device's `rollout.status` (inside the caller's transaction)."""
    try:
        execution_id = int(report.execution_id)
    except (TypeError, ValueError):
        execution_id = None
    # Filtered by device in the query: another device's row is neither read nor locked.
    execution = None if execution_id is None else next(iter(
        Execution.objects.select_for_update(of=("self",)).select_related("campaign")
        .filter(pk=execution_id, device_id=device_id).order_by()[:1]), None)
    if execution is None:
        log.info("rollout.status for execution %r refused: not an execution of device %s", report.execution_id,
                 device_id)
        raise UnknownExecution(f"execution {str(report.execution_id)[:64]} is not an execution of this device")
    campaign = execution.campaign
    now = timezone.now()
    new, current = report.state, execution.state
    error = None if report.error is None else {"code": report.error.code, "retryable": report.error.retryable,
                                               "detail": report.error.detail[:2000]}
    changes: dict[str, Any] = {}
    if new in DEVICE_FINAL:
        if current in DEVICE_FINAL or current in SKIPPED or (current == S.PENDING and execution.attempt == 0
                                                              and execution.offered_at is None):
            log.info("late %s for execution %s (already %s) ignored", new, execution_id, current)
            return
        if (current == S.CANCELED and new == S.FAILED and error is not None and error["retryable"]
                and (execution.error or {}).get("code") == QUARANTINED):
            # Nothing changed on the device (a retryable failure; typically its download refused
            # once it was quarantined): the quarantine stays the outcome, so this is no rollout
            # failure for the gates and a release queues it again. The report is kept beside it.
            Execution.objects.filter(pk=execution.pk, state=S.CANCELED).update(
                error={**execution.error, "device_error": error}, updated_at=now)
            return
        retry = (new == S.FAILED and error is not None and error["retryable"] and current not in SERVER_FINAL
                 and execution.attempt < campaign.max_retries and campaign.state in (CS.RUNNING, CS.PAUSED))
        if retry:
            changes = {"state": S.PENDING, "attempt": execution.attempt + 1, "error": error, "delivered_at": None,
                       "deadline_at": None, "next_attempt_at": _retry_at(campaign, execution.attempt, now),
                       "progress": 0}
        else:
            changes = {"state": new, "error": error, "deadline_at": None, "finished_at": now,
                       "progress": 100 if new == S.COMMITTED else report.progress}
    else:
        if current not in LIVE:
            log.info("%s for execution %s in state %s ignored", new, execution_id, current)
            return
        if RANK[new] < RANK[current]:
            log.info("out-of-order %s for execution %s (already %s) ignored", new, execution_id, current)
            return
        if RANK[new] == RANK[current]:
            if report.progress <= execution.progress:
                return
            changes = {"progress": report.progress}
        else:
            changes = {"state": new, "progress": report.progress, "deadline_at": _deadline_for(new, campaign, now)}
            if execution.delivered_at is None:
                changes["delivered_at"] = now
    updated = Execution.objects.filter(pk=execution.pk, state=current).update(updated_at=now, **changes)
    if not updated:
        return
    state = changes.get("state", current)
    if state == S.COMMITTED:
        _record_installed(device_id, execution.component, execution.target_version)
        if campaign.state == CS.ABORTED:
            _revert_late_commit(campaign, device_id)
    if state != current and (state in DEVICE_FINAL or state in (S.DOWNLOADED, S.PENDING)):
        _kick_after_commit(campaign.id)


# Reports the fast path applies: forward moves whose only effect is the row's state, progress
# and phase deadline (`_PHASE_TIMEOUTS`, summed in SQL), plus the kick after `downloaded`. `downloaded`
# only in a campaign without a maintenance window (the deadline then waits for no window).
# Final outcomes, same-phase progress and everything unusual take `execution_report`.
_PROGRESS_SQL = """
WITH cur AS (
    UPDATE fleet_uplinkcursor SET last_acked_seq = %(to)s
    WHERE device_id = %(device)s AND last_acked_seq = %(from)s
      AND EXISTS (SELECT 1 FROM rollouts_execution e JOIN rollouts_campaign c ON c.id = e.campaign_id
                  WHERE e.id = %(execution)s AND e.device_id = %(device)s AND e.state = ANY(%(before)s) {only})
    RETURNING device_id
), moved AS (
    UPDATE rollouts_execution e SET state = %(state)s, progress = %(progress)s,
        deadline_at = %(now)s + ({deadline}) * interval '1 second',
        delivered_at = coalesce(e.delivered_at, %(now)s), updated_at = %(now)s
    FROM rollouts_campaign c
    WHERE c.id = e.campaign_id AND e.id = %(execution)s AND e.device_id = %(device)s AND e.state = ANY(%(before)s)
      {only} AND EXISTS (SELECT 1 FROM cur)
    RETURNING e.campaign_id
)
SELECT (SELECT count(*) FROM cur), (SELECT max(campaign_id) FROM moved)
"""


def execution_progress(*, device_id: int, report: p.RolloutStatus, cursor_from: int, cursor_to: int) -> bool:
    """The common report of a rollout — `acked`, `downloading`, `downloaded` (no maintenance
    window), `installing`, `verifying`, phases forward — applied together with the device's
    uplink cursor advance in ONE statement (autocommit: atomic by itself; no BEGIN, locking
    read, UPDATE and COMMIT round trips).

    True: the frame is stored (cursor advanced; the execution moved, or — if another writer
    (timeout, abort, quarantine) took it out of the live phases in between — the report is
    ignored, exactly as `execution_report` ignores a progress report of a non-live execution).
    False: nothing was written; the caller applies the frame the general way (a duplicate or
    conflicting seq, another state, an unknown execution, a same-phase progress update)."""
    fields = _PHASE_TIMEOUTS.get(report.state)
    if fields is None or connection.in_atomic_block:
        return False
    try:
        execution_id = int(report.execution_id)
    except (TypeError, ValueError):
        return False
    if not 0 < execution_id < 2**63:
        return False  # no such row; the general path refuses it
    before = [state for state in LIVE if RANK[state] < RANK[report.state]]
    with connection.cursor() as cursor:
        only = "AND c.window_cron = ''" if report.state == S.DOWNLOADED else ""
        deadline = " + ".join(f"c.{name}" for name in fields)
        cursor.execute(_PROGRESS_SQL.format(deadline=deadline, only=only), {
            "to": cursor_to, "from": cursor_from, "device": device_id, "execution": execution_id,
            "before": before, "state": report.state, "progress": report.progress, "now": timezone.now()})
        advanced, moved_in = cursor.fetchone()
    if advanced and moved_in is None:
        log.info("%s for execution %s ignored: it left the live phases meanwhile", report.state, execution_id)
    elif moved_in is not None and report.state == S.DOWNLOADED:
        from rollouts import orchestrator

        orchestrator.kick(moved_in)  # committed already (one statement, autocommit): its wave may move on
    return bool(advanced)


def _record_installed(device_id: int, component: str, version: str) -> None:
    """The device now runs `version` of `component` (it committed): one UPDATE in the report's
    transaction. (The generic `fleet.services.device_report_state` reads and locks the row,
    validates every field and rewrites all of them: a sixth of the server's time per status
    frame in a 2,000-device rollout, for a value checked when the artifact was created.)"""
    fleet_services.clean_versions({component: version}, what="installed")
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE fleet_device SET installed_versions = installed_versions || jsonb_build_object(%s::text, %s::text),"
            " updated_at = %s WHERE id = %s", [component, version, timezone.now(), device_id])


# --- device quarantine --------------------------------------------------------------------

QUARANTINED = "quarantined"  # error code of executions canceled because their device is quarantined
OUTSTANDING = (S.PENDING, *LIVE)

_CANCEL_FOR_DEVICE_SQL = """
    UPDATE rollouts_execution e SET state = 'canceled', hold = '', deadline_at = NULL, next_attempt_at = NULL,
        finished_at = %(now)s, updated_at = %(now)s,
        error = jsonb_build_object('code', %(code)s::text, 'retryable', false,
                                   'detail', 'the device was ' || %(code)s::text || ' while ' || old.state || ': '
                                             || %(reason)s)
    FROM (SELECT id, state FROM rollouts_execution WHERE device_id = %(device)s AND state = ANY(%(states)s)
          ORDER BY id FOR UPDATE) old
    WHERE e.id = old.id
    RETURNING e.id, e.campaign_id, old.state, e.delivered_at IS NOT NULL
"""


def executions_quarantine(*, actor: Any, device: Device, reason: str) -> int:
    """The device was quarantined (called by `fleet.services.device_quarantine`, in its
    transaction): see `executions_cancel_for_device`. A release re-queues these (`executions_release`)."""
    return executions_cancel_for_device(actor=actor, device=device, reason=reason, code=QUARANTINED)


def executions_decommission(*, actor: Any, device: Device, reason: str) -> int:
    """The device was decommissioned (called by `fleet.services.device_decommission`): its
    outstanding executions end now, rather than as `timed_out` failures that would count against
    their wave's failure gate."""
    return executions_cancel_for_device(actor=actor, device=device, reason=reason, code="decommissioned")


@transaction.atomic
def executions_cancel_for_device(*, actor: Any, device: Device, reason: str, code: str) -> int:
    """Every outstanding execution of the device ends as `canceled` with error `code`,
    whatever its phase, so nothing is offered or retried and it blocks no wave.

    Offered, acked, downloading and downloaded ones are also sent `rollout.cancel` after
    commit (best effort; their download URL stops serving at once). Installing and verifying
    ones cannot be stopped on the device: their final outcome, when it comes, is still recorded
    (`execution_report`), while no deadline, retry or re-offer follows. One audit entry per
    campaign touched. Returns the number of executions canceled."""
    now = timezone.now()
    with connection.cursor() as cursor:
        cursor.execute(_CANCEL_FOR_DEVICE_SQL, {"now": now, "reason": reason[:400], "device": device.pk,
                                         "states": list(OUTSTANDING), "code": code})
        rows = cursor.fetchall()
    by_campaign: dict[int, dict[str, str]] = {}
    for execution_id, campaign_id, old_state, _ in rows:
        by_campaign.setdefault(campaign_id, {})[str(execution_id)] = old_state
    for campaign in Campaign.objects.filter(id__in=list(by_campaign)).order_by("id"):
        audit.record(actor=actor, action="execution.cancel", target=campaign,
                     data={"reason": reason, "code": code, "device": device.uid,
                           "executions": by_campaign[campaign.id]})
    notify = [(execution_id, device.pk) for execution_id, _, old_state, delivered in rows
              if delivered and old_state in REOFFER]
    if notify:
        transaction.on_commit(lambda: _push_cancels(notify))
    for campaign_id in by_campaign:
        _kick_after_commit(campaign_id)  # its wave may have drained
    return len(rows)


@transaction.atomic
def executions_release(*, actor: Any, device: Device, reason: str = "") -> int:
    """The device was released from quarantine (called by `fleet.services.device_release`):
    its executions canceled for the quarantine in running or paused campaigns (also those it
    was quarantined for when the campaign started) are queued again, in the campaign's current
    wave at the earliest. Where two campaigns of the same artifact then queue it, the older
    version is superseded. Completed and aborted campaigns do not take it back. One audit entry
    per campaign. Returns the number of executions queued again (superseded ones included)."""
    now = timezone.now()
    with connection.cursor() as cursor:
        cursor.execute(
            """UPDATE rollouts_execution e SET state = 'pending', hold = '', error = NULL, progress = 0,
                   deadline_at = NULL, next_attempt_at = NULL, delivered_at = NULL, finished_at = NULL,
                   wave = GREATEST(e.wave, c.current_wave), updated_at = %(now)s
               FROM rollouts_campaign c
               WHERE c.id = e.campaign_id AND c.state IN ('running', 'paused') AND e.device_id = %(device)s
                 AND e.state = 'canceled' AND e.error ->> 'code' = %(code)s
               RETURNING e.id, e.campaign_id""",
            {"now": now, "device": device.pk, "code": QUARANTINED})
        rows = cursor.fetchall()
    if not rows:
        return 0
    requeued: dict[int, list[int]] = {}
    for execution_id, campaign_id in rows:
        requeued.setdefault(campaign_id, []).append(execution_id)
    for campaign in Campaign.objects.filter(id__in=list(requeued)).select_related("artifact").order_by("id"):
        audit.record(actor=actor, action="execution.requeue", target=campaign,
                     data={"reason": reason, "code": "released", "device": device.uid,
                           "executions": requeued[campaign.id]})
        if campaign.artifact_id is not None:  # as at campaign start: an older version next to a newer one is superseded
            _supersede(campaign, actor)
        if campaign.state == CS.RUNNING:
            _kick_after_commit(campaign.id)
    return len(rows)


def _kick_after_commit(campaign_id: int) -> None:
    from rollouts import orchestrator

    transaction.on_commit(lambda: orchestrator.kick(campaign_id))


# --- rate limiting helpers (used by the orchestrator) ------------------------------------

def effective_rate(campaign: Campaign) -> float:
    rate = float(campaign.rate_per_min)
    if campaign.ramp_initial_per_min:
        rate = min(rate, campaign.ramp_initial_per_min * 2.0 ** campaign.current_wave)
    return rate


def _burst(campaign: Campaign) -> float:
    """At most ~10 s worth of offers at once, so a paused or idle campaign does not bank a flood."""
    return max(1.0, math.ceil(effective_rate(campaign) / 6.0))
