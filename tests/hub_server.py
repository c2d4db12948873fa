"""Offline test double for the Hugging Face Hub (stdlib only).

`HubServer` serves the few endpoints `huggingface_hub` (checked against 2.4.0) needs for
`hf_hub_download`, `HfApi.file_exists`, `HfApi.repo_exists` and `HfApi.model_info`:

* `HEAD`/`GET /{repo_id}/resolve/{revision}/{filename}` with a quoted sha256 `ETag`,
  `X-Repo-Commit`, `Content-Length`, `Accept-Ranges: bytes` and single-range requests
  (`huggingface_hub` sends `Range: bytes=N-` only to resume an interrupted download);
* `GET /api/models/{repo_id}[/revision/{revision}]` with a minimal model-info JSON.

* `HEAD`/`GET /files/{name}`: plain static files (`add_static`), standing in for the official
  checkpoint URLs (download.pytorch.org, dl.fbaipublicfiles.com) that the weight loader falls back to.

`delay=` (`add_file` / `add_static`) makes a GET wait after its headers before the body: a slow
server, for timeouts and for downloads that overlap. `silent_server` accepts connections and never
answers.

Errors use the Hub's `X-Error-Code` header (`RepoNotFound`, `EntryNotFound`,
`RevisionNotFound`) plus a JSON `{"error": ...}` body, which `huggingface_hub` maps to
`RepositoryNotFoundError` / `RemoteEntryNotFoundError` / `RevisionNotFoundError`.
No `X-Xet-*` headers and no `Link: <...>; rel="xet-auth"` header are ever sent, so
`huggingface_hub` never takes the xet download path; every response closes its connection,
so `stop()` really cuts clients off.

A repo's commit is the sha1 of its content (repo id, file names and hashes): stable while the
repo is unchanged, new after `add_file`/`remove_file`, as on the real Hub. Unlike the
real Hub, every file's ETag is the sha256 of its content (the Hub uses the git blob sha1 for
small non-LFS files), so a cached blob at `<cache>/models--a--b/blobs/<sha256>` can be
verified by hashing it.

In-process use: `huggingface_hub` reads `HF_ENDPOINT` at import time, so wrap calls in
`with hub_endpoint(server.url): ...` (or pass `endpoint=server.url` explicitly). For a
subprocess, set `HF_ENDPOINT` in its environment and use `run_py`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Literal, NamedTuple
from urllib.parse import unquote, urlsplit

REPO_ROOT = Path(__file__).resolve().parents[1]

Corruption = Literal["truncate", "short", "flip"]
"""How a GET body is damaged.

