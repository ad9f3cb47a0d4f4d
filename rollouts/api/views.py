"""Rollouts API: thin views that validate input and call rollouts.services.

Commands (schedule, start, pause, resume, abort; key activate/revoke) are actions with a
reason; every one is audited by its service. Downloads are a plain view authorised only by
the signed, expiring token in the URL (the agent has no API token)."""

from __future__ import annotations

from django.core import signing as dj_signing
from django.db import connection
from django.http import FileResponse, HttpRequest, HttpResponse, JsonResponse
from django.utils.http import content_disposition_header
from django.views.decorators.http import require_GET
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from rollouts import selectors, services
from rollouts.api import serializers as s
from rollouts.filters import ArtifactFilter, CampaignFilter, ExecutionFilter
from rollouts.models import Artifact, Campaign, Execution, SigningKey


def _validated(serializer_class: type, request: Request) -> dict:
    serializer = serializer_class(data=request.data)
    serializer.is_valid(raise_exception=True)
    return dict(serializer.validated_data)


class SigningKeyViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """The artifact keyring (public halves only). Creating, activating and revoking keys is for admins."""

    queryset = SigningKey.objects.all()
    serializer_class = s.SigningKeySerializer
    search_fields = ["key_id"]  # the schema documents `search` on every list; make it mean something
    lookup_field = "key_id"
    action_permissions = {
        "create": ["rollouts.add_signingkey"],
        "activate": ["rollouts.change_signingkey"],
        "revoke": ["rollouts.change_signingkey"],
    }

    @extend_schema(request=None, responses={201: s.SigningKeySerializer})
    def create(self, request: Request) -> Response:
        """Create a key and make it the active signer (rotation: older keys still verify)."""
        key = services.signing_key_create(actor=request.user, activate=True)
        return Response(s.SigningKeySerializer(key).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=None, responses=s.SigningKeySerializer)
    @action(detail=True, methods=["post"])
    def activate(self, request: Request, key_id: str) -> Response:
        return Response(s.SigningKeySerializer(services.signing_key_activate(actor=request.user,
                                                                             key=self.get_object())).data)

    @extend_schema(request=s.RolloutReasonSerializer, responses=s.SigningKeySerializer)
    @action(detail=True, methods=["post"])
    def revoke(self, request: Request, key_id: str) -> Response:
        data = _validated(s.RolloutReasonSerializer, request)
        return Response(s.SigningKeySerializer(services.signing_key_revoke(
            actor=request.user, key=self.get_object(), reason=data["reason"])).data)


class ArtifactViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    queryset = Artifact.objects.prefetch_related("variants__key")
    serializer_class = s.ArtifactSerializer
    filterset_class = ArtifactFilter
    search_fields = ["name", "version", "description"]
    ordering_fields = ["name", "version", "created_at"]
    action_permissions = {"create": ["rollouts.add_artifact"]}

    @extend_schema(request={"multipart/form-data": s.ArtifactUploadSerializer}, responses={201: s.ArtifactSerializer})
    def create(self, request: Request) -> Response:
        """Upload an artifact (multipart). Size and SHA-256 are computed while storing; each
        variant gets a manifest signed by the active keyring key."""
        data = _validated(s.ArtifactUploadSerializer, request)
        variants = []
        if data.get("file"):
            variants.append(services.VariantUpload(name="default", tiers=[], file=data["file"]))
        for tier in (1, 2, 3):
            upload = data.get(f"file_tier{tier}")
            if upload:
                name = data["variant_names"].get(str(tier), f"tier{tier}")
                variants.append(services.VariantUpload(name=name, tiers=[tier], file=upload))
        artifact = services.artifact_create(
            actor=request.user, name=data["name"], kind=data["kind"], version=data["version"], variants=variants,
            hardware_models=data["hardware_models"], accelerators=data["accelerators"], min_tier=data["min_tier"],
            description=data["description"],
        )
        return Response(s.ArtifactSerializer(self.get_queryset().get(pk=artifact.pk)).data,
                        status=status.HTTP_201_CREATED)


