"""FilterSets for the rollouts API."""

import django_filters

from rollouts.models import Artifact, Campaign, Execution, Kind


class ArtifactFilter(django_filters.FilterSet):
    kind = django_filters.ChoiceFilter(choices=Kind.choices)

    class Meta:
        model = Artifact
        fields = ["name", "kind", "version"]


class CampaignFilter(django_filters.FilterSet):
    state = django_filters.MultipleChoiceFilter(choices=Campaign.State.choices)
    kind = django_filters.ChoiceFilter(choices=Kind.choices)

    class Meta:
        model = Campaign
        fields = ["state", "kind", "artifact"]


class ExecutionFilter(django_filters.FilterSet):
    state = django_filters.MultipleChoiceFilter(choices=Execution.State.choices)
    device = django_filters.CharFilter(field_name="device__uid", help_text="device uid")
    error_code = django_filters.CharFilter(field_name="error__code")

    class Meta:
        model = Execution
        fields = ["campaign", "state", "wave", "device", "component"]
