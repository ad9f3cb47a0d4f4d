from rest_framework.routers import DefaultRouter

from security.api.views import AuditEntryViewSet, DeviceKeyViewSet, EnrollmentTokenViewSet

router = DefaultRouter()
router.register("enrollment-tokens", EnrollmentTokenViewSet)
router.register("device-keys", DeviceKeyViewSet)
router.register("audit", AuditEntryViewSet)
urlpatterns = router.urls