CAMPAIGN_WRITE = set(services.CAMPAIGN_FIELDS)


class CampaignViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    queryset = Campaign.objects.select_related("artifact", "target_group", "target_site")
    serializer_class = s.CampaignSerializer
    filterset_class = CampaignFilter
    search_fields = ["name", "artifact_name"]
    ordering_fields = ["id", "name", "state", "created_at", "started_at"]
    action_permissions = {
        "create": ["rollouts.add_campaign"],
        "partial_update": ["rollouts.change_campaign"],
        "preview": ["rollouts.view_campaign"],
        "counts": ["rollouts.view_campaign"],
        "schedule": ["rollouts.control_campaign"],
        "start": ["rollouts.control_campaign"],
        "pause": ["rollouts.control_campaign"],
        "resume": ["rollouts.control_campaign"],
        "abort": ["rollouts.control_campaign"],
    }

    def _respond(self, campaign: Campaign, code: int = status.HTTP_200_OK) -> Response:
        return Response(s.CampaignSerializer(self.get_queryset().get(pk=campaign.pk)).data, status=code)

    def _fields(self, request: Request, partial: bool) -> dict:
        serializer = s.CampaignSerializer(data=request.data, partial=partial)
        serializer.is_valid(raise_exception=True)
        return {k: v for k, v in serializer.validated_data.items() if k in CAMPAIGN_WRITE | {"artifact"}}

    def create(self, request: Request) -> Response:
        """Create a draft campaign (nothing is offered until it is scheduled or started)."""
        fields = self._fields(request, partial=False)
        artifact = fields.pop("artifact", None)
        if artifact is None:
            from fleet.errors import InvalidInput

            raise InvalidInput("artifact is required")
        campaign = services.campaign_create(actor=request.user, artifact=artifact, **fields)
        return self._respond(campaign, status.HTTP_201_CREATED)

    def partial_update(self, request: Request, pk: str) -> Response:
        fields = self._fields(request, partial=True)
        fields.pop("artifact", None)
        return self._respond(services.campaign_update(actor=request.user, campaign=self.get_object(), **fields))

    @extend_schema(responses={200: {"type": "object"}})
    @action(detail=True, methods=["get"])
    def preview(self, request: Request, pk: str) -> Response:
        """Dry run: each wave's devices, devices left out with reasons, a duration estimate."""
        return Response(selectors.campaign_preview(campaign=self.get_object()))

    @extend_schema(responses={200: {"type": "object"}})
    @action(detail=True, methods=["get"])
    def counts(self, request: Request, pk: str) -> Response:
        """Executions by state (overall and per wave) and the latest gate values."""
        campaign = self.get_object()
        return Response({**selectors.campaign_counts(campaign), "state": campaign.state,
                         "current_wave": campaign.current_wave, "gates": campaign.gate_results})

    @extend_schema(request=s.ScheduleSerializer, responses=s.CampaignSerializer)
    @action(detail=True, methods=["post"])
    def schedule(self, request: Request, pk: str) -> Response:
        data = _validated(s.ScheduleSerializer, request)
        return self._respond(services.campaign_schedule(actor=request.user, campaign=self.get_object(),
                                                        start_at=data.get("start_at"), reason=data["reason"]))

    @extend_schema(request=s.ScheduleSerializer, responses=s.CampaignSerializer)
    @action(detail=True, methods=["post"])
    def start(self, request: Request, pk: str) -> Response:
        data = _validated(s.ScheduleSerializer, request)
        return self._respond(services.campaign_start(actor=request.user, campaign=self.get_object(),
                                                     reason=data["reason"]))

    @extend_schema(request=s.RolloutReasonSerializer, responses=s.CampaignSerializer)
    @action(detail=True, methods=["post"])
    def pause(self, request: Request, pk: str) -> Response:
        data = _validated(s.RolloutReasonSerializer, request)
        return self._respond(services.campaign_pause(actor=request.user, campaign=self.get_object(), **data))

    @extend_schema(request=s.RolloutReasonSerializer, responses=s.CampaignSerializer)
    @action(detail=True, methods=["post"])
    def resume(self, request: Request, pk: str) -> Response:
        data = _validated(s.RolloutReasonSerializer, request)
        return self._respond(services.campaign_resume(actor=request.user, campaign=self.get_object(), **data))

    @extend_schema(request=s.AbortSerializer, responses=s.CampaignSerializer)
    @action(detail=True, methods=["post"])
    def abort(self, request: Request, pk: str) -> Response:
        data = _validated(s.AbortSerializer, request)
        return self._respond(services.campaign_abort(actor=request.user, campaign=self.get_object(), **data))


class ExecutionViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    queryset = Execution.objects.select_related("device", "variant")
    serializer_class = s.ExecutionSerializer
    filterset_class = ExecutionFilter
    ordering_fields = ["id", "wave", "state", "updated_at"]


def _refuse(code: int, slug: str, detail: str) -> JsonResponse:
    return JsonResponse({"detail": detail, "code": slug}, status=code)


DOWNLOADABLE = (Execution.State.OFFERED, Execution.State.ACKED, Execution.State.DOWNLOADING,
                Execution.State.DOWNLOADED)
# Artifacts up to this size are read in the view and sent as one body. Under ASGI a FileResponse
# is a sync iterator that Django consumes in a second trip through a worker thread (with a
# warning each time); a campaign makes every device download once, so that hop is per device.
# Bigger files stream in blocks as before (memory stays bounded).
WHOLE_BODY_MAX_BYTES = 1024 * 1024


def _release_pooled_connection() -> None:
    """Hand a pooled database connection back as soon as the checks are done. Django returns it
    at the end of the request, after the body is sent: with a campaign's devices downloading at
    once (a new thread each under ASGI), the downloads held the pool's connections while their
    bytes went out and the agents' status reports queued behind them for a connection.
    (Only with a pool: a persistent connection, DB_CONN_MAX_AGE, is kept as it is.)"""
    if connection.settings_dict.get("OPTIONS", {}).get("pool") and not connection.in_atomic_block:
        connection.close()


@require_GET
def download(request: HttpRequest, token: str) -> FileResponse | JsonResponse:
    """The artifact file of one execution, for the holder of its short-lived signed URL."""
    try:
        claims = services.read_download_token(token)
    except dj_signing.SignatureExpired:
        return _refuse(410, "expired", "this download link has expired; the device gets a fresh one when the "
                                       "offer is sent again (reconnect or retry)")
    except dj_signing.BadSignature:
        return _refuse(403, "bad_token", "this download link is not valid")
    execution = (Execution.objects.select_related("variant", "device").filter(pk=claims.get("e")).first()
                 if isinstance(claims, dict) else None)
    if (execution is None or execution.variant_id != claims.get("v") or execution.attempt != claims.get("a")
            or execution.state not in DOWNLOADABLE):
        return _refuse(410, "gone", "this execution is no longer downloading (finished, canceled or re-offered)")
    if execution.device.status != "active":
        # An offer handed out before the device was quarantined (or decommissioned) must not
        # still deliver the artifact: quarantined devices receive no updates.
        return _refuse(403, "not_allowed", f"the device is {execution.device.status}; it may not download updates")
    variant = execution.variant
    _release_pooled_connection()
    filename = variant.file.name.rsplit("/", 1)[-1]
    if variant.size <= WHOLE_BODY_MAX_BYTES:
        with variant.file.open("rb") as f:
            body = f.read(WHOLE_BODY_MAX_BYTES + 1)
        response = HttpResponse(body, content_type="application/octet-stream")
        response["Content-Disposition"] = content_disposition_header(True, filename)
    else:
        response = FileResponse(variant.file.open("rb"), as_attachment=True, filename=filename,
                                content_type="application/octet-stream")
    response["X-Content-SHA256"] = variant.sha256
    response["Cache-Control"] = "private, no-store"
    return response
