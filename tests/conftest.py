"""Shared pytest fixtures; one torch thread per test process unless OMP_NUM_THREADS says otherwise."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# NOTE: set before anything imports torch (its thread pool reads it once), and inherited by the subprocesses the tests
# start. The tiny test models gain nothing from more threads, and on a shared machine (or beside pytest-xdist's other
# workers) several threads per process made the default tier 2-3x slower
if not os.environ.get("OMP_NUM_THREADS"):
    os.environ["OMP_NUM_THREADS"] = "1"
    if "torch" in sys.modules:  # a plugin imported it first
        sys.modules["torch"].set_num_threads(1)

# ---------------------------------------------------------------------------------------------
# Offline Hugging Face Hub double (see tests/hub_server.py)
# In-process tests: `with hub_endpoint(hub.url, cache_dir=tmp_path): hf_hub_download(...)`.
# Subprocesses:     `run_py(code, hf_env)` or `subprocess.run(..., env=hf_env)`.
# ---------------------------------------------------------------------------------------------
if str(Path(__file__).parent) not in sys.path:  # also works with --import-mode=importlib
    sys.path.insert(0, str(Path(__file__).parent))
from hub_server import HubServer, make_hf_env  # noqa: E402


@pytest.fixture(scope="session")
def hub_server() -> Iterator[HubServer]:
    """One local fake Hub for the whole session; prefer the per-test `hub` fixture."""
    server = HubServer().start()
    yield server
    server.stop()


@pytest.fixture
def hub(hub_server: HubServer) -> Iterator[HubServer]:
    """The session's fake Hub, running, with no repos and an empty request log."""
    hub_server.start()  # a previous test may have stopped it
    hub_server.clear()
    yield hub_server
    hub_server.start()
    hub_server.clear()


@pytest.fixture
def hf_env(tmp_path: Path, hub: HubServer) -> dict[str, str]:
    """Full environment for a subprocess using the fake Hub, with HF_HOME/HF_HUB_CACHE under tmp_path and no token."""
    return make_hf_env(hub.url, tmp_path)


@pytest.fixture
def hub_cache(tmp_path: Path, hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """In-process weight loading against the fake Hub: huggingface_hub pointed at `hub` (online), its
    cache in tmp_path/hub, mvit-zoo's converted-checkpoint cache in tmp_path/mvit-zoo (MVIT_ZOO_CACHE),
    default Hub organisation. Yields tmp_path."""
    from hub_server import hub_endpoint

    monkeypatch.setenv("MVIT_ZOO_CACHE", str(tmp_path / "mvit-zoo"))
    for name in ("MVIT_ZOO_HUB_ORG", "MVIT_ZOO_CHECK_UPDATES"):
        monkeypatch.delenv(name, raising=False)
    with hub_endpoint(hub.url, cache_dir=tmp_path / "hub", offline=False):
        yield tmp_path


@pytest.fixture
def no_retry_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip huggingface_hub's retry back-off (about 23 s when the Hub is down and nothing is cached)."""
    import time

    monkeypatch.setattr(time, "sleep", lambda seconds: None)


@pytest.fixture
def single_thread() -> Iterator[None]:
    """torch on one thread for tiny models: much faster than two threads on a busy 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
