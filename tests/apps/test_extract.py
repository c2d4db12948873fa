"""`mvit-zoo extract`: the index and files, images, unreadable videos, clear errors, resuming a killed run, torchrun."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from mvit_zoo.apps import cli, extract
from video_factory import make_video

SMALL_3D = {"depths": [1, 1, 1, 1], "embed_dim": 16, "num_heads": 1, "img_size": [8, 32, 32]}
ROOT = Path(__file__).resolve().parents[2]
# NOTE: runs the command in a subprocess as `mvit-zoo extract` would, each model forward slowed by DELAY seconds
RUNNER = """
import os, sys, time
import mvit_zoo.extraction as extraction
features, delay = extraction.clip_features, float(os.environ.get("DELAY", "0"))
def slow(*args, **kwargs):
    time.sleep(delay)
    return features(*args, **kwargs)
extraction.clip_features = slow
from mvit_zoo.apps import extract
sys.exit(extract.main())
"""
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model's random weights, so that every run (and process) has the same model."""
    torch.manual_seed(0)
    model = timm.create_model("mvit_v2_s_16x4", pretrained=False, **SMALL_3D)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file(model.state_dict(), str(path))
    return path


def model_args(weights: Path) -> list[str]:
    return ["--model", "mvit_v2_s_16x4", "--checkpoint", str(weights), "--model-kwargs", json.dumps(SMALL_3D),
            "--no-progress"]


def make_folder(root: Path, lengths: tuple[int, ...] = (70, 40)) -> Path:
    (root / "sub").mkdir(parents=True)
    for i, count in enumerate(lengths):
        make_video(root / ("sub" if i % 2 else "") / f"v{i}.mp4", count, gop=10)
    return root


def index(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "index.jsonl").read_text().splitlines()]


def files(output: Path) -> dict[str, bytes]:
    return {str(p.relative_to(output)): p.read_bytes() for p in sorted(output.rglob("*")) if p.is_file()}


def test_index_lists_each_video_s_clips_and_file(tmp_path: Path, weights: Path) -> None:
    data = make_folder(tmp_path / "data")
    (data / "broken.mp4").write_bytes(b"not a video")
    out = tmp_path / "out"
    assert extract.main([*model_args(weights), "--data", str(data), "--output", str(out), "--layer", "stage2",
                         "--spatial-pool", "mean", "--format", "safetensors"]) == extract.EXIT_FAILED
    lines = index(out)
    assert [e["source"] for e in lines] == ["broken.mp4", "v0.mp4", "sub/v1.mp4"]
    assert lines[0]["error"].startswith("VideoError")
    first = lines[1]
    assert first["file"] == "v0.safetensors" and first["frames"] == 70 and first["fps"] == pytest.approx(30)
    assert np.allclose(first["clips"], [[0, 32 / 30], [32 / 30, 64 / 30], [38 / 30, 70 / 30]], atol=1e-6)
    assert np.allclose(lines[2]["clips"], [[0, 32 / 30], [8 / 30, 40 / 30]], atol=1e-6)
    assert first["settings"]["layer"] == "stage2" and first["settings"]["window_stride"] == 32
    assert first["settings"]["preprocessing"]["crop_size"] == [32, 32]
    from safetensors.numpy import load_file

    features = load_file(str(out / "v0.safetensors"))["features"]
    assert list(features.shape) == first["shape"] == [3, 4, 64]  # clips, T', C of stage 2
    assert not (out / "broken.safetensors").exists()


def test_images_give_one_row_each(tmp_path: Path, weights: Path) -> None:
    data = tmp_path / "images"
    data.mkdir()
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 50, 3), np.uint8)).save(data / f"{i}.png")
    out = tmp_path / "out"
    assert extract.main([*model_args(weights), "--data", str(data), "--output", str(out)]) == 0
    assert [e["shape"] for e in index(out)] == [[128], [128]]
    assert np.load(out / "0.npy").shape == (128,)


def test_clear_errors(tmp_path: Path, weights: Path, capsys: pytest.CaptureFixture) -> None:
    data = make_folder(tmp_path / "data", (10,))
    cases = [
        (["--output", str(data / "features")], "is inside the data folder"),
        (["--output", str(tmp_path / "no" / "such" / "out")], "of --output does not exist; create it"),
        (["--output", str(tmp_path / "o1"), "--layer", "stage9"], "unknown layer 'stage9': choose one of pooled"),
    ]
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("keep me")
    cases.append((["--output", str(tmp_path / "theirs")], "holds files this command did not write"))
    for extra, message in cases:
        assert extract.main([*model_args(weights), "--data", str(data), *extra]) == cli.EXIT_USER_ERROR
        assert message in capsys.readouterr().err
    assert (tmp_path / "theirs" / "notes.txt").read_text() == "keep me"
    assert not (data / "features").exists()


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RUNNER, *args], cwd=ROOT, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path: Path, weights: Path, sig: int) -> None:
    data = make_folder(tmp_path / "data", (70, 70, 70, 70))
    reference, out = tmp_path / "reference", tmp_path / "out"
    args = [*model_args(weights), "--data", str(data), "--batch-size", "1"]
    assert extract.main([*args, "--output", str(reference)]) == 0
    proc = run_cli(*args, "--output", str(out), env={"DELAY": "0.4"})
    rank_file = out / "index.rank0.jsonl"
    deadline = time.monotonic() + 120
    while not (rank_file.is_file() and rank_file.read_text().count("\n") >= 1):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    (done,) = [json.loads(line) for line in rank_file.read_text().splitlines()]  # the second video was cut off
    kept = out / done["file"]
    before = (kept.stat().st_mtime_ns, kept.read_bytes())
    assert len(list(out.rglob("*.npy"))) == 1
    assert extract.main([*args, "--output", str(out)]) == 0
    assert (kept.stat().st_mtime_ns, kept.read_bytes()) == before
    assert files(out) == files(reference)


@pytest.mark.slow
def test_two_torchrun_processes_write_what_one_does(tmp_path: Path, weights: Path) -> None:
    data = make_folder(tmp_path / "data", (70, 40, 20, 50, 33))
    one, two = tmp_path / "one", tmp_path / "two"
    args = [*model_args(weights), "--data", str(data), "--batch-size", "2", "--device", "cpu"]
    assert extract.main([*args, "--output", str(one)]) == 0
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(runner), *args, "--output", str(two)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert files(two) == files(one)


def test_a_rerun_keeps_finished_files_and_overwrite_redoes_them(tmp_path: Path, weights: Path) -> None:
    data = make_folder(tmp_path / "data", (40,))
    out = tmp_path / "out"
    args = [*model_args(weights), "--data", str(data), "--output", str(out)]
    assert extract.main(args) == 0
    stamp = (out / "v0.npy").stat().st_mtime_ns
    assert extract.main(args) == 0 and (out / "v0.npy").stat().st_mtime_ns == stamp
    assert extract.main([*args, "--overwrite"]) == 0 and (out / "v0.npy").stat().st_mtime_ns != stamp
    assert extract.main([*args, "--window-stride", "8"]) == 0  # other settings: redone, not mixed
    assert index(out)[0]["settings"]["window_stride"] == 8 and len(index(out)[0]["clips"]) == 2
