"""FilterSets for the inventory API (and the dashboard's device table)."""

import django_filters
from django import forms

from fleet.models import Accelerator, Device, DeviceGroup, DeviceStatus, Site
from fleet.selector import compile_selector


class _StrictBooleanField(forms.NullBooleanField):
    widget = forms.TextInput

    def to_python(self, value):
        text = str(value).strip().lower() if value is not None else ""
        if text == "":
            return None
        if text in ("true", "1", "false", "0"):
            return text in ("true", "1")
        raise forms.ValidationError("must be true or false, not %(value)s", params={"value": repr(str(value)[:40])})

    def validate(self, value):
        pass


class StrictBooleanFilter(django_filters.BooleanFilter):
    """true/false (or 1/0); anything else is a 400 rather than silently no filter."""

    field_class = _StrictBooleanField


class DeviceFilter(django_filters.FilterSet):
    status = django_filters.MultipleChoiceFilter(choices=DeviceStatus.choices)
    site = django_filters.CharFilter(field_name="site__slug", help_text="site slug")
    tier = django_filters.MultipleChoiceFilter(choices=[(1, "1"), (2, "2"), (3, "3")])
    accelerator = django_filters.ChoiceFilter(choices=Accelerator.choices)
    hardware_model = django_filters.CharFilter()
    online = StrictBooleanFilter()
    group = django_filters.CharFilter(method="filter_group", help_text="group slug")
    selector = django_filters.CharFilter(
        method="filter_selector",
        help_text="label selector, e.g. `site=plant-7,tier in (1,2),!canary,env!=lab`",
    )

    class Meta:
        model = Device
        fields = ["status", "site", "tier", "accelerator", "hardware_model", "online"]

    def filter_group(self, queryset, name, value):
        members = DeviceGroup.devices.through.objects.filter(devicegroup__slug=value).values("device_id")
        return queryset.filter(id__in=members)

    def filter_selector(self, queryset, name, value):
        return queryset.filter(compile_selector(value))


class SiteFilter(django_filters.FilterSet):
    class Meta:
        model = Site
        fields = ["region", "slug"]
