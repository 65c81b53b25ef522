"""Push a folder (an adapter, a merged model) to a repository on the Hugging Face Hub.

One call: create the repository if it is missing (an existing one is kept, visibility included),
then upload the folder as one commit with huggingface_hub's `upload_folder`. With `hf_xet`
installed (huggingface_hub's default) large files go through Xet storage; a Hub without Xet needs
`HF_HUB_DISABLE_XET=1` in the worker's environment, which makes the client use plain Git LFS.

The access token is a secret: no message this module writes or raises contains it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from workers.contract.hubids import repo_id_problem

REPO_TYPES = ("model", "dataset")
_TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9]{8,}")
DEFAULT_ENDPOINT = "https://huggingface.co"


class HubError(Exception):
    """A push that cannot be done or failed; the message is safe to show and log (no token in it)."""


def scrub(text: str, token: str) -> str:
    """`text` with the token, and anything shaped like a Hub token, masked."""
    if token:
        text = text.replace(token, "***")
    return _TOKEN_LIKE.sub("hf_***", text)


def push_folder(
    folder: Path,
    repo_id: str,
    token: str,
    *,
    endpoint: str | None = None,
    private: bool = True,
    commit_message: str,
    repo_type: str = "model",
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Upload every file of `folder` to `repo_id` as one commit; return where the commit landed.

    The result holds repo_id, repo_url, commit_url, commit_oid, the pushed files (paths relative to
    the folder), their total bytes and the private flag asked for. Raises HubError on bad input
    or on any failure of the Hub, with a message that says what went wrong and never the token.
    """
    folder = Path(folder)
    files = _check_inputs(folder, repo_id, token, commit_message, repo_type)
    report = progress or (lambda _line: None)
    host = urlparse(endpoint or DEFAULT_ENDPOINT).netloc or (endpoint or DEFAULT_ENDPOINT)
    total = sum(f.stat().st_size for f in files)

    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=endpoint, token=token, library_name="tunedeck")
    stage = "creating the repository"
    try:
        report(
            f"Creating {'private' if private else 'public'} {repo_type} repository {repo_id} on {host} (kept if it exists)"
        )
        repo_url = api.create_repo(repo_id, private=private, repo_type=repo_type, exist_ok=True)
        stage = "uploading the files"
        report(f"Uploading {len(files)} file(s), {total:,} bytes, to {repo_id}")
        info = api.upload_folder(
            repo_id=repo_id, folder_path=folder, commit_message=commit_message, repo_type=repo_type
        )
    except HfHubHTTPError as exc:
        raise HubError(scrub(_describe(exc, repo_id, host, stage), token)) from None
    except httpx2.HTTPError as exc:
        raise HubError(scrub(f"could not reach the Hub at {host} while {stage}: {exc}", token)) from None
    except ConnectionError as exc:  # raised from inside the Xet upload when the Hub offers no Xet storage
        raise HubError(
            scrub(
                f"upload to {host} failed while {stage}: {exc}. If this Hub has no Xet storage, set "
                "HF_HUB_DISABLE_XET=1 in the worker's environment to upload large files with Git LFS",
                token,
            )
        ) from None
    report(f"Committed {info.oid[:12]} to {repo_id}: {info.commit_url}")
    return {
        "repo_id": repo_id,
        "repo_type": repo_type,
        "repo_url": str(repo_url),
        "commit_url": info.commit_url,
        "commit_oid": info.oid,
        "files": [f.relative_to(folder).as_posix() for f in files],
        "bytes": total,
        "private": private,
    }


def _check_inputs(folder: Path, repo_id: str, token: str, commit_message: str, repo_type: str) -> list[Path]:
    problem = repo_id_problem(repo_id)
    if problem:
        raise HubError(f"repository id {scrub(repo_id, token)!r}: {problem}")
    if repo_type not in REPO_TYPES:
        raise HubError(f"repo_type must be one of {', '.join(REPO_TYPES)}, got {repo_type!r}")
    if not token or not token.strip():
        raise HubError("no Hugging Face access token: a token with write permission is needed to push")
    if not commit_message.strip():
        raise HubError("the commit message is empty")
    if not folder.is_dir():
        raise HubError(f"{folder}: no such folder to push")
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

    # The files upload_folder sends: it always leaves out .git and .cache/huggingface folders.
    relative = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    files = [folder / name for name in filter_repo_objects(relative, ignore_patterns=DEFAULT_IGNORE_PATTERNS)]
    if not files:
        raise HubError(f"{folder}: the folder holds no files to push")
    return files


def _describe(exc: Any, repo_id: str, host: str, stage: str) -> str:
    """A readable reason for an HTTP error of the Hub."""
    status = exc.response.status_code if exc.response is not None else None
    server = (exc.server_message or "").strip().rstrip(".")
    detail = f" ({server})" if server else ""
    if status == 401:
        return (
            f"the Hub at {host} refused the access token while {stage} (401 Unauthorized{': ' + server if server else ''})."
            " Check that the token is valid and has write permission"
        )
    if status == 403:
        namespace = repo_id.split("/")[0]
        return (
            f"the token may not write to {repo_id} on {host} (403 Forbidden{': ' + server if server else ''})."
            f" It needs write access to the namespace {namespace!r}"
        )
    if status == 404:
        return f"the Hub at {host} answered 404 Not Found while {stage} for {repo_id}{detail}"
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"the Hub at {host} answered {status} while {stage} for {repo_id}: {server or first_line}"
