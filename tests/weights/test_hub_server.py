"""Tests of the offline Hub double (tests/hub_server.py) against the real `huggingface_hub` client.

They also pin down how huggingface_hub 2.4.0 behaves (request pattern of cached downloads,
exceptions per failure, what happens with damaged bodies), which the project's loader relies on.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import get_hf_file_metadata

from hub_server import HubServer, Request, hub_endpoint, run_py

REPO = "mvit-zoo/test-model"
FILE = "model.safetensors"
DATA = os.urandom(4096) + b"payload"


def resolve(filename: str = FILE, repo: str = REPO) -> str:
    return f"/{repo}/resolve/main/{filename}"


@pytest.fixture
def cache(tmp_path: Path, hub: HubServer) -> Iterator[Path]:
    """In-process huggingface_hub pointed at the fake Hub, with an HF cache under tmp_path."""
    cache_dir = tmp_path / "hub"
    with hub_endpoint(hub.url, cache_dir=cache_dir):
        yield cache_dir


@pytest.fixture
def no_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip huggingface_hub's retry back-off sleeps (1 s per download retry, 1-8 s per HEAD retry)."""
    monkeypatch.setattr(time, "sleep", lambda seconds: None)


def blobs(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob("models--*/blobs/*"))


# -- in-process --------------------------------------------------------------------------------


def test_download_returns_identical_bytes(hub: HubServer, cache: Path) -> None:
    sha = hub.add_file(REPO, FILE, DATA)
    path = Path(hf_hub_download(REPO, FILE))
    assert path.read_bytes() == DATA
    assert path == cache / "models--mvit-zoo--test-model" / "snapshots" / hub.commit(REPO) / FILE
    assert path.resolve().name == sha  # blob named by ETag = sha256 -> loaders can verify it
    assert hub.requests == [Request("HEAD", resolve()), Request("GET", resolve())]


def test_add_file_from_path(hub: HubServer, cache: Path, tmp_path: Path) -> None:
    src = tmp_path / "weights.bin"
    src.write_bytes(DATA)
    hub.add_file(REPO, "sub/dir/w.bin", src)
    assert Path(hf_hub_download(REPO, "w.bin", subfolder="sub/dir")).read_bytes() == DATA


def test_cached_download_makes_one_head_and_no_get(hub: HubServer, cache: Path) -> None:
    hub.add_file(REPO, FILE, DATA)
    first = hf_hub_download(REPO, FILE)
    hub.reset_requests()
    assert hf_hub_download(REPO, FILE) == first
    assert hub.requests == [Request("HEAD", resolve())]  # revision "main": HEAD to learn the commit
    hub.reset_requests()
    assert hf_hub_download(REPO, FILE, revision=hub.commit(REPO)) == first
    assert hub.requests == []  # pinned commit + cached: no request at all


def test_offline_mode_uses_cache_without_requests(hub: HubServer, cache: Path) -> None:
    hub.add_file(REPO, FILE, DATA)
    first = hf_hub_download(REPO, FILE)
    hub.reset_requests()
    with hub_endpoint(hub.url, offline=True):
        assert hf_hub_download(REPO, FILE) == first
    assert hf_hub_download(REPO, FILE, local_files_only=True) == first
    assert hub.requests == []


def test_offline_mode_with_empty_cache_raises_local_entry_not_found(hub: HubServer, cache: Path) -> None:
    hub.add_file(REPO, FILE, DATA)
    with hub_endpoint(hub.url, offline=True), pytest.raises(LocalEntryNotFoundError) as info:
        hf_hub_download(REPO, FILE)
    assert isinstance(info.value.__cause__, OfflineModeIsEnabled)
    with pytest.raises(LocalEntryNotFoundError):
        hf_hub_download(REPO, FILE, local_files_only=True)
    assert hub.requests == []
    # LocalEntryNotFoundError is also an EntryNotFoundError (timm's "try the next file" except clause
    # catches it) and a FileNotFoundError.
    assert issubclass(LocalEntryNotFoundError, (EntryNotFoundError, FileNotFoundError))


def test_missing_file_raises_remote_entry_not_found(hub: HubServer, cache: Path) -> None:
    hub.add_repo(REPO)
    with pytest.raises(RemoteEntryNotFoundError) as info:
        hf_hub_download(REPO, "missing.bin")
    assert isinstance(info.value, EntryNotFoundError) and info.value.response.status_code == 404
    # The miss is cached under .no_exist/<commit>/, yet a new call asks the Hub again.
    assert (cache / "models--mvit-zoo--test-model" / ".no_exist" / hub.commit(REPO) / "missing.bin").exists()
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(REPO, "missing.bin")
    assert hub.requests == [Request("HEAD", resolve("missing.bin"))] * 2


def test_unknown_repo_and_revision(hub: HubServer, cache: Path) -> None:
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("nobody/nothing", FILE)
    hub.add_file(REPO, FILE, DATA)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, FILE, revision="v9.9")


