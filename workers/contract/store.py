"""The artifact store: adapters, checkpoints and dataset files, addressed by `store://` URIs.

URIs are relative to the store's root so that the web server and each worker can mount the
same store at different paths. A local directory (or shared volume) is the backend today.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import zipfile
from pathlib import Path
from typing import BinaryIO

SCHEME = "store://"
COPY_BYTES = 1 << 20


class ArtifactStore:
    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).resolve()

    @classmethod
    def from_env(cls) -> ArtifactStore:
        return cls(os.environ.get("ARTIFACT_STORE") or Path(os.environ.get("TUNEDECK_VAR", "var")) / "artifacts")

    def path(self, uri: str) -> Path:
        if not uri.startswith(SCHEME):
            raise ValueError(f"not a store URI: {uri!r}")
        relative = Path(uri[len(SCHEME):])
        target = (self.root / relative).resolve()
        if relative.is_absolute() or not target.is_relative_to(self.root):
            raise ValueError(f"store URI escapes the store: {uri!r}")
        return target

    @staticmethod
    def uri(*parts: str | int) -> str:
        return SCHEME + "/".join(str(p).strip("/") for p in parts)

    def write_bytes(self, uri: str, data: bytes) -> Path:
        return self.write_stream(uri, io.BytesIO(data))

    def write_stream(self, uri: str, source: BinaryIO) -> Path:
        """Copy a file object from its start, a piece at a time (an upload may be larger than memory allows)."""
        target = self.path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".part")
        source.seek(0)
        with tmp.open("wb") as out:
            shutil.copyfileobj(source, out, COPY_BYTES)
        os.replace(tmp, target)
        return target

    def zip_dir(self, uri: str) -> Path:
        """Zip a stored directory once (next to it) and return the zip's path."""
        source = self.path(uri)
        archive = source.with_name(source.name + ".zip")
        if not archive.exists():
            tmp = archive.with_name(archive.name + ".part")
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                for file in sorted(source.rglob("*")):
                    if file.is_file():
                        zf.write(file, file.relative_to(source))
            os.replace(tmp, archive)
        return archive



def sha256_of(path: Path) -> str:
    """sha256 of a file, or of a directory's files in name order (name and content)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with file.open("rb") as fh:
            sha256_stream(fh, digest)
    return digest.hexdigest()


def sha256_stream(source: BinaryIO, digest: hashlib._Hash | None = None) -> hashlib._Hash:
    """`digest` (a new sha256 when None) fed with `source` from where it stands to its end, COPY_BYTES at a time."""
    digest = hashlib.sha256() if digest is None else digest
    for chunk in iter(lambda: source.read(COPY_BYTES), b""):
        digest.update(chunk)
    return digest


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
