"""The worker API's refusals, as the exceptions a runner and a reporter see (whatever carries the calls)."""

from __future__ import annotations


class StaleAttempt(Exception):
    """The control plane has moved on to a newer attempt (HTTP 409): stop, change nothing."""


class CancelledBeforeStart(StaleAttempt):
    """The claim was refused because the job was cancelled (HTTP 409, code `cancelled`): skip it, load nothing,
    report nothing (it is no failure)."""


class NotAssigned(Exception):
    """The job is not assigned to this worker (HTTP 403/404): a forged or stale wake-up."""