def test_hf_api_helpers(hub: HubServer, cache: Path) -> None:
    import huggingface_hub

    hub.add_file(REPO, FILE, DATA)
    api = HfApi()
    assert api.file_exists(REPO, FILE)
    assert not api.file_exists(REPO, "missing.bin")
    assert not api.file_exists("nobody/nothing", FILE)
    assert api.repo_exists(REPO) and not api.repo_exists("nobody/nothing")
    info = huggingface_hub.model_info(REPO)  # module-level HfApi, patched by hub_endpoint
    assert info.sha == hub.commit(REPO)
    assert [s.rfilename for s in info.siblings or []] == [FILE]


def test_no_xet_metadata(hub: HubServer, cache: Path) -> None:
    hub.add_file(REPO, FILE, DATA)
    with urllib.request.urlopen(urllib.request.Request(hub.url + resolve(), method="HEAD")) as resp:
        names = {k.lower() for k in resp.headers}
    assert not any(n.startswith("x-xet") for n in names) and "link" not in names
    assert {"etag", "x-repo-commit", "content-length", "accept-ranges"} <= names
    meta = get_hf_file_metadata(hub.url + resolve())
    assert meta.xet_file_data is None
    assert meta.etag == hashlib.sha256(DATA).hexdigest()
    assert (meta.size, meta.commit_hash) == (len(DATA), hub.commit(REPO))


def test_new_content_means_new_commit(hub: HubServer, cache: Path) -> None:
    hub.add_file(REPO, FILE, DATA)
    old_commit = hub.commit(REPO)
    assert Path(hf_hub_download(REPO, FILE)).read_bytes() == DATA
    hub.add_file(REPO, FILE, b"v2")
    assert hub.commit(REPO) != old_commit
    assert Path(hf_hub_download(REPO, FILE)).read_bytes() == b"v2"
    assert Path(hf_hub_download(REPO, FILE, revision=old_commit)).read_bytes() == DATA  # still cached


