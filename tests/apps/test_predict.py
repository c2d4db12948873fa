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
import torch
from PIL import Image

from mvit_zoo.apps import classify, cli, finetune, predict
from mvit_zoo.data.transforms import DataConfig
from mvit_zoo.data.video import write_video
from video_factory import count_decoded

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
    assert classify.load_label_set("imagenet-1k") == IMAGENET and classify.load_label_set("kinetics-600") is None
    assert len(classify.load_label_set("ssv2")) == 174
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
    image_cfg = DataConfig(input_size=(3, 32, 32))
    video_cfg = DataConfig(input_size=(3, 4, 32, 32), sampling_rate=2)
    assert classify.load_input(predict.SAMPLE_IMAGE, image_cfg).shape == (3, 32, 32)
    assert classify.load_input(predict.SAMPLE_IMAGE, video_cfg).shape == (3, 4, 32, 32)  # image repeated in time
    assert classify.load_input(video, video_cfg).shape == (3, 4, 32, 32)
    assert classify.load_input(video, image_cfg).shape == (3, 32, 32)  # middle frame


@pytest.mark.parametrize("sampling", ["stride", "segment"])
def test_video_input_is_the_view_validate_scores(tmp_path: Path, sampling: str) -> None:
    """A video model's input in predict is the one view `validate --views 1x1` (and finetune's validation)
    scores: the same frames (the model's frame sampling, at 30 fps), resize and crop."""
    from mvit_zoo.data.video import ViewClips
    from mvit_zoo.evaluation import view_sampling
    import timm

    video = tmp_path / "clip.mp4"
    write_video(video, np.random.default_rng(0).integers(0, 256, (50, 40, 56, 3), dtype=np.uint8), fps=25)
    model = timm.create_model("mvit_v2_s_16x4", **json.loads(SMALL_3D),
                              pretrained_cfg_overlay={"frame_sampling": sampling, "crop_pct": 0.8})
    data_cfg = classify.resolve_data_config(model)
    one_view = view_sampling(model, "1x1", data_cfg)
    expected, _ = ViewClips([(str(video), 0)], one_view)[0]
    assert torch.equal(classify.load_input(video, data_cfg, sampling=one_view), expected)


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


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The one line `mvit-zoo predict` printed for a user error (and nothing on stdout; notes aside)."""
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = [line for line in captured.err.splitlines() if not line.startswith("note: ")]
    assert line.startswith("mvit-zoo predict: error: ")
    return line.removeprefix("mvit-zoo predict: error: ")


def tiny(*argv: str, video: bool = False) -> List[str]:
    """`argv` with a small random-init image (or video) model."""
    if video:
        return [*argv, "--model", "mvit_v2_s_16x4", "--no-pretrained", "--model-kwargs", SMALL_3D]
    return [*argv, "--model", "mvit_tiny", "--no-pretrained", "--model-kwargs", SMALL_2D]


@pytest.mark.parametrize("views", [None, "2x1"])
def test_each_video_is_probed_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, views: str | None) -> None:
    """A video's probe (PyAV demuxes every packet of the file) serves its input and its short-video note."""
    from mvit_zoo.data import reader, views as views_module

    probed: List[str] = []
    real = reader.probe

    def counting(path, *args, **kwargs):
        probed.append(str(path))
        return real(path, *args, **kwargs)

    for module in (reader, views_module, classify):
        monkeypatch.setattr(module, "probe", counting)
    clips = [tmp_path / f"{i}.mp4" for i in range(2)]
    for clip in clips:
        write_video(clip, np.zeros((6, 32, 32, 3), np.uint8))  # shorter than a clip: it gets the note
    extra = ["--views", views] if views else []
    assert predict.main(tiny(*map(str, clips), *extra, video=True)) == 0
    assert sorted(probed) == sorted(map(str, clips))


def test_default_model_is_the_readme_one() -> None:
    readme = (REPO / "README.md").read_text()
    shown = re.findall(r"^mvit-zoo predict --model (\S+)$", readme, re.M)
    assert shown and {name.split(".")[0] for name in shown} == {predict.DEFAULT_MODEL.split(".")[0]} == {"mvit_small"}


