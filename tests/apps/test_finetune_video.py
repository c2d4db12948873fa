"""`mvit-zoo finetune` on video datasets as distributed: annotation files, repeated augmentation, recipes."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List

import av
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import mvit_zoo
from mvit_zoo.apps import finetune
from mvit_zoo.apps.trainer import Trainer
from mvit_zoo.apps.cli import CliError
from mvit_zoo.apps.classify import load_model
from mvit_zoo.data import video as video_module
from mvit_zoo.data.pipeline import flatten_clips
from mvit_zoo.data.recipes import RECIPES, finetune_options

SMALL_3D = {"depths": [1, 1, 1, 1], "embed_dim": 16, "num_heads": 1, "img_size": [8, 32, 32]}
# the classes differ only in the direction of motion: no flips; crops keep most of the frame
TRAIN = ["--model", "mvit_v2_s_16x4", "--no-pretrained", "--model-kwargs", json.dumps(SMALL_3D), "--no-progress",
         "--hflip", "0", "--scale", "0.8", "1", "--sampling-rate", "2", "--lr", "1e-3", "--warmup-epochs", "0.5",
         "--batch-size", "8", "--smoothing", "0"]
CLASSES = {"left to right": 1, "right to left": -1}

pytestmark = pytest.mark.usefixtures("single_thread")


def moving_square(rng: np.random.Generator, direction: int, frames: int = 16, size: int = 32) -> np.ndarray:
    """A bright square crossing a noisy frame horizontally (wrapping around), 3 px per frame in `direction`."""
    clip = np.full((frames, size, size, 3), rng.integers(0, 80), np.uint8)
    clip += rng.integers(0, 20, size=clip.shape, dtype=np.uint8)
    colour, top, start = rng.integers(160, 256, size=3), rng.integers(0, size - 10), rng.integers(0, size)
    for t in range(frames):
        cols = [(start + 3 * direction * t + k) % size for k in range(10)]
        clip[t, top:top + 10, cols] = colour
    return clip


def write_webm(path: Path, frames: np.ndarray, fps: int = 30) -> None:
    """VP9 in WebM, as Something-Something v2 ships its videos."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libvpx-vp9", rate=fps, options={"crf": "10", "b": "0", "deadline": "realtime",
                                                                         "cpu-used": "8"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")))
        container.mux(stream.encode())


def videos(count: int, seed: int) -> List[tuple]:
    """`count` (class name, frames) pairs per class."""
    rng = np.random.default_rng(seed)
    return [(name, moving_square(rng, direction)) for _ in range(count) for name, direction in CLASSES.items()]


@pytest.fixture(scope="module")
def csv_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """clips/<n>.mp4 and annotations/{train,val}.csv of `path,label` lines relative to clips/."""
    root = tmp_path_factory.mktemp("csv")
    (root / "clips" / "train").mkdir(parents=True)
    (root / "clips" / "val").mkdir()
    (root / "annotations").mkdir()
    for split, count, seed in (("train", 24, 0), ("val", 4, 1)):
        lines = ["path,label"]
        for i, (name, frames) in enumerate(videos(count, seed)):
            video_module.write_video(root / "clips" / split / f"{i}.mp4", frames, fps=30)
            lines.append(f"{split}/{i}.mp4,{name}")
        (root / "annotations" / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def ssv2_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """labels.json, train.json, validation.json and videos/<id>.webm, as Something-Something v2 is distributed."""
    root = tmp_path_factory.mktemp("ssv2")
    (root / "videos").mkdir()
    templates = {name: f"Moving [something] from {name}" for name in CLASSES}
    (root / "labels.json").write_text(json.dumps({t.replace("[", "").replace("]", ""): str(i)
                                                  for i, t in enumerate(templates.values())}))
    next_id = 1
    for split, count, seed in (("train", 24, 0), ("validation", 4, 1)):
        entries = []
        for name, frames in videos(count, seed):
            write_webm(root / "videos" / f"{next_id}.webm", frames)
            entries.append({"id": str(next_id), "label": f"moving a cup from {name}", "template": templates[name],
                            "placeholders": ["a cup"]})
            next_id += 1
        (root / f"{split}.json").write_text(json.dumps(entries))
    return root


def metrics(output: Path) -> List[Dict]:
    rows = json.loads((output / "metrics.json").read_text())
    for row in rows:
        row.pop("epoch_time")
    return rows


def reevaluate(output: Path, data: Path, **kwargs) -> float:
    """Top-1 of the run's published weights by `mvit_zoo.evaluate`, loaded as `mvit-zoo validate --checkpoint`
    loads them."""
    model, classes, data_cfg = load_model(None, str(output))
    return mvit_zoo.evaluate(model, data, views="1x1", class_names=classes, data_cfg=data_cfg,
                             **kwargs).metrics()["top1"]


def test_path_label_csv_learns_direction(csv_dataset: Path, tmp_path: Path) -> None:
    output = tmp_path / "run"
    annotations = csv_dataset / "annotations"
    assert finetune.main([*TRAIN, "--data", str(annotations / "train.csv"), "--val-data", str(annotations / "val.csv"),
                          "--data-root", str(csv_dataset / "clips"), "--epochs", "12", "--output", str(output)]) == 0
    rows = metrics(output)
    assert rows[-1]["val_top1"] == 100.0, rows
    config = json.loads((output / "config.json").read_text())
    assert config["label_names"] == sorted(CLASSES)
    assert config["data_config"].get("frame_sampling", "stride") == "stride"  # absent means stride
    state = json.loads((output / "train_state.json").read_text())
    assert state["args"]["data_root"] == str((csv_dataset / "clips").absolute())
    assert reevaluate(output, annotations / "val.csv", data_root=csv_dataset / "clips") == rows[-1]["val_top1"]


def test_ssv2_layout_learns_direction(ssv2_dataset: Path, tmp_path: Path) -> None:
    output = tmp_path / "run"
    assert finetune.main([*TRAIN, "--data", str(ssv2_dataset), "--epochs", "12",
                          "--output", str(output)]) == 0
    rows = metrics(output)
    assert rows[-1]["val_top1"] == 100.0, rows
    config = json.loads((output / "config.json").read_text())
    assert config["label_names"] == [f"Moving something from {name}" for name in CLASSES]
    assert reevaluate(output, ssv2_dataset / "validation.json", data_root=ssv2_dataset) == rows[-1]["val_top1"]


def test_missing_listed_videos_are_noted(csv_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    listing = tmp_path / "train.csv"
    listing.write_text((csv_dataset / "annotations" / "train.csv").read_text() + "train/gone.mp4,left to right\n")
    trainer = Trainer(_parse(*TRAIN, "--data", str(listing), "--data-root", str(csv_dataset / "clips"),
                                      "--val-split", "0", "--output", str(tmp_path / "run")))
    trainer.setup()
    gone = csv_dataset / "clips" / "train" / "gone.mp4"
    assert f"note: 1 listed file(s) not found, left out (first: {gone})" in capsys.readouterr().err
    assert trainer.num_train == 48


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    finetune.configure_parser(parser)
    finetune.prepare_parser(parser, argv)
    args = parser.parse_args(list(argv))
    finetune._check_args(args)
    return args


def test_clips_per_video_decodes_each_video_once(csv_dataset: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Two augmented clips of one decoding per video and epoch; the model sees batch x 2 clips, each video's
    target twice."""
    reads: List[str] = []
    read_frames = video_module.read_frames

    def counting(path, *args, **kwargs):
        reads.append(Path(path).name)
        return read_frames(path, *args, **kwargs)

    monkeypatch.setattr(video_module, "read_frames", counting)
    seen: List[tuple] = []
    forward = Trainer.train_step

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        seen.append((tuple(x.shape), y.tolist()))
        return forward(self, x, y)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    annotations = csv_dataset / "annotations"
    args = _parse(*TRAIN, "--data", str(annotations / "train.csv"), "--data-root", str(csv_dataset / "clips"),
                  "--val-split", "0", "--epochs", "1", "--batch-size", "16", "--clips-per-video", "2",
                  "--output", str(tmp_path / "run"))
    trainer = Trainer(args)
    trainer.setup()
    trainer.train()
    assert sorted(reads) == sorted(f"{i}.mp4" for i in range(48))
    assert [shape for shape, _ in seen] == [(16, 2, 3, 8, 32, 32)] * 3
    x, y = flatten_clips(torch.arange(6.0).view(3, 2, 1, 1, 1, 1), torch.tensor([4, 5, 6]))
    assert x.flatten().tolist() == list(range(6)) and y.tolist() == [4, 4, 5, 5, 6, 6]


def test_video_runs_equal_whatever_the_workers_and_when_resumed(csv_dataset: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """--clips-per-video 2 with RandAugment and random erasing: 0 or 2 workers, and a run interrupted
    mid-epoch and resumed, give the same metrics and weights."""
    annotations = csv_dataset / "annotations"
    common = [*TRAIN, "--data", str(annotations / "train.csv"), "--val-data", str(annotations / "val.csv"),
              "--data-root", str(csv_dataset / "clips"), "--epochs", "2", "--clips-per-video", "2",
              "--aa", "rand-m7-n2-mstd0.5-inc1", "--reprob", "0.5", "--save-every", "3"]
    runs = {name: tmp_path / name for name in ("w0", "w2", "resumed")}
    assert finetune.main([*common, "--workers", "0", "--output", str(runs["w0"])]) == 0
    assert finetune.main([*common, "--workers", "2", "--output", str(runs["w2"])]) == 0
    train_step = Trainer.train_step

    def crash_at_step_4(self: Trainer, x: torch.Tensor, y: torch.Tensor) -> float:
        if self.global_step == 4:
            raise KeyboardInterrupt
        return train_step(self, x, y)

    monkeypatch.setattr(Trainer, "train_step", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        finetune.main([*common, "--output", str(runs["resumed"])])
    monkeypatch.setattr(Trainer, "train_step", train_step)
    assert finetune.main(["--resume", str(runs["resumed"]), "--no-progress"]) == 0
    for name in ("w2", "resumed"):
        assert metrics(runs[name]) == metrics(runs["w0"]), name
        a, b = load_file(runs["w0"] / "model.safetensors"), load_file(runs[name] / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_recipe_sets_defaults_and_flags_override(capsys: pytest.CaptureFixture) -> None:
    args = _parse("--recipe", "k400", "--batch-size", "8", "--epochs", "3", "--hflip", "0.5", "--data", "d",
                  "--model", "m", "--output", "o")
    expected = finetune_options(RECIPES["k400"], global_batch_size=8)
    err = capsys.readouterr().err
    assert "--recipe k400 (SlowFast configs/Kinetics/MVITv2_S_16x4.yaml; learning rates for a global batch of 8" in err
    assert "--clips-per-video 2" in err and "--aa rand-m7-n4-mstd0.5-inc1" in err and "--mixup 0.8" in err
    assert args.epochs == 3 and args.hflip == 0.5  # given explicitly
    assert (args.lr, args.warmup_lr, args.min_lr) == (expected["lr"], expected["warmup_lr"], expected["min_lr"])
    assert args.lr == pytest.approx(1e-4 * 8 / 16)  # SlowFast's BASE_LR for 16 videos, scaled to 8
    for dest in ("clips_per_video", "aa", "reprob", "re_mode", "mixup", "cutmix", "drop_path", "clip_grad", "opt",
                 "crop_mode", "target_fps", "frame_sampling", "warmup_epochs", "weight_decay", "layer_decay"):
        assert getattr(args, dest) == expected[dest], dest
    assert tuple(args.scale) == expected["scale"]
    ssv2 = _parse("--recipe", "ssv2", "--data", "d", "--model", "m", "--output", "o")
    assert (ssv2.opt, ssv2.momentum, ssv2.crop_mode, ssv2.inverse_uniform, ssv2.frame_sampling, ssv2.channel_order) \
        == ("sgd", 0.9, "jitter", True, "segment", "BGR")


def test_recipe_not_applied_on_resume_nor_when_abbreviated(capsys: pytest.CaptureFixture) -> None:
    args = _parse("--recipe", "k400", "--resume", "somewhere", "--data", "d", "--model", "m", "--output", "o")
    assert args.clips_per_video == 1 and args.aa is None and "--recipe" not in capsys.readouterr().err
    with pytest.raises(CliError, match="--recipe k400 was not applied: .*give it in full"):
        _parse("--rec", "k400", "--data", "d", "--model", "m", "--output", "o")


def test_sgd_and_frame_sampling_options(csv_dataset: Path, tmp_path: Path) -> None:
    trainer = Trainer(_parse(*TRAIN, "--data", str(csv_dataset / "annotations" / "train.csv"),
                                      "--data-root", str(csv_dataset / "clips"), "--opt", "sgd", "--momentum", "0.8",
                                      "--frame-sampling", "segment", "--output", str(tmp_path / "run")))
    trainer.setup()
    assert trainer.train_ds.dataset.frame_sampling == "segment"
    assert trainer.val_loader.dataset.dataset.sampling.frame_sampling == "segment"
    assert trainer.config().data_config["frame_sampling"] == "segment"
    assert isinstance(trainer.optimizer, torch.optim.SGD)
    assert {(g["momentum"], g["nesterov"]) for g in trainer.optimizer.param_groups} == {(0.8, True)}