def test_range_requests(hub: HubServer) -> None:
    hub.add_file(REPO, FILE, DATA)
    req = urllib.request.Request(hub.url + resolve(), headers={"Range": "bytes=10-19"})
    with urllib.request.urlopen(req) as resp:
        assert resp.status == 206 and resp.read() == DATA[10:20]
        assert resp.headers["Content-Range"] == f"bytes 10-19/{len(DATA)}"
    req = urllib.request.Request(hub.url + resolve(), headers={"Range": f"bytes={len(DATA)}-"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req)
    info.value.close()
    assert info.value.code == 416


def test_error_body_and_headers(hub: HubServer) -> None:
    hub.add_repo(REPO)
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(hub.url + resolve("missing.bin"))
    assert info.value.code == 404 and info.value.headers["X-Error-Code"] == "EntryNotFound"
    assert "error" in json.loads(info.value.read())
    info.value.close()


# -- damaged downloads -------------------------------------------------------------------------


def test_short_body_is_detected(hub: HubServer, cache: Path) -> None:
    """Honest but too small Content-Length: OSError 'Consistency check failed', nothing cached."""
    hub.add_file(REPO, FILE, DATA, corrupt="short", corrupt_times=1)
    with pytest.raises(OSError, match="Consistency check failed"):
        hf_hub_download(REPO, FILE)
    assert blobs(cache) == []
    assert Path(hf_hub_download(REPO, FILE)).read_bytes() == DATA  # retry works, no stale partial file


def test_truncated_body_is_retried_then_raises(hub: HubServer, cache: Path, no_sleep: None) -> None:
    """Connection closed mid-body: 5 retries (1 s sleep each, skipped here), then httpx2.RemoteProtocolError.

    That error is NOT an OSError nor an HfHubHTTPError. Small files (< 10 MB chunk) restart from byte 0:
    no Range header is sent since no complete chunk was received. Nothing is left in the cache.
    """
    hub.add_file(REPO, FILE, DATA, corrupt="truncate")
    with pytest.raises(httpx2.RemoteProtocolError) as info:
        hf_hub_download(REPO, FILE)
    assert not isinstance(info.value, OSError)
    assert hub.requests == [Request("HEAD", resolve())] + [Request("GET", resolve())] * 6
    assert all("range" not in h for h in hub.request_headers)
    assert blobs(cache) == []
    assert not list(cache.glob("models--*/snapshots/*/*"))


def test_truncated_once_recovers(hub: HubServer, cache: Path, no_sleep: None) -> None:
    hub.add_file(REPO, FILE, DATA, corrupt="truncate", corrupt_times=1)
    assert Path(hf_hub_download(REPO, FILE)).read_bytes() == DATA
    assert hub.count("GET") == 2


def test_wrong_bytes_are_not_detected(hub: HubServer, cache: Path) -> None:
    """Same length, wrong content: huggingface_hub does NOT verify the sha256 -> the loader must."""
    sha = hub.add_file(REPO, FILE, DATA, corrupt="flip")
    path = Path(hf_hub_download(REPO, FILE))
    content = path.read_bytes()
    assert content != DATA and len(content) == len(DATA)
    assert path.resolve().name == sha != hashlib.sha256(content).hexdigest()
    hub.reset_requests()
    hf_hub_download(REPO, FILE)  # and the bad blob is served from cache from now on
    assert hub.count("GET") == 0


# -- Hub down ----------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["503", "stopped"])
def test_hub_down_falls_back_to_cache(hub: HubServer, cache: Path, how: str) -> None:
    hub.add_file(REPO, FILE, DATA)
    first = hf_hub_download(REPO, FILE)
    if how == "503":
        hub.down_status = 503
    else:
        hub.stop()
    assert hf_hub_download(REPO, FILE) == first  # single HEAD, no retry, no error


@pytest.mark.parametrize("how", ["503", "stopped"])
def test_hub_down_with_empty_cache(hub: HubServer, cache: Path, no_sleep: None, how: str) -> None:
    """HEAD fails -> 1 + 5 retried HEADs with back-off (~23 s unpatched) -> LocalEntryNotFoundError."""
    hub.add_file(REPO, FILE, DATA)
    if how == "503":
        hub.down_status = 503
    else:
        hub.stop()
    with pytest.raises(LocalEntryNotFoundError) as info:
        hf_hub_download(REPO, FILE)
    if how == "503":
        assert isinstance(info.value.__cause__, HfHubHTTPError)
        assert hub.requests == [Request("HEAD", resolve())] * 7
    else:
        assert isinstance(info.value.__cause__, httpx2.ConnectError)
        hub.start()
        assert Path(hf_hub_download(REPO, FILE)).read_bytes() == DATA


def test_hub_endpoint_restores_constants(hub: HubServer, tmp_path: Path) -> None:
    before = (constants.ENDPOINT, constants.HUGGINGFACE_CO_URL_TEMPLATE, constants.HF_HUB_CACHE)
    with hub_endpoint(hub.url, cache_dir=tmp_path, offline=True):
        assert constants.ENDPOINT == hub.url and constants.HF_HUB_OFFLINE
    assert (constants.ENDPOINT, constants.HUGGINGFACE_CO_URL_TEMPLATE, constants.HF_HUB_CACHE) == before


# -- subprocess (HF_ENDPOINT read at import time) ----------------------------------------------

_DOWNLOAD = """
import json
from huggingface_hub import hf_hub_download
out = {}
for repo, name in json.loads(%r):
    try:
        out[name] = ["ok", hf_hub_download(repo, name)]
    except Exception as e:
        out[name] = [type(e).__name__, str(e)[:200]]
print(json.dumps(out))
"""


def download(env: dict[str, str], files: list[tuple[str, str]]) -> dict[str, list[str]]:
    return json.loads(run_py(_DOWNLOAD % json.dumps(files), env).stdout)


def test_subprocess_download_cache_and_offline(hub: HubServer, hf_env: dict[str, str]) -> None:
    hub.add_file(REPO, FILE, DATA)
    hub.add_repo("mvit-zoo/empty")
    files = [(REPO, FILE), ("mvit-zoo/empty", "missing.bin"), ("nobody/nothing", "x.bin")]
    first = download(hf_env, files)
    assert first[FILE][0] == "ok" and Path(first[FILE][1]).read_bytes() == DATA
    assert first[FILE][1].startswith(hf_env["HF_HUB_CACHE"])
    assert first["missing.bin"][0] == "RemoteEntryNotFoundError"
    assert first["x.bin"][0] == "RepositoryNotFoundError"
    assert hub.requests == [  # telemetry disabled: no /api/agent-harnesses request
        Request("HEAD", resolve()),
        Request("GET", resolve()),
        Request("HEAD", "/mvit-zoo/empty/resolve/main/missing.bin"),
        Request("HEAD", "/nobody/nothing/resolve/main/x.bin"),
    ]
    hub.reset_requests()
    assert download(hf_env, [(REPO, FILE)])[FILE] == first[FILE]
    assert hub.requests == [Request("HEAD", resolve())]
    hub.reset_requests()
    offline = {**hf_env, "HF_HUB_OFFLINE": "1"}
    result = download(offline, [(REPO, FILE), (REPO, "other.bin")])
    assert result[FILE] == first[FILE]
    assert result["other.bin"][0] == "LocalEntryNotFoundError"
    assert hub.requests == []


def test_subprocess_offline_empty_cache(hub: HubServer, hf_env: dict[str, str]) -> None:
    hub.add_file(REPO, FILE, DATA)
    result = download({**hf_env, "HF_HUB_OFFLINE": "1"}, [(REPO, FILE)])
    assert result[FILE][0] == "LocalEntryNotFoundError"
    assert hub.requests == []


def test_hf_env_has_no_token(hf_env: dict[str, str], hub: HubServer) -> None:
    assert hf_env["HF_ENDPOINT"] == hub.url and hf_env["HF_HUB_DISABLE_XET"] == "1"
    assert not {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"} & set(hf_env)
    code = "from huggingface_hub import get_token; print(get_token())"
    assert run_py(code, hf_env).stdout.strip() == "None"


def test_run_py_reports_failures(hf_env: dict[str, str]) -> None:
    with pytest.raises(AssertionError, match="(?s)stdout.*hello.*stderr.*boom"):
        run_py("print('hello'); raise SystemExit('boom')", hf_env)
    assert run_py("raise SystemExit(3)", hf_env, check=False).returncode == 3
