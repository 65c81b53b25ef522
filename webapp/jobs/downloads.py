"""Folders of the artifact store as zip downloads, streamed while they are built."""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path

from django.http import StreamingHttpResponse


class _Pipe:
    """A write-only file object whose writes are collected and handed out as the zip is built."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.offset = 0

    def write(self, data: bytes) -> int:
        self.chunks.append(bytes(data))
        self.offset += len(data)
        return len(data)

    def tell(self) -> int:
        return self.offset

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        data, self.chunks = b"".join(self.chunks), []
        return data


def stream_zip(folder: Path, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    """A zip of a folder, produced while it is sent: constant memory whatever the model's size.

    Safetensors shards are stored, not deflated (they do not compress, and unpacking stays a copy)."""
    pipe = _Pipe()
    with zipfile.ZipFile(pipe, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:  # type: ignore[call-overload]
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            info = zipfile.ZipInfo.from_file(file, str(file.relative_to(folder)))
            info.compress_type = zipfile.ZIP_STORED if file.suffix == ".safetensors" else zipfile.ZIP_DEFLATED
            with file.open("rb") as source, archive.open(info, "w", force_zip64=True) as target:
                while block := source.read(chunk_size):
                    target.write(block)
                    yield pipe.take()
            yield pipe.take()
    yield pipe.take()


def zip_response(folder: Path, filename: str) -> StreamingHttpResponse:
    response = StreamingHttpResponse((c for c in stream_zip(folder) if c), content_type="application/zip")
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    response["X-Accel-Buffering"] = "no"
    return response
