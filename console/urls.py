"""Top-level URLs: admin, REST API v1 with its OpenAPI schema, health, metrics, dashboard."""

from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView
from rest_framework.permissions import AllowAny

from console import health

admin.site.site_header = "Edge fleet console"
admin.site.site_title = "Edge fleet console admin"

api_v1 = [
    path("", include("fleet.api.urls")),
    path("telemetry/", include("telemetry.api.urls")),
    path("security/", include("security.api.urls")),
    path("rollouts/", include("rollouts.api.urls")),
    path("schema/", SpectacularAPIView.as_view(permission_classes=[AllowAny]), name="api-schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="api-schema", permission_classes=[AllowAny]), name="api-docs"),
    path("redoc/", SpectacularRedocView.as_view(url_name="api-schema", permission_classes=[AllowAny]), name="api-redoc"),
]

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/v1/", include(api_v1)),
    path("healthz", health.healthz, name="healthz"),
    path("metrics", health.metrics, name="metrics"),
    path("", include("frontend.urls")),
]
