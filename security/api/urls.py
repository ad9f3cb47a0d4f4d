from rest_framework.routers import DefaultRouter

from security.api.views import (
    AttestationPolicyViewSet,
    AttestationResultViewSet,
    AuditEntryViewSet,
    DeviceKeyViewSet,
    DeviceTrustViewSet,
    EnrollmentTokenViewSet,
    TrustAnchorViewSet,
)

router = DefaultRouter()
router.register("enrollment-tokens", EnrollmentTokenViewSet)
router.register("device-keys", DeviceKeyViewSet)
router.register("audit", AuditEntryViewSet)
router.register("attestation/results", AttestationResultViewSet)
router.register("attestation/trust", DeviceTrustViewSet)
router.register("attestation/policies", AttestationPolicyViewSet)
router.register("attestation/trust-anchors", TrustAnchorViewSet)
urlpatterns = router.urls
