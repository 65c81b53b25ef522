from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from webapp.api.models import ApiKey, refused_scopes
from workers.formatting import timestamp


class Command(BaseCommand):
    help = ("Make an API key for a user and print only its secret on stdout (for scripts: "
            "KEY=$(tunedeck manage create_api_key ci --create-user)); what was done goes to stderr.")

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("username")
        parser.add_argument("--name", default="automation", help="The key's name (default: automation).")
        parser.add_argument("--scopes", default="read,write",
                            help="Comma-separated: read, write, admin (staff only). Default: read,write.")
        parser.add_argument("--expires", type=int, default=None, metavar="DAYS",
                            help="The key stops working after this many days (default: until revoked).")
        parser.add_argument("--create-user", action="store_true",
                            help="Create the user when there is none (active, with no password: it works by keys).")

    def handle(self, *args: Any, username: str, name: str, scopes: str, expires: int | None, create_user: bool,
               **options: Any) -> None:
        if expires is not None and expires < 1:
            raise CommandError(f"--expires is a number of days, at least 1; got {expires}")
        wanted = [s.strip() for s in scopes.split(",") if s.strip()]
        user = self._user(username, create_user)
        refused = refused_scopes(user, wanted)
        if refused:
            raise CommandError(f"--scopes: {refused}")
        expires_at = timezone.now() + timedelta(days=expires) if expires else None
        key, raw = ApiKey.issue(user, name[:100], wanted, expires_at)
        until = f"until {timestamp(expires_at)}" if expires_at else "until revoked"
        self.stderr.write(f"API key {key.name!r} ({key.prefix}…) for {username}, scopes {', '.join(key.scopes)}, "
                          f"valid {until}; the secret is shown once, only its hash is kept.")
        self.stdout.write(raw)

    def _user(self, username: str, create: bool) -> Any:
        model = get_user_model()
        user = model._default_manager.filter(**{model.USERNAME_FIELD: username}).first()
        if user is None:
            if not create:
                raise CommandError(f"no user named {username!r} (--create-user makes one)")
            user = model._default_manager.create_user(username)  # no password given: an unusable one
            self.stderr.write(f"Created the user {username} (no password: an admin can set one).")
        if not user.is_active:
            raise CommandError(f"the user {username} is inactive: an admin can activate it")
        return user
