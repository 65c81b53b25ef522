"""Exit codes that scripts can trust, and the error that carries one up to `main`."""

from __future__ import annotations

OK = 0
FAILED = 1  # the operation ran and failed: the run failed or was cancelled, a conflict (409)
USAGE = 2  # bad arguments, a bad run spec or file, the server's validation errors (400/422)
AUTH = 3  # no key, a refused key, or a key without the rights (401/403)
NOT_FOUND = 4  # no such object (404)
SERVER = 5  # the server failed (5xx), could not be reached, or kept refusing with 429


class CliError(Exception):
    """A message for stderr (a first line, then detail lines) and the process's exit code."""

    def __init__(self, message: str, code: int = USAGE, details: list[str] | None = None):
        super().__init__(message)
        self.message, self.code, self.details = message, code, details or []

    def lines(self) -> list[str]:
        return [f"error: {self.message}", *(f"  {line}" for line in self.details)]


def code_for_status(status: int) -> int:
    if status in (400, 422):
        return USAGE
    if status in (401, 403):
        return AUTH
    if status in (404, 410):
        return NOT_FOUND
    if status >= 500 or status == 429:
        return SERVER
    return FAILED
