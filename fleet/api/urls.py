from rest_framework.routers import DefaultRouter

from fleet.api.views import DeviceGroupViewSet, DeviceViewSet, SiteViewSet

router = DefaultRouter()
router.register("sites", SiteViewSet)
router.register("devices", DeviceViewSet)
router.register("groups", DeviceGroupViewSet)
urlpatterns = router.urls