`truncate`: announce the full `Content-Length` but send only the first half, then close
(so the client sees an incomplete body and may resume with `Range`; bytes past the half
are never sent). `short`: honest but too small `Content-Length` (half the file, while HEAD
announced the full size). `flip`: full length, every byte inverted (sha256 no longer
matches the ETag).
"""

_RESOLVE_RE = re.compile(r"^/(?P<repo>.+?)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_API_RE = re.compile(r"^/api/models/(?P<repo>[^/]+(?:/[^/]+)??)(?:/revision/(?P<rev>[^/]+))?/?$")
_RANGE_RE = re.compile(r"^bytes=(\d+)-(\d*)$")
_FLIP = bytes(b ^ 0xFF for b in range(256))


class Request(NamedTuple):
    """One request as the server saw it (path without query string, still URL-quoted)."""

    method: str
    path: str


@dataclass
class HubFile:
    """A file stored in a fake repo."""

    data: bytes
    sha256: str
    corrupt: Corruption | None = None
    corrupt_times: int | None = None  # None: every GET is damaged; n: only the next n GETs
    delay: float = 0.0  # seconds a GET waits after the headers before sending the body (a slow server)


class HubServer:
    """A threaded local HTTP server emulating the Hub's download endpoints.

    Usage::

        server = HubServer().start()
        server.add_file("org/model", "model.safetensors", b"...")
        hf_hub_download("org/model", "model.safetensors", endpoint=server.url, cache_dir=tmp)
        server.stop()
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.repos: dict[str, dict[str, HubFile]] = {}
        self.static: dict[str, HubFile] = {}
        self.requests: list[Request] = []
        self.request_headers: list[dict[str, str]] = []
        self.down_status: int | None = None
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Endpoint to use as `HF_ENDPOINT` (no trailing slash)."""
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._httpd is not None

    def start(self) -> HubServer:
        """Start serving (on the same port as before after a `stop`)."""
        if self._httpd is not None:
            return self
        httpd = ThreadingHTTPServer((self.host, self.port), _Handler)
        httpd.daemon_threads = True
        httpd.hub = self  # type: ignore[attr-defined]
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket: clients get "connection refused"."""
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- state -----------------------------------------------------------------------------

    def add_repo(self, repo_id: str) -> None:
        """Create an (empty) repo, so that missing files give EntryNotFound."""
        with self._lock:
            self.repos.setdefault(repo_id, {})

    def add_file(
        self,
        repo_id: str,
        filename: str,
        data_or_path: bytes | str | os.PathLike[str],
        *,
        corrupt: Corruption | None = None,
        corrupt_times: int | None = None,
        delay: float = 0.0,
    ) -> str:
        """Add (or replace) a file; `data_or_path` is bytes or a path to read. Returns its sha256."""
        data = bytes(data_or_path) if isinstance(data_or_path, (bytes, bytearray)) else Path(data_or_path).read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        with self._lock:
            self.repos.setdefault(repo_id, {})[filename] = HubFile(data, sha, corrupt, corrupt_times, delay)
        return sha

    def add_static(
        self,
        name: str,
        data_or_path: bytes | str | os.PathLike[str],
        *,
        corrupt: Corruption | None = None,
        corrupt_times: int | None = None,
        delay: float = 0.0,
    ) -> str:
        """Serve a plain file at `/files/{name}` (no Hub headers); returns its full URL."""
        data = bytes(data_or_path) if isinstance(data_or_path, (bytes, bytearray)) else Path(data_or_path).read_bytes()
        with self._lock:
            self.static[name] = HubFile(data, hashlib.sha256(data).hexdigest(), corrupt, corrupt_times, delay)
        return f"{self.url}/files/{name}"

    def remove_file(self, repo_id: str, filename: str) -> None:
        """Delete a file (the repo keeps existing)."""
        with self._lock:
            self.repos.get(repo_id, {}).pop(filename, None)

    def clear(self) -> None:
        """Forget all repos, requests and the `down_status`."""
        with self._lock:
            self.repos.clear()
            self.static.clear()
            self.down_status = None
        self.reset_requests()

    def reset_requests(self) -> None:
        with self._lock:
            self.requests.clear()
            self.request_headers.clear()

    def commit(self, repo_id: str) -> str:
        """Current 40-hex commit of a repo (changes whenever its content changes)."""
        with self._lock:
            return self._commit(repo_id)

    def count(self, method: str | None = None, contains: str = "") -> int:
        """Number of recorded requests with this method (any if None) whose path contains `contains`."""
        with self._lock:
            return sum(1 for r in self.requests if (method is None or r.method == method) and contains in r.path)

    def _commit(self, repo_id: str) -> str:
        files = self.repos[repo_id]
        text = repo_id + "".join(f"\n{name}\0{f.sha256}" for name, f in sorted(files.items()))
        return hashlib.sha1(text.encode()).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    """Request handler; `self.server.hub` is the owning `HubServer`."""

    protocol_version = "HTTP/1.1"
    server_version = "FakeHub/1.0"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass  # keep test output quiet

    @property
    def hub(self) -> HubServer:
        return self.server.hub  # type: ignore[attr-defined]

    def end_headers(self) -> None:
        self.send_header("Connection", "close")  # one request per connection: stop() cuts clients off
        super().end_headers()

    def do_HEAD(self) -> None:  # noqa: N802 - stdlib naming
        self._handle(head=True)

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._handle(head=False)

    # -- dispatch --------------------------------------------------------------------------

    def _handle(self, head: bool) -> None:
        self.close_connection = True
        hub = self.hub
        path = urlsplit(self.path).path
        with hub._lock:
            hub.requests.append(Request(self.command, path))
            hub.request_headers.append({k.lower(): v for k, v in self.headers.items()})
            down = hub.down_status
        if down is not None:
            return self._error(down, None, "Service unavailable (simulated)", head)
        if path.startswith("/files/"):
            return self._static(unquote(path[len("/files/"):]), head)
        if m := _RESOLVE_RE.match(path):
            return self._resolve(unquote(m["repo"]), unquote(m["rev"]), unquote(m["file"]), head)
        if path == "/api/agent-harnesses":  # fetched once per process unless HF_HUB_DISABLE_TELEMETRY=1
            return self._json(200, {"standardEnvVars": [], "harnesses": {}}, head)
        if m := _API_RE.match(path):
            return self._model_info(unquote(m["repo"]), unquote(m["rev"] or "main"), head)
        self._error(404, None, f"Not found: {path}", head)

    def _lookup_repo(self, repo_id: str, revision: str, head: bool) -> tuple[dict[str, HubFile], str] | None:
        """Snapshot of the repo's files and commit, or None after sending a 404."""
        with self.hub._lock:
            repo = self.hub.repos.get(repo_id)
            snapshot = None if repo is None else (dict(repo), self.hub._commit(repo_id))
        if snapshot is None:
            self._error(404, "RepoNotFound", "Repository not found", head)
            return None
        files, commit = snapshot
        if revision not in ("main", commit):
            self._error(404, "RevisionNotFound", "Invalid rev id: " + revision, head, commit)
            return None
        return files, commit

    def _resolve(self, repo_id: str, revision: str, filename: str, head: bool) -> None:
        found = self._lookup_repo(repo_id, revision, head)
        if found is None:
            return
        files, commit = found
        hub_file = files.get(filename)
        if hub_file is None:
            return self._error(404, "EntryNotFound", f'{filename} does not exist on "{revision}"', head, commit)
        data, size = hub_file.data, len(hub_file.data)
        start, end = 0, size  # end is exclusive
        status = 200
        if not head and (rng := self.headers.get("Range")):
            m = _RANGE_RE.match(rng.strip())
            if m is None or int(m[1]) >= max(size, 1):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start, end, status = int(m[1]), min(int(m[2]) + 1 if m[2] else size, size), 206
        corrupt = None if head else self._take_corruption(repo_id, filename)
        body = data[start:end]
        length = len(body)
        if corrupt == "flip":
            body = body.translate(_FLIP)
        elif corrupt in ("truncate", "short"):
            body = data[start : max(start, size // 2)][:length]
            if corrupt == "short":
                length = len(body)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{hub_file.sha256}"')
        self.send_header("X-Repo-Commit", commit)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        if not head:
            self._send_body(body, hub_file.delay)

    def _send_body(self, body: bytes, delay: float) -> None:
        with contextlib.suppress(ConnectionError):
            if delay:
                self.wfile.flush()
                threading.Event().wait(delay)  # not time.sleep, which tests patch to skip retry back-off
            self.wfile.write(body)

    def _static(self, name: str, head: bool) -> None:
        """A plain file server's answer: 200 with Content-Length, or 404."""
        with self.hub._lock:
            hub_file = self.hub.static.get(name)
        if hub_file is None:
            return self._error(404, None, f"Not found: /files/{name}", head)
        corrupt = None if head else self._take_corruption(None, name)
        data = hub_file.data
        body, length = data, len(data)
        if corrupt == "flip":
            body = data.translate(_FLIP)
        elif corrupt in ("truncate", "short"):
            body = data[: len(data) // 2]
            if corrupt == "short":
                length = len(body)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if not head:
            self._send_body(body, hub_file.delay)

    def _take_corruption(self, repo_id: str | None, filename: str) -> Corruption | None:
        """The corruption to apply to this GET, consuming one of `corrupt_times` (repo None: a static file)."""
        with self.hub._lock:
            files = self.hub.static if repo_id is None else self.hub.repos.get(repo_id, {})
            hub_file = files.get(filename)
            if hub_file is None or hub_file.corrupt is None:
                return None
            if hub_file.corrupt_times is not None:
                if hub_file.corrupt_times <= 0:
                    return None
                hub_file.corrupt_times -= 1
            return hub_file.corrupt

    def _model_info(self, repo_id: str, revision: str, head: bool) -> None:
        found = self._lookup_repo(repo_id, revision, head)
        if found is None:
            return
        files, commit = found
        info = {
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0] if "/" in repo_id else None,
            "sha": commit,
            "private": False,
            "gated": False,
            "disabled": False,
            "tags": [],
            "siblings": [{"rfilename": name, "size": len(f.data)} for name, f in sorted(files.items())],
        }
        self._json(200, info, head)

    # -- responses -------------------------------------------------------------------------

    def _json(self, status: int, payload: Mapping[str, object], head: bool,
              headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _error(self, status: int, code: str | None, message: str, head: bool, commit: str | None = None) -> None:
        headers = {"X-Error-Message": message}
        if code is not None:
            headers["X-Error-Code"] = code
        if commit is not None:
            headers["X-Repo-Commit"] = commit  # lets huggingface_hub cache the miss under .no_exist/
        self._json(status, {"error": message}, head, headers)


@contextlib.contextmanager
def silent_server(host: str = "127.0.0.1") -> Iterator[str]:
    """The URL of a server that accepts connections (the kernel's backlog does) and never answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((host, 0))
        sock.listen(64)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        sock.close()


# -- in-process and subprocess helpers -------------------------------------------------------


@contextlib.contextmanager
def hub_endpoint(
    url: str, *, cache_dir: str | os.PathLike[str] | None = None, offline: bool | None = None
) -> Iterator[None]:
    """Point an already-imported `huggingface_hub` at `url` (and optionally a cache dir / offline mode).

    Patches `constants.ENDPOINT`, `constants.HUGGINGFACE_CO_URL_TEMPLATE` (used by
    `hf_hub_url`), the endpoint of the module-level `HfApi` behind `huggingface_hub.model_info`
    / `file_exists` / `repo_exists` (bound at import time), sets `HF_HUB_DISABLE_TELEMETRY`, and if given
    `constants.HF_HUB_CACHE` and `constants.HF_HUB_OFFLINE`. Everything is restored on exit.
    `HfApi()` instances created inside the block use `url` too.
    """
    from huggingface_hub import constants, hf_api

    url = url.rstrip("/")
    patches: list[tuple[object, str, object]] = [
        (constants, "ENDPOINT", url),
        (constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}"),
        (hf_api.api, "endpoint", url),
        (constants, "HF_HUB_DISABLE_TELEMETRY", True),  # else the first request fetches /api/agent-harnesses
    ]
    if cache_dir is not None:
        patches.append((constants, "HF_HUB_CACHE", str(cache_dir)))
    if offline is not None:
        patches.append((constants, "HF_HUB_OFFLINE", offline))
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    try:
        for obj, name, value in patches:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


_HF_VARS_TO_DROP = re.compile(r"^(HF_|HUGGING_FACE_|HUGGINGFACE_|TRANSFORMERS_OFFLINE$|(?i:(http|https|all)_proxy)$)")


def make_hf_env(url: str, home: str | os.PathLike[str]) -> dict[str, str]:
    """A full environment for a subprocess talking to the fake Hub at `url`, caching under `home`.

    Starts from `os.environ` minus every `HF_*`/`HUGGING_FACE_*` variable (tokens, offline
    flags, caches) and proxies; callers may add e.g. `HF_HUB_OFFLINE=1`.
    """
    home = Path(home)
    env = {k: v for k, v in os.environ.items() if not _HF_VARS_TO_DROP.match(k)}
    env.update(
        HF_ENDPOINT=url,
        HF_HOME=str(home / "hf_home"),
        HF_HUB_CACHE=str(home / "hf_home" / "hub"),
        HF_XET_CACHE=str(home / "hf_home" / "xet"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_IMPLICIT_TOKEN="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_UPDATE_CHECK="1",
        TORCH_HOME=str(home / "torch_home"),
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    return env


def run_py(code: str, env: dict[str, str], *, timeout: float = 120,
           check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `sys.executable -c code` with `env` (repo root prepended to PYTHONPATH).

    Raises AssertionError showing stdout/stderr if it fails and `check` is true.
    """
    env = dict(env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"subprocess exited with {proc.returncode}\n--- code ---\n{code}\n"
            f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
        )
    return proc
