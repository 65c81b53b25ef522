"""A local stand-in for the Hugging Face Hub's HTTP API: enough for create_repo and upload_folder.

It serves, on 127.0.0.1 in a background thread, the routes huggingface_hub 2.x calls to push a
folder, and keeps what arrives so tests can check it byte for byte:

- POST /api/repos/create                              create a repo (409 with its URL if it exists)
- GET  /api/{type}s/{ns}/{name}[/revision/{rev}]      repo info (create_repo's fallback, empty commits)
- POST /api/validate-yaml                             README.md front matter check (always valid here)
- POST /api/{type}s/{ns}/{name}/preupload/{rev}       "regular" or "lfs" per file, with the remote oid
- POST /{prefix}{ns}/{name}.git/info/lfs/objects/batch  Git LFS batch API, "basic" transfer only
- PUT  /lfs-objects/{oid}?ticket=...                  the upload URL handed out by the batch call (no auth,
                                                      like a presigned storage URL); checks the sha256
- POST /lfs-verify                                    LFS verify action
- POST /api/{type}s/{ns}/{name}/commit/{rev}          NDJSON commit: inline base64 files and LFS pointers

A Xet token request (GET .../xet-write-token/...) is answered 404, as by a Hub without Xet storage,
and any other request 404 too; both are recorded so a test can assert none happened. Every route
but the LFS object PUT requires `Authorization: Bearer <token>` and answers 401 otherwise.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import secrets
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.gguf")
LFS_MIN_SIZE = 10 * 2**20  # larger files go to LFS whatever their name
INVALID_TOKEN = "Invalid credentials in Authorization header"
REPO = r"(?P<type>model|dataset|space)s/(?P<repo>[^/]+/[^/]+)"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    message: str
    description: str
    files: dict[str, bytes]  # what this commit added or changed
    lfs_paths: list[str]  # those of them that came through LFS


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    lfs_paths: set[str] = field(default_factory=set)
    commits: list[Commit] = field(default_factory=list)

    @property
    def head(self) -> str | None:
        return self.commits[-1].oid if self.commits else None


@dataclass
class Request:
    method: str
    path: str
    authorization: str | None


class FakeHub:
    """Run with `with FakeHub(token) as hub:`; `hub.url` is the endpoint to give to HfApi."""

    def __init__(self, token: str, lfs_patterns: tuple[str, ...] = LFS_PATTERNS) -> None:
        self.token = token
        self.lfs_patterns = lfs_patterns
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> bytes received by PUT
        self.requests: list[Request] = []
        self.unhandled: list[str] = []  # "METHOD path" of requests no route answered (Xet ones included)
        self._tickets: dict[str, str] = {}  # upload ticket -> oid it may carry
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-hub", daemon=True
        )

    @property
    def url(self) -> str:
        port = self._server.server_address[1]
        return f"http://127.0.0.1:{port}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self.repos[(repo_type, repo_id)]

    # ------------------------------------------------------------------ routes

    def handle(self, method: str, path: str, query: dict[str, list[str]], headers: Any, body: bytes) -> tuple:
        """Answer one request: (status, JSON-able body, extra headers)."""
        if method == "PUT" and (m := re.fullmatch(r"/lfs-objects/(?P<oid>[0-9a-f]{64})", path)):
            return self._lfs_put(m["oid"], query.get("ticket", [""])[0], body)
        self.requests.append(Request(method, path, headers.get("Authorization")))
        if headers.get("Authorization") != f"Bearer {self.token}":
            return 401, {"error": INVALID_TOKEN}, {"X-Error-Message": INVALID_TOKEN}
        routes = [
            ("POST", r"/api/repos/create", self._create),
            ("POST", r"/api/validate-yaml", lambda m, b: (200, {"errors": [], "warnings": []}, {})),
            ("POST", rf"/api/{REPO}/preupload/(?P<rev>[^/]+)", self._preupload),
            ("POST", rf"/api/{REPO}/commit/(?P<rev>[^/]+)", self._commit),
            ("POST", r"/(?P<prefix>datasets/|spaces/)?(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch", self._batch),
            ("POST", r"/lfs-verify", self._verify),
            ("GET", rf"/api/{REPO}(?:/revision/(?P<rev>[^/]+))?", self._info),
        ]
        for route_method, pattern, action in routes:
            if method == route_method and (m := re.fullmatch(pattern, path)):
                return action(m, body)
        self.unhandled.append(f"{method} {path}")
        return 404, {"error": f"fake hub: no route for {method} {path}"}, {}

    def _find(self, repo_type: str, repo_id: str) -> Repo | None:
        return self.repos.get((repo_type, unquote(repo_id)))

    def _not_found(self) -> tuple:
        return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}

    def _create(self, m: re.Match, body: bytes) -> tuple:
        payload = json.loads(body)
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        url = f"{self.url}/{'' if repo_type == 'model' else repo_type + 's/'}{repo_id}"
        with self._lock:
            if (repo_type, repo_id) in self.repos:
                return 409, {"error": "You already created this model repo", "url": url}, {}
            private = payload.get("visibility", "public") == "private"
            self.repos[(repo_type, repo_id)] = Repo(repo_id, repo_type, private)
        return 200, {"url": url, "name": repo_id}, {}

    def _info(self, m: re.Match, body: bytes) -> tuple:
        repo = self._find(m["type"], m["repo"])
        if repo is None:
            return self._not_found()
        siblings = [{"rfilename": name} for name in sorted(repo.files)]
        return 200, {"id": repo.repo_id, "sha": repo.head, "private": repo.private, "siblings": siblings}, {}

    def _is_lfs(self, path: str, size: int) -> bool:
        return size >= LFS_MIN_SIZE or any(fnmatch.fnmatch(path.rsplit("/", 1)[-1], p) for p in self.lfs_patterns)

    def _preupload(self, m: re.Match, body: bytes) -> tuple:
        repo = self._find(m["type"], m["repo"])
        if repo is None:
            return self._not_found()
        answers = []
        for item in json.loads(body)["files"]:
            path, size = item["path"], int(item["size"])
            lfs = self._is_lfs(path, size) and size > 0
            existing = repo.files.get(path)
            oid = None
            if existing is not None:
                oid = hashlib.sha256(existing).hexdigest() if lfs else git_blob_sha1(existing)
            answers.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        return 200, {"files": answers, "commitOid": repo.head}, {}

    def _batch(self, m: re.Match, body: bytes) -> tuple:
        repo_type = {"datasets/": "dataset", "spaces/": "space"}.get(m["prefix"] or "", "model")
        if self._find(repo_type, m["repo"]) is None:
            return self._not_found()
        payload = json.loads(body)
        if payload.get("operation") != "upload" or "basic" not in payload.get("transfers", ["basic"]):
            return 400, {"error": "fake hub: only the basic upload transfer is served"}, {}
        objects = []
        for obj in payload["objects"]:
            oid, size = obj["oid"], int(obj["size"])
            if oid in self.lfs_objects:  # already stored: no actions, the client skips the upload
                objects.append({"oid": oid, "size": size})
                continue
            ticket = secrets.token_hex(8)
            with self._lock:
                self._tickets[ticket] = oid
            objects.append(
                {
                    "oid": oid,
                    "size": size,
                    "authenticated": True,
                    "actions": {
                        "upload": {"href": f"{self.url}/lfs-objects/{oid}?ticket={ticket}"},
                        "verify": {"href": f"{self.url}/lfs-verify"},
                    },
                }
            )
        return 200, {"transfer": "basic", "objects": objects}, {}

    def _lfs_put(self, oid: str, ticket: str, body: bytes) -> tuple:
        self.requests.append(Request("PUT", f"/lfs-objects/{oid}", None))
        with self._lock:
            if self._tickets.get(ticket) != oid:
                return 403, {"error": "fake hub: no upload ticket for this object"}, {}
        if hashlib.sha256(body).hexdigest() != oid:
            return 400, {"error": "fake hub: content does not match its sha256"}, {}
        with self._lock:
            self.lfs_objects[oid] = body
            del self._tickets[ticket]
        return 200, {}, {}

    def _verify(self, m: re.Match, body: bytes) -> tuple:
        payload = json.loads(body)
        stored = self.lfs_objects.get(payload["oid"])
        if stored is None or len(stored) != int(payload["size"]):
            return 404, {"error": "fake hub: object not uploaded"}, {}
        return 200, {}, {}

    def _commit(self, m: re.Match, body: bytes) -> tuple:
        repo = self._find(m["type"], m["repo"])
        if repo is None:
            return self._not_found()
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            return 400, {"error": "fake hub: the commit must start with a header line"}, {}
        header = lines[0]["value"]
        added: dict[str, bytes] = {}
        lfs: list[str] = []
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                if value.get("encoding") != "base64":
                    return 400, {"error": f"fake hub: unknown encoding for {value['path']}"}, {}
                added[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "lfsFile":
                data = self.lfs_objects.get(value["oid"])
                if data is None:
                    return 400, {"error": f"fake hub: LFS object of {value['path']} was never uploaded"}, {}
                added[value["path"]] = data
                lfs.append(value["path"])
            else:
                return 400, {"error": f"fake hub: operation {line['key']} is not served"}, {}
        oid = hashlib.sha1(body).hexdigest()
        with self._lock:
            repo.files.update(added)
            repo.lfs_paths.update(lfs)
            repo.commits.append(Commit(oid, header["summary"], header.get("description", ""), added, lfs))
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        return 200, {"commitUrl": f"{self.url}/{prefix}{repo.repo_id}/commit/{oid}", "commitOid": oid}, {}


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet test output
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks: list[bytes] = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _serve(self) -> None:
            split = urlsplit(self.path)
            body = self._body()
            status, payload, extra = hub.handle(self.command, split.path, parse_qs(split.query), self.headers, body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in extra.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = _serve

    return Handler
