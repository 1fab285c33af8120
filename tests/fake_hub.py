"""A fake Hugging Face Hub on the loopback interface, for tests that must not touch the network.

It answers the endpoints `huggingface_hub` calls to download (see its
hf_api.py and file_download.py): repository info
(`/api/{models,datasets}/REPO/revision/REV`: id, commit sha, file list), the
file tree (`/api/.../tree/REV`), and file metadata and contents
(`HEAD`/`GET /[datasets/]REPO/resolve/REV/FILE`, with the headers the client
checks: X-Repo-Commit, ETag, Content-Length; `Range` requests get 206). Errors
carry the Hub's `X-Error-Code` header so the client raises its own error
types. Per repository, a test can make the server answer 429, require a token
(a gated repository: 401 `GatedRepo` on files without it), or close the
connection midway through a file. Every request is recorded as
(method, path). The server listens on 127.0.0.1 only, on a free port, and
stops by itself after `lifetime` seconds if the test does not stop it.
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

INFO = re.compile(r"/api/(?P<kind>models|datasets)/(?P<repo>[^/]+/[^/]+)/revision/(?P<rev>[^/]+)")
TREE = re.compile(r"/api/(?P<kind>models|datasets)/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(/.*)?")
RESOLVE = re.compile(r"/(?P<kind>datasets/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)")


@dataclass
class FakeRepo:
    """A repository's files and how the server misbehaves for it."""
    files: dict                                  # path -> bytes
    token: str | None = None                     # gated: files need "Authorization: Bearer <token>"
    status: int | None = None                    # answer every request with this status (e.g. 429)
    broken: set = field(default_factory=set)     # files whose GET is cut off midway

    @property
    def sha(self) -> str:
        digest = hashlib.sha1()
        for path in sorted(self.files):
            digest.update(path.encode() + b"\0" + hashlib.sha1(self.files[path]).digest())
        return digest.hexdigest()


class FakeHub:
    """The server: `repos[(kind, repo_id)]` with kind "models" or "datasets"; `url` for HF_ENDPOINT."""

    def __init__(self, lifetime: float = 600):
        self.repos: dict[tuple[str, str], FakeRepo] = {}
        self.requests: list[tuple[str, str]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.timer = threading.Timer(lifetime, self.stop)
        self.timer.daemon = True

    def add(self, repo_id: str, files: dict, kind: str = "models", **options) -> FakeRepo:
        repo = self.repos[(kind, repo_id)] = FakeRepo(dict(files), **options)
        return repo

    def downloads(self) -> list[str]:
        """Paths of the file contents requested so far (GET .../resolve/...)."""
        return [path for method, path in self.requests if method == "GET" and "/resolve/" in path]

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        self.timer.cancel()
        self.server.shutdown()
        self.server.server_close()


def make_handler(hub: FakeHub):
    """The request handler class of `hub`'s server."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass  # the test reads hub.requests

        def do_HEAD(self):
            self.answer(body=False)

        def do_GET(self):
            self.answer(body=True)

        def reply(self, status: int, headers: dict, payload: bytes = b"", body: bool = True):
            self.send_response(status)
            for key, value in {"Content-Length": str(len(payload)), **headers}.items():
                self.send_header(key, value)
            self.end_headers()
            if body:
                self.wfile.write(payload)

        def error(self, status: int, code: str | None = None, body: bool = True):
            headers = {"X-Error-Code": code, "X-Error-Message": code} if code else {}
            if status == 429:
                headers["Retry-After"] = "0"
            self.reply(status, headers, json.dumps({"error": code or str(status)}).encode(), body)

        def answer(self, body: bool):
            path = unquote(urlsplit(self.path).path)
            hub.requests.append((self.command, path))
            for pattern, serve in ((INFO, self.info), (TREE, self.tree), (RESOLVE, self.file)):
                match = pattern.fullmatch(path)
                if match:
                    kind = "datasets" if match["kind"] in ("datasets", "datasets/") else "models"
                    repo = hub.repos.get((kind, match["repo"]))
                    if repo is None:
                        return self.error(404, "RepoNotFound", body)
                    if repo.status is not None:
                        return self.error(repo.status, None, body)
                    if match["rev"] not in ("main", repo.sha):
                        return self.error(404, "RevisionNotFound", body)
                    return serve(match, repo, body)
            self.error(404, None, body)

        def info(self, match, repo: FakeRepo, body: bool):
            data = {"id": match["repo"], "sha": repo.sha, "private": False, "gated": "manual" if repo.token else False,
                    "siblings": [{"rfilename": p} for p in sorted(repo.files)]}
            self.reply(200, {"Content-Type": "application/json"}, json.dumps(data).encode(), body)

        def tree(self, match, repo: FakeRepo, body: bool):
            data = [{"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                    for p, b in sorted(repo.files.items())]
            self.reply(200, {"Content-Type": "application/json"}, json.dumps(data).encode(), body)

        def file(self, match, repo: FakeRepo, body: bool):
            name = match["file"]
            if repo.token and self.headers.get("Authorization") != f"Bearer {repo.token}":
                return self.error(401, "GatedRepo", body)
            if name not in repo.files:
                return self.error(404, "EntryNotFound", body)
            data = repo.files[name]
            headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                       "Accept-Ranges": "bytes"}
            start = int(re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", "bytes=0-"))[1])
            status = 206 if start else 200
            if start:
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            if body and name in repo.broken:  # promise the whole rest, send half of the first try, then hang up
                self.send_response(status)
                for key, value in {"Content-Length": str(len(data) - start), **headers}.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data[start:start + (len(data) - start) // 2] if not start else b"")
                self.wfile.flush()
                self.close_connection = True
                return
            self.reply(status, headers, data[start:], body)

    return Handler
