from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from webapp.fleet.models import Worker


class Command(BaseCommand):
    help = "Register a worker (or give an existing one a new token) and print its token once."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("name")
        parser.add_argument("--labels", default="", help="Comma-separated labels, e.g. a100,team-nlp.")

    def handle(self, *args: Any, name: str, labels: str, **options: Any) -> None:
        worker = Worker.objects.filter(name=name).first() or Worker(name=name)
        token = worker.set_new_token()
        worker.labels = [label.strip() for label in labels.split(",") if label.strip()]
        worker.save()
        self.stdout.write(token)
