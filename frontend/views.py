"""Dashboard pages (the full dashboard grows with the other apps)."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required, permission_required
from django.db.models import Count
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from fleet.models import Device


@login_required
@permission_required("fleet.view_device", raise_exception=True)
def overview(request: HttpRequest) -> HttpResponse:
    by_status = dict(Device.objects.values_list("status").annotate(n=Count("id")).order_by())
    online = Device.objects.filter(online=True).count()
    devices = Device.objects.select_related("site").order_by("-online", "uid")[:100]
    return render(request, "frontend/overview.html", {
        "by_status": by_status, "total": sum(by_status.values()), "online": online, "devices": devices,
    })