def test_folder_input_predicts_every_image_and_video(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "photos"
    (folder / "b").mkdir(parents=True)
    Image.new("RGB", (40, 40), (200, 10, 10)).save(folder / "z.png")
    Image.new("RGB", (40, 40), (10, 200, 10)).save(folder / "b" / "a.JPG")
    write_video(folder / "b" / "clip.mp4", np.zeros((6, 40, 40, 3), np.uint8))
    (folder / "notes.txt").write_text("not an image")
    assert predict.main(tiny(str(folder), "--json")) == 0
    inputs = [json.loads(line)["input"] for line in capsys.readouterr().out.splitlines()]
    assert inputs == [str(folder / "b" / "a.JPG"), str(folder / "b" / "clip.mp4"), str(folder / "z.png")]
    (tmp_path / "empty").mkdir()
    assert predict.main(tiny(str(tmp_path / "empty"))) == 2
    assert error_line(capsys).startswith(f"no image or video files in the folder {tmp_path / 'empty'}")


def test_unreadable_inputs_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    assert predict.main(tiny(str(text))) == 2
    assert error_line(capsys).startswith(f"{text} is not an image Pillow can read, nor a video")

    import av

    empty = tmp_path / "empty.mp4"  # a valid container without a single frame
    with av.open(str(empty), "w") as container:
        container.add_stream("mpeg4", rate=10).width = 32
        container.start_encoding()
    assert empty.stat().st_size > 0
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 64)
    for path in (empty, broken):
        for video_model in (False, True):  # a video model reads a clip, an image model the middle frame
            assert predict.main(tiny(str(path), video=video_model)) == 2
            line = error_line(capsys)
            assert line.startswith(f"cannot read the video {path}: ")
            assert line.endswith("pass a video with at least one decodable frame")

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the sample photo is 135300 pixels: over twice that
    assert predict.main(tiny(str(predict.SAMPLE_IMAGE))) == 2
    line = error_line(capsys)
    assert line.startswith(f"{predict.SAMPLE_IMAGE} is refused as a possible decompression bomb")
    assert line.endswith("pass a smaller image")


@pytest.mark.parametrize("top_k", ["0", "-1"])
def test_top_k_must_be_positive(top_k: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        predict.main(tiny("--top-k", top_k))
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"mvit-zoo predict: error: argument --top-k: must be at least 1, got {top_k}")


