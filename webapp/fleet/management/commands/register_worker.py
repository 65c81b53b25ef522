from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from webapp.fleet.forms import RegisterWorkerForm, WorkerSettingsForm
from webapp.fleet.models import Worker


def _errors(form: Any) -> str:
    return "; ".join(f"{'--' + name.replace('_', '-') if name != '__all__' else ''} {' '.join(errs)}".strip()
                     for name, errs in form.errors.items())


class Command(BaseCommand):
    help = ("Register a worker and print its token once (the same checks as the workers page). For an existing "
            "worker, rotate its token: the old one keeps working for TUNEDECK_TOKEN_OVERLAP seconds.")

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("name")
        parser.add_argument("--labels", default=None, help="Comma-separated lowercase labels, e.g. a100,team-nlp.")
        parser.add_argument("--max-gpu-gib", default=None, help="At most this much GPU memory per job, in GiB.")
        parser.add_argument("--max-jobs", default=None, help="At most this many jobs at once.")

    def handle(self, *args: Any, name: str, labels: str | None, max_gpu_gib: str | None, max_jobs: str | None,
               **options: Any) -> None:
        fields = {"labels": labels, "max_gpu_gib": max_gpu_gib, "max_jobs": max_jobs}
        worker = Worker.objects.filter(name=name).first()
        if worker is None:
            form = RegisterWorkerForm({"name": name, **{k: v or "" for k, v in fields.items()}})
            registered = form.register() if form.is_valid() else None
            if registered is None:
                raise CommandError(_errors(form))
            _, token = registered
        else:
            token = self._rotate(worker, fields)
        self.stderr.write(f"Token of worker {name} (shown once; only its hash is kept). Start the worker with "
                          "TUNEDECK_WORKER_TOKEN=<token> tunedeck worker --server <this server's URL>")
        self.stdout.write(token)

    def _rotate(self, worker: Worker, fields: dict[str, str | None]) -> str:
        """A new token for an existing worker; labels and limits given on the command line replace the old ones."""
        given = {k: v for k, v in fields.items() if v is not None}
        form = WorkerSettingsForm({**WorkerSettingsForm.initial_for(worker), **given})
        if not form.is_valid():
            raise CommandError(_errors(form))
        with transaction.atomic():
            worker = Worker.objects.select_for_update().get(pk=worker.pk)
            form.apply(worker)
            token = worker.rotate_token(settings.TOKEN_OVERLAP)
            worker.save()
        return token
