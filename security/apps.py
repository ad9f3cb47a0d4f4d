from django.apps import AppConfig
from django.db.models.signals import post_migrate


class SecurityConfig(AppConfig):
    name = "security"
    verbose_name = "Security"

    def ready(self) -> None:
        from fleet import audit as audit_hook
        from security import audit, roles, throttle  # noqa: F401 -- throttle connects its signal receivers

        audit_hook.register_recorder(audit.record_entry)
        post_migrate.connect(roles.sync_roles_after_migrate, dispatch_uid="security.sync_roles")
