"""The push runner: upload an adapter or a merged model from the artifact store to the Hugging Face Hub."""

from __future__ import annotations

import time
from typing import Any

from workers.adapters.hub import HubError, push_folder, scrub
from workers.contract.jobspecs import PushSpec
from workers.contract.refusals import StaleAttempt
from workers.contract.reporter import Reporter
from workers.contract.store import ArtifactStore


def _say(reporter: Reporter, line: str) -> None:
    reporter.log(line)
    reporter.maybe_flush()


def run_push(spec: PushSpec, reporter: Reporter, store: ArtifactStore) -> dict[str, Any] | None:
    reporter.started()
    started = time.monotonic()
    try:
        problems = spec.validate()
        if problems:
            raise HubError("; ".join(f"{name}: {message}" for name, message in problems.items()))
        folder = store.path(spec.source_uri)
        if not folder.is_dir():
            raise HubError(f"{spec.source_uri} is not in the artifact store")
        result = push_folder(
            folder,
            spec.repo_id,
            spec.token,
            endpoint=spec.endpoint,
            private=spec.private,
            commit_message=spec.commit_message,
            progress=lambda line: _say(reporter, line),
        )
    except StaleAttempt:
        raise
    except HubError as exc:
        reporter.log(f"Failed: {exc}", level="error")
        reporter.finish("failed", error=str(exc))
        return None
    except Exception as exc:  # anything else, told without the token
        message = scrub(f"{type(exc).__name__}: {exc}", spec.token)
        reporter.log(f"Failed: {message}", level="error")
        reporter.finish("failed", error=message)
        return None
    result = {**result, "url": result["commit_url"], "runtime_s": round(time.monotonic() - started, 2)}
    reporter.finish("succeeded", result)
    return result