def test_device_that_is_not_there(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    devices = ["cuda:99", "gpu"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in devices:
        assert predict.main(tiny("--device", device)) == 2
        line = error_line(capsys)
        assert line.startswith(f"--device {device} cannot be used here (")
        assert line.endswith("pass --device cpu, or auto (a GPU when torch sees one)")


def test_unknown_model_names_close_ones(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One message, from one function, for every command that takes --model."""
    from mvit_zoo.apps import cli

    for command in ("predict", "validate", "finetune"):
        extra = {"predict": [], "validate": ["--data", str(tmp_path)],
                 "finetune": ["--data", str(tmp_path), "--output", str(tmp_path / "o")]}[command]
        assert cli.main([command, "--model", "mvit_smal", "--no-pretrained", *extra]) == 2
        assert capsys.readouterr().err.startswith(
            f"mvit-zoo {command}: error: --model mvit_smal: unknown model; did you mean mvit_small")
        assert cli.main([command, "--model", "mvit_small.fb_nope", "--no-pretrained", *extra]) == 2
        assert capsys.readouterr().err == (f"mvit-zoo {command}: error: --model mvit_small.fb_nope: mvit_small has "
                                           "no pretrained tag 'fb_nope'; available: fb_in1k\n")
    assert not (tmp_path / "o").exists()  # a finetune that fails on its arguments leaves no output folder


def test_bad_checkpoints_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import mvit_zoo

    missing = tmp_path / "runs" / "none"
    assert predict.main(["--checkpoint", str(missing)]) == 2
    assert error_line(capsys).startswith(f"no checkpoint found at '{missing}': pass a folder written by")

    assert predict.main(["--checkpoint", str(predict.SAMPLE_IMAGE), "--model", "mvit_tiny"]) == 2
    assert error_line(capsys).startswith(f"--checkpoint {predict.SAMPLE_IMAGE} is an image or video, not a checkpoint")
    junk = tmp_path / "weights.pth"
    junk.write_bytes(b"PK\x03\x04 but not a zip, nor a pickle")
    assert predict.main(["--checkpoint", str(junk), "--model", "mvit_tiny"]) == 2
    line = error_line(capsys)
    assert line.startswith(f"--checkpoint {junk} is not a checkpoint") and "weights_only" not in line
    (tmp_path / "run").mkdir()
    assert predict.main(["--checkpoint", str(tmp_path / "run"), "--model", "mvit_tiny"]) == 2
    assert error_line(capsys).startswith(f"no weights (model.safetensors, pytorch_model.bin, model_best.safetensors) "
                                         f"in the --checkpoint folder {tmp_path / 'run'}")

    small = json.loads(SMALL_2D)
    weights = mvit_zoo.save_safetensors(mvit_zoo.create_model("mvit_tiny", num_classes=3, **small).state_dict(),
                                        tmp_path / "w.safetensors")
    other = json.dumps({**small, "embed_dim": 32, "depths": [1, 1, 2, 1]})
    assert predict.main(["--checkpoint", str(weights), "--model", "mvit_tiny", "--model-kwargs", other]) == 2
    line = error_line(capsys)
    assert line.startswith(f"checkpoint {weights} does not fit mvit_tiny: ")
    assert "missing keys (stages.2.blocks.1." in line and "shapes differ: checkpoint vs model (" in line
    assert "patch_embed.proj.weight (16, 3, 7, 7) vs (32, 3, 7, 7)" in line
    assert line.endswith("Pass the --model and --model-kwargs it was trained with, or the folder written with it "
                         "(its config.json names them)")


class NaNModel(torch.nn.Module):
    """Gives NaN logits, as a model with a NaN weight does."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 4)
        self.num_classes = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean((-2, -1))) * float("nan")


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_non_finite_outputs_are_refused(as_json: bool, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    data_cfg = DataConfig(input_size=(3, 32, 32))
    monkeypatch.setattr(classify, "load_model", lambda *args: (NaNModel(), ["a", "b", "c", "d"], data_cfg))
    assert predict.main(["--model", "mvit_tiny"] + (["--json"] if as_json else [])) == 2
    line = error_line(capsys)  # nothing on stdout: no `nan%`, no JSON NaN
    assert line.startswith(f"{predict.SAMPLE_IMAGE}: the model gave non-finite outputs (4 of 4 are NaN or Inf)")
    with pytest.raises(ValueError, match="non-finite"):
        classify.predict(NaNModel(), torch.zeros(3, 8, 8))


def test_python_m_predict() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "mvit_zoo.apps.predict", "--model", "mvit_tiny", "--no-pretrained",
                           "--model-kwargs", SMALL_2D], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(top_lines(proc.stdout)) == 5


def test_model_kwargs_the_model_does_not_take(capsys: pytest.CaptureFixture[str]) -> None:
    bogus = json.dumps({**json.loads(SMALL_2D), "bogus": 1})
    assert predict.main(["--model", "mvit_tiny", "--no-pretrained", "--model-kwargs", bogus]) == 2
    line = error_line(capsys)
    assert line.startswith(f"cannot build mvit_tiny with --model-kwargs {bogus} (") and "bogus" in line
    headless = json.dumps({**json.loads(SMALL_2D), "num_classes": 0})
    assert predict.main(["--model", "mvit_tiny", "--no-pretrained", "--model-kwargs", headless]) == 2
    assert error_line(capsys).startswith("mvit_tiny has no classifier (num_classes=0)")


@pytest.mark.parametrize("tag", ["mvit_v2_s_16x4.fb_maskfeat_pt_k400", "mvit_tiny_det.d2_coco_mask_rcnn"])
def test_backbone_only_tags_are_refused_before_downloading(tag: str, capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from mvit_zoo.weights import hub

    monkeypatch.setattr(hub, "load_pretrained", lambda *a, **k: pytest.fail("downloaded the weights"))
    for args in (["predict", "--model", tag], ["validate", "--model", tag, "--data", "."]):
        assert cli.main(args) == 2
        assert f"error: {tag} holds backbone weights only (no classifier)" in capsys.readouterr().err, args


def _folder_with_labels(folder: Path, labels: List[str]) -> Path:
    """A fine-tuned folder (config.json + model.safetensors) of a small random mvit_tiny with `labels`."""
    import mvit_zoo
    from mvit_zoo.data.config import config_for_model, write_config

    kwargs = {**json.loads(SMALL_2D), "num_classes": len(labels)}
    model = mvit_zoo.create_model("mvit_tiny", **kwargs)
    folder.mkdir(parents=True)
    mvit_zoo.save_safetensors(model.state_dict(), folder / "model.safetensors")
    write_config(folder, config_for_model(model, model_args=kwargs, pretrained_cfg=dict(model.pretrained_cfg),
                                          data_config={}, label_names=labels))
    return folder


def test_folder_with_unreadable_files_classifies_the_rest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (40, 40), (200, 10, 10)).save(folder / "a.png")
    (folder / "b.png").write_bytes(b"not a png")
    Image.new("RGB", (40, 40), (10, 200, 10)).save(folder / "c.png")
    (folder / "d.mp4").write_bytes(b"\x00" * 64)
    assert predict.main(tiny(str(folder), "--json")) == predict.EXIT_SKIPPED == 1
    captured = capsys.readouterr()
    assert [json.loads(line)["input"] for line in captured.out.splitlines()] == [str(folder / "a.png"),
                                                                                  str(folder / "c.png")]
    skipped = [line for line in captured.err.splitlines() if line.startswith("skipped ")]
    assert [line.split(":")[0] for line in skipped] == [f"skipped {folder / 'b.png'}", f"skipped {folder / 'd.mp4'}"]
    assert "2 of 4 inputs could not be read" in captured.err


def test_label_names_are_printed_with_control_characters_escaped(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A config.json's label names cannot clear the screen or fake output lines."""
    labels = ["\x1b[2J\x1b[Hcat", "dog\rFAKE  99.99%  tiger", "bird\u202e"]
    run = _folder_with_labels(tmp_path / "run", labels)
    assert predict.main([str(predict.SAMPLE_IMAGE), "--checkpoint", str(run)]) == 0
    out = capsys.readouterr().out
    assert not any(c in out for c in "\x1b\r\u202e")
    assert {m[3] for m in top_lines(out)} == {"\\x1b[2J\\x1b[Hcat", "dog\\rFAKE  99.99%  tiger", "bird\\u202e"}
    data = tmp_path / "data"
    for name in ("0", "1", "2"):
        (data / name).mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(data / name / "a.png")
    from mvit_zoo.apps import cli

    assert cli.main(["validate", "--no-progress", "--model", "mvit_tiny", "--model-kwargs", SMALL_2D,
                     "--checkpoint", str(run / "model.safetensors"), "--data", str(data), "--per-class"]) == 2
    err = capsys.readouterr().err  # the folders are indices, the checkpoint has names: the error quotes them
    assert "\x1b" not in err and "\\x1b[2J" in err and "--checkpoint whose config.json lists their names" in err


def test_random_weights_and_short_videos_are_noted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert predict.main(tiny()) == 0
    assert "note: --no-pretrained: mvit_tiny has random weights" in capsys.readouterr().err
    short = tmp_path / "short.mp4"
    write_video(short, np.zeros((3, 40, 40, 3), np.uint8))  # a 4-frame clip at rate 4 spans 16 frames
    for views in ([], ["--views", "2x1"]):
        assert predict.main(tiny(str(short), *views, video=True)) == 0
        assert f"note: {short} has 3 frames, fewer than one clip of 4 frames spans" in capsys.readouterr().err


def test_download_settings_are_not_blamed_on_model_kwargs(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MVIT_ZOO_DOWNLOAD_TIMEOUT", "soon")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert predict.main(["--model", "mvit_tiny.fb_in1k", "--model-kwargs", '{"img_size": 64}']) == 2
    line = error_line(capsys)
    assert "--model-kwargs" not in line and "MVIT_ZOO_DOWNLOAD_TIMEOUT" in line


def test_model_kwargs_sizes_out_of_range(capsys: pytest.CaptureFixture[str]) -> None:
    for kwargs, key in (({"embed_dim": 0}, "embed_dim"), ({"depths": [1, -1, 1, 1]}, "depths")):
        assert predict.main(tiny()[:-2] + ["--model-kwargs", json.dumps({**json.loads(SMALL_2D), **kwargs})]) == 2
        assert error_line(capsys).startswith(f"--model-kwargs: {key} must be a number or list of numbers >= 1")


def check_predict_decodes_few_frames(path: Path, num_frames: int, gop: int, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """predict on `path` decodes at most two GOPs and the clip (video model) or one GOP (image model, middle frame)."""
    decoded = count_decoded(monkeypatch)
    clip_span = 4 * 4  # SMALL_3D: 4 frames every 4 at 30 fps
    assert predict.main(tiny(str(path), "--decoder", "pyav", video=True)) == 0
    assert 0 < len(decoded) <= 2 * gop + clip_span and len(decoded) < num_frames / 10
    decoded.clear()
    assert predict.main(tiny(str(path), "--decoder", "pyav")) == 0
    assert 0 < len(decoded) <= gop + 4
    capsys.readouterr()


def test_predict_decodes_only_the_frames_it_uses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from video_factory import make_video

    path = make_video(tmp_path / "long.mp4", 1800, gop=60)  # 60 s at 30 fps, small frames
    check_predict_decodes_few_frames(path, 1800, 60, monkeypatch, capsys)


@pytest.fixture(scope="module")
def video_720p(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 s of 1280x720 H.264 at 30 fps, a keyframe every 2 s."""
    from video_factory import make_video

    return make_video(tmp_path_factory.mktemp("hd") / "hd.mp4", 1800, size=(1280, 720), gop=60)


@pytest.mark.slow
def test_predict_720p_decodes_a_few_gops(video_720p: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    check_predict_decodes_few_frames(video_720p, 1800, 60, monkeypatch, capsys)


PEAK_RSS = """
import resource, sys
from mvit_zoo.apps import predict
import timm, torch
from mvit_zoo.data import reader
reader.probe  # imported
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
status = predict.main(sys.argv[1:])
print("GROWTH_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base, status)
"""


@pytest.mark.slow
@pytest.mark.parametrize("decoder", ["pyav", "auto"])
def test_predict_720p_peak_memory_is_bounded(video_720p: Path, decoder: str) -> None:
    """Decoding the whole 60 s 720p file would hold 1800 x 2.8 MB = 5 GB of RGB frames; a clip holds a few MB."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for model in (tiny(video=True), tiny()):
        proc = subprocess.run([sys.executable, "-c", PEAK_RSS, str(video_720p), "--decoder", decoder, *model],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        growth_kb, status = proc.stdout.split("GROWTH_KB")[1].split()
        assert status == "0" and int(growth_kb) < 600 * 1024, growth_kb


def test_absurd_and_empty_videos_are_refused_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from video_factory import make_huge_gif

    decoded = count_decoded(monkeypatch)
    huge = make_huge_gif(tmp_path / "huge.gif")
    empty_gif = tmp_path / "empty.gif"
    empty_gif.write_bytes(b"")
    for video_model in (False, True):
        assert predict.main(tiny(str(huge), "--decoder", "pyav", video=video_model)) == 2
        line = error_line(capsys)
        assert line.startswith(f"cannot read the video {huge}: frames of 65535x65535 pixels exceed the reader's "
                               "limit") and line.endswith("downscale the video first, e.g. ffmpeg -i IN "
                                                          "-vf scale=-2:1080 OUT")
        assert predict.main(tiny(str(empty_gif), video=video_model)) == 2
        assert error_line(capsys) == (f"cannot read the video {empty_gif}: the file is empty (0 bytes): not a video; "
                                      "pass a video with at least one decodable frame")
    assert decoded == []
    assert predict.main(tiny(str(huge), "--views", "2x1", video=True)) == 2
    assert "exceed the reader's limit" in error_line(capsys)


def test_weights_that_cannot_be_the_models_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Integer / bool tensors are refused by the weight reader; a config.json asking for a far larger model than
    its weights is refused before the model is built, by predict and validate alike."""
    from mvit_zoo.apps import cli

    data = tmp_path / "data"
    for name in ("0", "1", "2"):
        (data / name).mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(data / name / "a.png")
    run = _folder_with_labels(tmp_path / "run", ["a", "b", "c"])
    from safetensors.torch import load_file, save_file

    sd = load_file(str(run / "model.safetensors"))
    for dtype in (torch.int64, torch.bool):
        bad = tmp_path / f"{dtype}.safetensors".replace("torch.", "")
        save_file({**sd, "norm.weight": sd["norm.weight"].to(dtype)}, str(bad))
        for command in (["predict"], ["validate", "--no-progress", "--data", str(data)]):
            assert cli.main([*command, "--checkpoint", str(bad), "--model", "mvit_tiny", "--model-kwargs",
                             json.dumps({**json.loads(SMALL_2D), "num_classes": 3})]) == 2
            err = capsys.readouterr().err
            assert "not floating point: norm.weight" in err, err
    config = json.loads((run / "config.json").read_text())
    config["model_args"].update(depths=[1, 1, 40, 1], embed_dim=96)  # 78 M values for weights of 0.25 M
    (run / "config.json").write_text(json.dumps(config))
    for command in (["predict"], ["validate", "--no-progress", "--data", str(data)]):
        assert cli.main([*command, "--checkpoint", str(run)]) == 2
        err = capsys.readouterr().err
        assert "would hold" in err and "so the model was not built" in err and "model_args" in err, err


def test_converted_finetuned_folder_keeps_no_label_set_of_its_tag(tmp_path: Path, hub_cache: Path) -> None:
    """A fine-tuned 1000-class folder without class names, converted: its classes are not given ImageNet's names
    (the tag it started from), so predict prints class indices rather than wrong names."""
    import mvit_zoo
    from mvit_zoo.data.config import config_for_model, read_config, write_config
    from mvit_zoo.weights import publish

    kwargs = {**json.loads(SMALL_2D), "num_classes": 1000}
    model = mvit_zoo.create_model("mvit_tiny", **kwargs)
    run = tmp_path / "run"
    run.mkdir()
    mvit_zoo.save_safetensors(model.state_dict(), run / "model.safetensors")
    write_config(run, config_for_model(model, model_args=kwargs, pretrained_cfg=dict(model.pretrained_cfg),
                                       data_config={}))
    folder, _ = publish.convert_checkpoint(str(run / "model.safetensors"), "mvit_tiny", tmp_path / "out",
                                           model_args=json.loads(SMALL_2D))
    assert read_config(folder).label_names is None
    assert "- **Classes:** 1000 (unknown label set)" in (folder / "README.md").read_text()


def test_mirror_advice_only_when_the_hub_was_unreachable() -> None:
    """HF_ENDPOINT points at a Hub mirror: it is advice for a Hub that did not answer, not for a URL download."""
    from mvit_zoo.apps.cli import _describe
    from mvit_zoo.weights.hub import WeightsUnavailableError

    def message(summary: str) -> str:
        return _describe("predict", WeightsUnavailableError("x", tag="mvit_small.fb_in1k", summary=summary,
                                                            reason="unreachable"))

    hub = message("the Hub at https://huggingface.co did not answer (timed out)")
    url = message("cannot download https://dl.fbaipublicfiles.com/mvit/x.pyth (connection refused)")
    assert "set HF_ENDPOINT to a mirror" in hub and "HF_ENDPOINT" not in url
    assert url.endswith("pass a weight file with --checkpoint PATH, or --no-pretrained for random weights")
