"""What every job runner shares: one attempt reported from start to finish.

`run_reported(reporter, body)` sends "running" (and stops there, cancelled, if the reply says the job was cancelled
since its claim), runs the body, and reports exactly one final state:
succeeded with the body's result, cancelled (the body raised `Cancelled`), interrupted (the body raised
`Interrupted`, or stopped because the worker is shutting down: the job goes back to the queue without
counting as a failure), or failed with a readable reason (one of the expected errors: the message alone;
anything else: its traceback in the log). The ML libraries' log warnings and Python warnings go to the
job's log meanwhile. A `StaleAttempt` (a newer attempt owns the job) is re-raised with nothing more
reported.
"""

from __future__ import annotations

import logging
import traceback
import warnings
from collections.abc import Callable
from typing import Any

from workers.contract.refusals import StaleAttempt
from workers.contract.reporter import Reporter

INTERRUPTED = "interrupted"  # the final report of an attempt that hands its job back
REQUEUE = "requeue"  # the final report of an attempt this worker could not run (its disk full): run it again
FORWARDED_LOGGERS = ("transformers", "peft", "trl", "accelerate", "bitsandbytes")


class RunnerError(Exception):
    """A problem the user can fix, reported as the run's failure reason without a traceback."""


class Cancelled(Exception):
    """The job must stop (see `Reporter.cancel_requested`): the runner stops where it is."""


class Interrupted(Exception):
    """The worker is shutting down: the runner has saved what it can and hands the job back."""


class ReporterLogHandler(logging.Handler):
    """Forward the ML libraries' warnings into the job's log."""

    def __init__(self, reporter: Reporter):
        super().__init__(level=logging.WARNING)
        self.reporter = reporter

    def emit(self, record: logging.LogRecord) -> None:
        self.reporter.log(f"{record.name}: {record.getMessage()}", level=record.levelname.lower())


def check_cancel(reporter: Reporter) -> None:
    """Send what is buffered (the reply says whether cancel was asked) and stop if it was."""
    reporter.flush()
    if reporter.interrupt_reason and not reporter.user_cancelled:
        raise Interrupted(reporter.interrupt_reason)
    if reporter.cancel_requested:
        raise Cancelled()


def run_reported(
    reporter: Reporter,
    body: Callable[[], dict[str, Any]],
    expected: tuple[type[Exception], ...] = (),
    cancelled_message: str = "Cancelled at the user's request.",
    cleanup: Callable[[], None] | None = None,
) -> dict[str, Any] | None:
    """Run one attempt of a job and report its outcome; returns the result on success, else None."""
    handler = ReporterLogHandler(reporter)
    for name in FORWARDED_LOGGERS:
        logging.getLogger(name).addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                reporter.started()
                if reporter.cancel_requested:  # cancelled after the claim, before this first report: load nothing
                    raise Cancelled()
                result = body()
            finally:
                forward_warnings(caught, reporter)
    except StaleAttempt:
        raise  # a newer attempt owns the job: report nothing more
    except (Cancelled, Interrupted) as exc:
        # Runners raise Cancelled for any stop; the reporter knows which one it was.
        if reporter.superseded:
            raise StaleAttempt("a newer attempt owns this job") from exc
        reason = reporter.interrupt_reason
        if isinstance(exc, Interrupted):
            reason = reason or str(exc) or "the worker is shutting down"
        if reporter.user_cancelled or not reason:
            reporter.log(cancelled_message, level="warning")
            reporter.finish("cancelled")
            return None
        reporter.log(f"Interrupted: {reason}. The job goes back to the queue.", level="warning")
        reporter.finish(INTERRUPTED, error=reason)
        return None
    except expected as exc:
        reporter.log(f"Failed: {exc}", level="error")
        reporter.finish("failed", error=str(exc))
        return None
    except Exception as exc:
        reporter.log("".join(traceback.format_exception(exc)).rstrip(), level="error")
        reporter.finish("failed", error=f"{type(exc).__name__}: {exc}")
        return None
    finally:
        if cleanup is not None:
            cleanup()
        for name in FORWARDED_LOGGERS:
            logging.getLogger(name).removeHandler(handler)
    reporter.finish("succeeded", result)
    return result


def forward_warnings(caught: list[warnings.WarningMessage], reporter: Reporter) -> None:
    """The libraries' Python warnings (PEFT and transformers speak through them), each distinct one once;
    deprecation notices are for the code's authors, not the job's log."""
    seen: set[str] = set()
    for item in caught:
        text = f"{item.category.__name__}: {item.message}"
        if text not in seen and not issubclass(item.category, (DeprecationWarning, FutureWarning)):
            seen.add(text)
            reporter.log(text, level="warning")
