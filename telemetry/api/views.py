"""Telemetry API: series (JSON or CSV), latest values, fleet aggregates, alert rules, alerts, events.

Reads call telemetry.selectors; changes call telemetry.services. Bad parameters raise
InvalidInput, which the project's exception handler turns into 400 with a readable `detail`.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from typing import Any

from django.db.models import QuerySet
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import mixins, renderers, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from fleet.errors import InvalidInput
from fleet.models import Device
from fleet.selector import compile_selector
from telemetry import conf, selectors, services
from telemetry.api import serializers as s
from telemetry.models import Alert, AlertRule, DeviceEvent

READ = {"GET": ["telemetry.view_metric"], "HEAD": ["telemetry.view_metric"], "OPTIONS": ["telemetry.view_metric"]}


class CSVRenderer(renderers.BaseRenderer):
    media_type = "text/csv"
    format = "csv"
    charset = "utf-8"

    def render(self, data: Any, accepted_media_type: str | None = None, renderer_context: dict | None = None) -> bytes:
        out = io.StringIO()
        writer = csv.writer(out)
        if isinstance(data, dict) and "series" in data:
            writer.writerow(["device", "metric", "time", "value"])
            for item in data["series"]:
                for t_ms, value in item["points"]:
                    when = dt.datetime.fromtimestamp(t_ms / 1000, tz=dt.UTC).isoformat().replace("+00:00", "Z")
                    writer.writerow([item["device"], item["metric"], when, "" if value is None else repr(value)])
        else:  # an error: {"detail": ...}
            writer.writerow(["detail"])
            writer.writerow([data.get("detail", "") if isinstance(data, dict) else data])
        return out.getvalue().encode()


def parse_time(value: str | None, name: str, default: dt.datetime) -> dt.datetime:
    if value in (None, ""):
        return default
    if value.lstrip("-").isascii() and value.lstrip("-").isdigit():  # `isdigit` alone also passes '²'
        try:
            return dt.datetime.fromtimestamp(int(value) / 1000, tz=dt.UTC)
        except (OverflowError, OSError, ValueError):
            raise InvalidInput(f"{name}: {value[:40]!r} epoch milliseconds are out of range") from None
    try:
        parsed = parse_datetime(value)
    except ValueError:
        parsed = None
    if parsed is None:
        raise InvalidInput(f"{name}: {value[:80]!r} is not a time; use ISO 8601 (2025-01-31T12:00:00Z) or epoch "
                           "milliseconds")
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def _range(request: Request, default_span: dt.timedelta = dt.timedelta(hours=1)) -> tuple[dt.datetime, dt.datetime]:
    end = parse_time(request.query_params.get("end"), "end", timezone.now())
    try:
        start = parse_time(request.query_params.get("start"), "start", end - default_span)
    except OverflowError:
        raise InvalidInput("end: too early to have a default start; give start too") from None
    if end <= start:
        raise InvalidInput("end must be after start")
    return start, end


def _text_params(request: Request, name: str) -> list[str]:
    """A repeatable text parameter; NUL characters are refused here (PostgreSQL text cannot hold them)."""
    values = request.query_params.getlist(name)
    if any("\x00" in value for value in values):
        raise InvalidInput(f"{name}: NUL characters are not allowed")
    return values


def _devices(request: Request, *, cap: int, required: bool = True) -> tuple[list[tuple[int, str]], bool, bool]:
    """(id, uid) of the devices named by `device=` (repeatable) or `selector=`; truncated?; by selector?"""
    uids = _text_params(request, "device")
    selector = request.query_params.get("selector")
    if uids and selector:
        raise InvalidInput("give either device=… or selector=…, not both")
    if uids:
        found = dict(Device.objects.filter(uid__in=uids).values_list("uid", "id"))
        missing = [u for u in uids if u not in found]
        if missing:
            raise InvalidInput(f"unknown devices: {', '.join(missing[:20])}")
        return [(found[u], u) for u in dict.fromkeys(uids)], False, False
    if selector is None:
        if required:
            raise InvalidInput("give device=<uid> (repeatable) or selector=<label selector>")
        selector = ""
    devices = Device.objects.exclude(status="decommissioned").filter(compile_selector(selector)).order_by("uid")
    rows = list(devices.values_list("id", "uid")[: cap + 1])
    return rows[:cap], len(rows) > cap, True


def _metric_names(request: Request) -> list[str]:
    names = _text_params(request, "metric")
    if not names:
        raise InvalidInput("give metric=<name> (repeatable)")
    return names


class SeriesView(APIView):
    """Time series of metrics for devices, bucketed so a series has at most ~2,000 points.

    `bucket=auto` reads raw points for short ranges, 1-minute rollups up to ~33 h steps, 1-hour
    rollups beyond; `p95` and `bucket=raw` read raw points (≤ 24 h, named devices only)."""

    required_permissions = READ
    renderer_classes = [renderers.JSONRenderer, renderers.BrowsableAPIRenderer, CSVRenderer]

    @extend_schema(parameters=[
        OpenApiParameter("device", str, many=True), OpenApiParameter("selector", str),
        OpenApiParameter("metric", str, many=True, required=True), OpenApiParameter("start", str),
        OpenApiParameter("end", str), OpenApiParameter("agg", str, enum=list(selectors.AGGS)),
        OpenApiParameter("bucket", str, description="auto, raw, 1m, 1h or <n>s/<n>m/<n>h"),
    ], responses={200: {"type": "object"}})
    def get(self, request: Request, format: str | None = None) -> Response:
        start, end = _range(request)
        agg = request.query_params.get("agg", "avg")
        bucket = request.query_params.get("bucket", "auto")
        names = _metric_names(request)
        max_series = conf.get("MAX_SERIES_PER_REQUEST")
        devices, truncated, fleet = _devices(request, cap=max(1, max_series // len(names)))
        if truncated:
            raise InvalidInput(f"the selector matches more than {max_series // len(names)} devices; at most "
                               f"{max_series} series per request: narrow it, or use /fleet/ for aggregates")
        ids = selectors.metric_ids(names)
        result = selectors.series(device_ids=[d for d, _ in devices], metric_ids=list(ids.values()), start=start,
                                  end=end, agg=agg, bucket=bucket, fleet=fleet)
        uid_of = dict(devices)
        name_of = {v: k for k, v in ids.items()}
        res = result["resolution"]
        watermark = selectors.rollup_watermark()
        return Response({
            "start": start, "end": end, "agg": agg, "source": res.source, "bucket_s": res.step_s,
            "rollup_watermark": watermark if res.source != "raw" else None, "truncated": result["truncated"],
            "series": [
                {"device": uid_of[d], "metric": name_of[m],
                 "points": [[int(t.timestamp() * 1000), v] for t, v in points]}
                for (d, m), points in result["series"].items()
            ],
        })


class LatestView(APIView):
    """The latest value of one metric for many devices (the fleet table)."""

    required_permissions = READ

    @extend_schema(parameters=[
        OpenApiParameter("metric", str, required=True), OpenApiParameter("device", str, many=True),
        OpenApiParameter("selector", str),
    ], responses={200: {"type": "object"}})
    def get(self, request: Request) -> Response:
        names = _metric_names(request)
        if len(names) != 1:
            raise InvalidInput("give exactly one metric")
        devices, truncated, _ = _devices(request, cap=conf.get("LATEST_MAX_DEVICES"), required=False)
        metric_id = selectors.metric_ids(names)[names[0]]
        values = selectors.latest(metric_id=metric_id, device_ids=[d for d, _ in devices])
        return Response({
            "metric": names[0], "window_s": conf.get("LATEST_WINDOW_S"), "truncated": truncated,
            "results": [
                {"device": uid, "time": values[d][0] if d in values else None,
                 "value": values[d][1] if d in values else None}
                for d, uid in devices
            ],
        })


class FleetView(APIView):
    """One value of a metric per site, tier or group over a range, from rollups."""

    required_permissions = READ

    @extend_schema(parameters=[
        OpenApiParameter("metric", str, required=True), OpenApiParameter("by", str, enum=list(selectors.FLEET_GROUPINGS)),
        OpenApiParameter("start", str), OpenApiParameter("end", str), OpenApiParameter("agg", str),
        OpenApiParameter("selector", str),
    ], responses={200: {"type": "object"}})
    def get(self, request: Request) -> Response:
        names = _metric_names(request)
        if len(names) != 1:
            raise InvalidInput("give exactly one metric")
        start, end = _range(request, dt.timedelta(hours=24))
        by = request.query_params.get("by", "site")
        agg = request.query_params.get("agg", "avg")
        device_ids = None
        if "selector" in request.query_params:
            selected = Device.objects.filter(compile_selector(request.query_params["selector"]))
            device_ids = list(selected.values_list("id", flat=True))
        metric_id = selectors.metric_ids(names)[names[0]]
        rows = selectors.fleet_aggregate(metric_id=metric_id, by=by, start=start, end=end, agg=agg,
                                         device_ids=device_ids)
        return Response({"metric": names[0], "by": by, "agg": agg, "start": start, "end": end, "results": rows})


class AlertRuleViewSet(viewsets.ModelViewSet):
    queryset = AlertRule.objects.select_related("device", "group", "created_by")
    serializer_class = s.AlertRuleSerializer
    filterset_fields = ["enabled", "kind", "severity", "metric"]
    search_fields = ["name", "metric"]
    ordering_fields = ["id", "name", "created_at"]

    def perform_create(self, serializer: s.AlertRuleSerializer) -> None:
        serializer.instance = services.alert_rule_create(actor=self.request.user, **serializer.validated_data)

    def perform_update(self, serializer: s.AlertRuleSerializer) -> None:
        serializer.instance = services.alert_rule_update(actor=self.request.user, rule=serializer.instance,
                                                         **serializer.validated_data)

    def perform_destroy(self, instance: AlertRule) -> None:
        services.alert_rule_delete(actor=self.request.user, rule=instance)


class AlertViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    queryset = Alert.objects.select_related("rule", "device", "acknowledged_by")
    serializer_class = s.AlertSerializer
    filterset_fields = ["state", "severity", "rule"]
    ordering_fields = ["id", "opened_at"]
    action_permissions = {"acknowledge": ["telemetry.change_alert"]}

    def get_queryset(self) -> QuerySet:
        queryset = super().get_queryset()
        device = (_text_params(self.request, "device") or [None])[-1]
        return queryset.filter(device__uid=device) if device else queryset

    @extend_schema(request=s.AcknowledgeSerializer, responses=s.AlertSerializer)
    @action(detail=True, methods=["post"])
    def acknowledge(self, request: Request, pk: str) -> Response:
        body = s.AcknowledgeSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        alert = services.alert_acknowledge(alert=self.get_object(), actor=request.user, **body.validated_data)
        return Response(s.AlertSerializer(self.get_queryset().get(pk=alert.pk)).data)


class DeviceEventViewSet(mixins.ListModelMixin, viewsets.GenericViewSet):
    queryset = DeviceEvent.objects.select_related("device")
    serializer_class = s.DeviceEventSerializer
    filterset_fields = ["kind", "severity"]
    ordering_fields = ["id", "time"]

    def get_queryset(self) -> QuerySet:
        queryset = super().get_queryset()
        device = (_text_params(self.request, "device") or [None])[-1]
        return queryset.filter(device__uid=device) if device else queryset
