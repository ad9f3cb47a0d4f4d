"""What the dashboard may show of rollouts/, which is written in parallel.

The rollout pages render a TODO empty state until rollouts/ has its models and services.
"""

from __future__ import annotations

from django.apps import apps


def rollouts_ready() -> bool:
    try:
        config = apps.get_app_config("rollouts")
    except LookupError:
        return False
    names = {m.__name__ for m in config.get_models()}
    return {"Artifact", "Campaign", "Execution"} <= names
