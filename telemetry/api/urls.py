"""Telemetry API routes (series, latest values, fleet aggregates, alerts)."""

from django.urls import path
from rest_framework.routers import DefaultRouter

from telemetry.api import views

router = DefaultRouter()
router.register("alert-rules", views.AlertRuleViewSet)
router.register("alerts", views.AlertViewSet)
router.register("events", views.DeviceEventViewSet)

urlpatterns = [
    path("series/", views.SeriesView.as_view(), name="telemetry-series"),
    path("series.csv", views.SeriesView.as_view(), {"format": "csv"}, name="telemetry-series-csv"),
    path("latest/", views.LatestView.as_view(), name="telemetry-latest"),
    path("fleet/", views.FleetView.as_view(), name="telemetry-fleet"),
    *router.urls,
]
