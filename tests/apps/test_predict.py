"""`mvit-zoo predict`: top-5 with label names for images and videos, offline, random or fine-tuned weights."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import List

import numpy as np
import pytest
from PIL import Image

from mvit_zoo.apps import finetune, predict
from mvit_zoo.data.video import write_video

REPO = Path(__file__).resolve().parents[2]
SMALL_2D = json.dumps({"depths": [1, 1, 1, 1], "embed_dim": 16, "num_heads": 1, "img_size": 32})
SMALL_3D = json.dumps({"depths": [1, 1, 1, 1], "embed_dim": 16, "num_heads": 1, "img_size": [4, 32, 32]})
IMAGENET = (REPO / "mvit_zoo" / "data" / "imagenet-1k.txt").read_text().splitlines()
KINETICS = (REPO / "mvit_zoo" / "data" / "kinetics-400.txt").read_text().splitlines()
LINE = re.compile(r"^\s+(\d)\.\s+(\d+\.\d\d)%\s+(.+?)\s+\((\d+)\)$")


pytestmark = pytest.mark.usefixtures("single_thread")


def top_lines(out: str) -> List[re.Match]:
    return [m for m in map(LINE.match, out.splitlines()) if m]


def test_label_files_and_sample_image() -> None:
    assert len(IMAGENET) == 1000 and IMAGENET[0] == "tench, Tinca tinca" and IMAGENET[281] == "tabby, tabby cat"
    assert len(KINETICS) == 400 and len(set(KINETICS)) == 400 and KINETICS[0] == "abseiling"
    assert predict.load_label_set("imagenet-1k") == IMAGENET and predict.load_label_set("kinetics-600") is None
    assert len(predict.load_label_set("ssv2")) == 174
    with Image.open(predict.SAMPLE_IMAGE) as img:
        assert img.format == "JPEG" and img.size == (451, 300) and img.mode == "RGB"
    assert (predict.DATA_DIR / "README.md").is_file()


def test_predict_sample_image_random_init(capsys: pytest.CaptureFixture[str]) -> None:
    assert predict.main(["--model", "mvit_tiny", "--no-pretrained", "--model-kwargs", SMALL_2D]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"{predict.SAMPLE_IMAGE}:"
    lines = top_lines(out)
    assert [int(m[1]) for m in lines] == [1, 2, 3, 4, 5]
    probs = [float(m[2]) for m in lines]
    assert probs == sorted(probs, reverse=True)
    for m in lines:
        assert IMAGENET[int(m[4])] == m[3]


def test_predict_video_random_init(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "clip.mp4"
    rng = np.random.default_rng(0)
    write_video(path, rng.integers(0, 256, (20, 48, 64, 3), dtype=np.uint8))
    assert predict.main([str(path), "--model", "mvit_v2_s_16x4", "--no-pretrained", "--model-kwargs", SMALL_3D,
                         "--json", "--top-k", "3"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["input"] == str(path) and len(result["top"]) == 3
    for item in result["top"]:
        assert KINETICS[item["index"]] == item["label"] and 0 <= item["probability"] <= 1


def test_load_input_shapes(tmp_path: Path) -> None:
    video = tmp_path / "clip.mp4"
    write_video(video, np.zeros((10, 40, 40, 3), np.uint8))
    image_cfg = finetune.DataConfig(input_size=(3, 32, 32))
    video_cfg = finetune.DataConfig(input_size=(3, 4, 32, 32), sampling_rate=2)
    assert predict.load_input(predict.SAMPLE_IMAGE, image_cfg).shape == (3, 32, 32)
    assert predict.load_input(predict.SAMPLE_IMAGE, video_cfg).shape == (3, 4, 32, 32)  # image repeated in time
    assert predict.load_input(video, video_cfg).shape == (3, 4, 32, 32)
    assert predict.load_input(video, image_cfg).shape == (3, 32, 32)  # middle frame


def test_predict_with_finetuned_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    for name, colour in (("cats", (200, 120, 40)), ("dogs", (40, 80, 200))):
        (data / name).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (40, 40), tuple(c + 5 * i for c in colour)).save(data / name / f"{i}.png")
    output = tmp_path / "run"
    assert finetune.main(["--model", "mvit_tiny", "--no-pretrained", "--model-kwargs", SMALL_2D, "--data", str(data),
                          "--output", str(output), "--epochs", "1", "--batch-size", "4", "--val-split", "0.25",
                          "--no-progress"]) == 0
    capsys.readouterr()
    for checkpoint in (output, output / "model.safetensors"):
        assert predict.main([str(data / "cats" / "0.png"), "--checkpoint", str(checkpoint), "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert sorted(item["label"] for item in result["top"]) == ["cats", "dogs"]  # top-5 capped at 2 classes
    # a weights file without its config: the class count comes from the classifier, names are indices
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes((output / "model.safetensors").read_bytes())
    assert predict.main([str(data / "dogs" / "0.png"), "--checkpoint", str(lone), "--model", "mvit_tiny",
                         "--model-kwargs", SMALL_2D]) == 0
    assert sorted(m[3] for m in top_lines(capsys.readouterr().out)) == ["class 0", "class 1"]


def test_predict_missing_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert predict.main(["nope.jpg", "--model", "mvit_tiny", "--no-pretrained", "--model-kwargs", SMALL_2D]) == 2
    assert "no such file" in capsys.readouterr().err


def test_python_m_predict() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "mvit_zoo.apps.predict", "--model", "mvit_tiny", "--no-pretrained",
                           "--model-kwargs", SMALL_2D], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(top_lines(proc.stdout)) == 5
