"""A checkpoint whose pickle would run code is refused with a clear error, and the code never runs.

Each payload, when unpickled, creates a marker file. Every test first checks that the payload is
live (plain `pickle` / `torch.load(weights_only=False)` does create the marker), then that every way
this package reads weights refuses it with `UnsafeCheckpointError` and leaves no marker behind.
(Tensor checks, the cache's atomic writes and the other weight-loading guarantees: test_hub.py.)
"""
from __future__ import annotations

import os
import pickle
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import timm
import torch

import mvit_zoo
from mvit_zoo import CorruptCheckpointError, UnsafeCheckpointError

REPO = Path(__file__).resolve().parents[2]
SMALL: dict[str, Any] = dict(depths=(1, 1, 1, 1), embed_dim=16, num_heads=1, img_size=32, num_classes=10)

# tiny models: one torch thread is many times faster than two on a busy 2-core machine (conftest.py)
pytestmark = pytest.mark.usefixtures("single_thread")


class Payload:
    """Unpickling this runs `exec`, which creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


class SystemPayload:
    """Unpickling this runs a shell command through `os.system` (a module torch's unpickler blocks)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def _state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return mvit_zoo.create_model("mvit_tiny", **SMALL).state_dict()


def _protocol0(marker: Path) -> bytes:
    """A hand-written protocol-0 pickle (INST and UNICODE opcodes), as old tools write them."""
    return b"(V" + f"open({str(marker)!r}, 'w').close()".encode() + b"\nibuiltins\nexec\n."


# name -> writer(path, marker): a weight file whose unpickling creates `marker`
WRITERS: dict[str, Callable[[Path, Path], object]] = {
    # torch.save zip archive: a state dict with a poisoned entry beside real tensors
    "zip.pth": lambda p, m: torch.save({"model": _state_dict(), "epoch": Payload(m)}, p),
    # the legacy (non-zip) torch format, as SlowFast's .pyth files
    "legacy.pyth": lambda p, m: torch.save({"model_state": _state_dict(), "cfg": Payload(m)}, p,
                                           _use_new_zipfile_serialization=False),
    # an os.system call, from a module torch blocks outright (its refusal reads differently)
    "system.pth": lambda p, m: torch.save({"model_state": _state_dict(), "cfg": SystemPayload(m)}, p),
    # the payload is the whole checkpoint
    "bare.pth": lambda p, m: torch.save(Payload(m), p),
    # a plain pickle (pickle.dump), protocol 4
    "plain.pth": lambda p, m: p.write_bytes(pickle.dumps({"state_dict": {"w": [1.0]}, "x": Payload(m)}, protocol=4)),
    # protocol 0 with opcodes that torch's weights-only unpickler does not know
    "protocol0.pyth": lambda p, m: p.write_bytes(_protocol0(m)),
}


def _write(tmp_path: Path, name: str) -> tuple[Path, Path]:
    path, marker = tmp_path / name, tmp_path / f"{name}.ran"
    WRITERS[name](path, marker)
    assert not marker.exists()
    return path, marker


def _assert_payload_is_live(path: Path, marker: Path) -> None:
    """Check the test itself: an unsafe load of this file does run its code."""
    copy = path.with_name(path.name + ".unsafe.pth")  # torch.load reads *.safetensors as safetensors
    copy.write_bytes(path.read_bytes())
    try:
        torch.load(copy, map_location="cpu", weights_only=False)  # noqa: S614 - deliberately unsafe
    except Exception:  # noqa: BLE001 - only the side effect matters; some payloads are not torch files
        with open(copy, "rb") as f:
            pickle.load(f)  # noqa: S301 - deliberately unsafe, on the test's own payload
    assert marker.exists(), "the payload did not run when unpickled unsafely: this test proves nothing"
    marker.unlink()


def _assert_clear_refusal(error: BaseException, path: Path) -> None:
    message = str(error)
    assert isinstance(error, UnsafeCheckpointError), f"{type(error).__name__}: {message}"
    assert str(path) in message
    assert "refused" in message and "code" in message, message
    assert "weights_only` set to `False`" not in message and "weights_only=False" not in message, \
        "must not advise an unsafe load"
    assert "\x1b[" not in message, "terminal escape codes in the message"


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("name", list(WRITERS))
def test_read_checkpoint_refuses_and_runs_nothing(tmp_path: Path, name: str) -> None:
    path, marker = _write(tmp_path, name)
    with pytest.raises(UnsafeCheckpointError) as info:
        mvit_zoo.read_checkpoint(path)
    assert not marker.exists(), "the payload ran"
    _assert_clear_refusal(info.value, path)
    assert path.exists(), "a refused file is the user's evidence: it is not deleted"
    _assert_payload_is_live(path, marker)


def test_refusal_names_the_offending_object(tmp_path: Path) -> None:
    path, marker = _write(tmp_path, "zip.pth")
    with pytest.raises(UnsafeCheckpointError, match=r"GLOBAL (builtins\.)?exec\b"):
        mvit_zoo.read_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["zip.pth", "legacy.pyth", "protocol0.pyth"])
def test_create_model_with_pretrained_file_refuses(tmp_path: Path, name: str) -> None:
    path, marker = _write(tmp_path, name)
    torch.manual_seed(0)
    creators: list[Callable[[], Any]] = [
        lambda: timm.create_model("mvit_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **SMALL),
        lambda: mvit_zoo.create_model("mvit_tiny.fb_in1k", pretrained=True,
                                      pretrained_cfg_overlay=dict(file=str(path)), **SMALL),
        lambda: torch.hub.load(str(REPO), "mvit_tiny", source="local", pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(path)), **SMALL),
    ]
    for create in creators:
        with pytest.raises(UnsafeCheckpointError) as info:
            create()
        assert not marker.exists(), "the payload ran"
        _assert_clear_refusal(info.value, path)
    _assert_payload_is_live(path, marker)


def test_pickle_disguised_as_safetensors_runs_nothing(tmp_path: Path) -> None:
    """A pickle named .safetensors goes to the safetensors reader, which never unpickles."""
    path, marker = tmp_path / "model.safetensors", tmp_path / "ran"
    torch.save({"model": _state_dict(), "x": Payload(marker)}, path)
    with pytest.raises((UnsafeCheckpointError, CorruptCheckpointError)) as info:
        timm.create_model("mvit_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **SMALL)
    assert not marker.exists(), "the payload ran"
    assert str(path) in str(info.value)
    _assert_payload_is_live(path, marker)


def test_safe_checkpoints_still_load(tmp_path: Path) -> None:
    """The same containers without the payload load: the refusal is about the payload, not the format."""
    state = _state_dict()
    for name, save in {
        "zip.pth": lambda p: torch.save({"model": state, "epoch": 3}, p),
        "legacy.pyth": lambda p: torch.save({"model_state": state}, p, _use_new_zipfile_serialization=False),
    }.items():
        save(tmp_path / name)
        model = timm.create_model("mvit_tiny", pretrained=True,
                                  pretrained_cfg_overlay=dict(file=str(tmp_path / name)), **SMALL)
        for k, v in state.items():
            assert torch.equal(model.state_dict()[k], v), (name, k)
