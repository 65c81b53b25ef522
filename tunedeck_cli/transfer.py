"""Uploads and downloads with a progress bar: files stream, never held whole in memory."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from tunedeck_cli.api import Api
from tunedeck_cli.errors import USAGE, CliError
from tunedeck_cli.output import progress

CHUNK = 1 << 16


class ProgressReader:
    """A binary file whose reads move a progress bar (httpx streams a multipart file through read())."""

    def __init__(self, handle: IO[bytes], bar: tqdm):
        self.handle, self.bar = handle, bar

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self._sync()
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        position = self.handle.seek(offset, whence)
        self._sync()  # a retried request reads the file again from the start
        return position

    def tell(self) -> int:
        return self.handle.tell()

    def fileno(self) -> int:
        return self.handle.fileno()

    def _sync(self) -> None:
        self.bar.update(self.handle.tell() - self.bar.n)


def upload(api: Api, path: str, file: Path, fields: dict[str, str], quiet: bool,
           idempotency_key: str | None = None) -> Any:
    try:
        size = file.stat().st_size
        handle = file.open("rb")
    except OSError as exc:
        raise CliError(f"cannot read {file}: {exc.strerror}", USAGE) from exc
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    with handle, progress(size, f"upload {file.name}", quiet=quiet, bytes_=True) as bar:
        reader = ProgressReader(handle, bar)
        response = api.request("POST", path, data=fields, headers=headers,
                               files={"file": (file.name, reader, "application/octet-stream")})
    return response.json()


def _attachment_name(disposition: str) -> str | None:
    match = re.search(r"filename\*?=(?:UTF-8'')?\"?([^\";]+)\"?", disposition or "")
    name = Path(match.group(1)).name if match else ""
    return name or None


def download(api: Api, path: str, output: str | None, default_name: str, quiet: bool, force: bool) -> Path:
    """Stream to FILE.part and rename when complete, so a cut download never looks finished."""
    with api.stream(path) as response:
        target = Path(output or _attachment_name(response.headers.get("content-disposition", "")) or default_name)
        if target.is_dir():
            target = target / (_attachment_name(response.headers.get("content-disposition", "")) or default_name)
        if target.exists() and not force:
            raise CliError(f"{target} exists: pass --force to overwrite it, or -o to choose another file", USAGE)
        partial = target.with_name(target.name + ".part")
        total = int(response.headers.get("content-length") or 0)
        try:
            with partial.open("wb") as out, progress(total, f"download {target.name}", quiet=quiet,
                                                      bytes_=True) as bar:
                for chunk in response.iter_bytes(CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        if total and partial.stat().st_size != total:
            partial.unlink(missing_ok=True)
            raise CliError(f"the download of {target.name} was cut short ({total} bytes expected)", 5)
        partial.replace(target)
    return target
