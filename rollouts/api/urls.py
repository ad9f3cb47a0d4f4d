from django.urls import path
from rest_framework.routers import DefaultRouter

from rollouts.api import views

router = DefaultRouter()
router.register("artifacts", views.ArtifactViewSet)
router.register("keys", views.SigningKeyViewSet)
router.register("campaigns", views.CampaignViewSet)
router.register("executions", views.ExecutionViewSet)

urlpatterns = [
    path("download/<str:token>/", views.download, name="rollouts-download"),
    *router.urls,
]
