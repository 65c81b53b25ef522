from django.apps import AppConfig


class SweepsConfig(AppConfig):
    name = "webapp.sweeps"
    label = "sweeps"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # The scheduler's loop drives running sweeps (record ended trials, prune, ask new ones): `tunedeck up` and
        # the compose file's scheduler need no extra process.
        from webapp.fleet.scheduler import register_pass
        from webapp.sweeps.services import advance_all

        register_pass("sweeps", advance_all)
