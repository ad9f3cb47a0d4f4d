from django.contrib.auth import views as auth_views
from django.urls import path

from frontend.views import alerts, devices, overview, rollouts, security

urlpatterns = [
    path("login/", auth_views.LoginView.as_view(template_name="frontend/login.html", redirect_authenticated_user=True),
         name="login"),
    path("logout/", auth_views.LogoutView.as_view(next_page="login"), name="logout"),
    path("", overview.overview, name="overview"),
    path("devices/", devices.device_list, name="devices"),
    path("devices/_bulk/", devices.device_bulk, name="devices-bulk"),
    path("devices/<str:uid>/", devices.device_detail, name="device"),
    path("devices/<str:uid>/series.json", devices.device_series, name="device-series"),
    path("devices/<str:uid>/do/<str:name>/", devices.device_action, name="device-action"),
    path("security/", security.security_home, name="security"),
    path("security/tokens/", security.token_create, name="token-create"),
    path("security/tokens/<int:pk>/revoke/", security.token_revoke, name="token-revoke"),
    path("security/policies/<int:pk>/approve/", security.policy_approve, name="policy-approve"),
    path("security/quarantine/<str:uid>/release/", security.release, name="security-release"),
    path("security/audit/", security.audit_log, name="audit"),
    path("alerts/", alerts.alerts, name="alerts"),
    path("alerts/<int:pk>/acknowledge/", alerts.alert_ack, name="alert-ack"),
    path("alerts/rules/new/", alerts.rule_create, name="rule-create"),
    path("alerts/rules/<int:pk>/", alerts.rule_edit, name="rule-edit"),
    path("rollouts/", rollouts.rollouts_home, name="rollouts"),
    path("rollouts/artifacts/", rollouts.artifact_upload, name="artifact-upload"),
    path("rollouts/campaigns/", rollouts.campaign_create, name="campaign-create"),
    path("rollouts/campaigns/<int:pk>/", rollouts.campaign_detail, name="campaign"),
    path("rollouts/campaigns/<int:pk>/<str:verb>/", rollouts.campaign_control, name="campaign-control"),
]
