"""`mvit-zoo finetune`: learning on real data, exact resume, torchrun agreement, outputs loadable by timm."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import timm
import mvit_zoo
from mvit_zoo.apps import finetune
from mvit_zoo.apps.finetune import ShardSampler, Trainer, scan_data
from mvit_zoo.data.video import write_video

REPO = Path(__file__).resolve().parents[2]
SMALL_2D = {"depths": [1, 1, 1, 1], "embed_dim": 16, "num_heads": 1, "img_size": 32}
SMALL_3D = {"depths": [1, 1, 1, 1], "embed_dim": 16, "num_heads": 1, "img_size": [8, 32, 32]}
# digits are upright and already centred: no flips, mild crops, no colour jitter
DIGIT_AUG = ["--scale", "0.6", "1", "--hflip", "0", "--color-jitter", "0"]


pytestmark = pytest.mark.usefixtures("single_thread")


def write_digits(root: Path, per_class: int | None = None, size: int = 32, split: bool = True) -> None:
    """scikit-learn's 8x8 digits, upscaled to `size`, as PNG class folders (train/ and val/ when `split`)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    index = np.arange(len(digits.target))
    if per_class is not None:
        index = np.concatenate([np.flatnonzero(digits.target == c)[:per_class] for c in range(10)])
    if split:
        train, val = train_test_split(index, test_size=0.2, random_state=0, stratify=digits.target[index])
        parts = {"train": train, "val": val}
    else:
        parts = {".": index}
    for part, idx in parts.items():
        for i in idx:
            folder = root / part / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            img = Image.fromarray((digits.images[i] * (255 / 16)).astype(np.uint8))
            img.resize((size, size), Image.BILINEAR).save(folder / f"{i:04d}.png")


DIRECTIONS = {"down": (1, 0), "left": (0, -1), "right": (0, 1), "up": (-1, 0)}


def moving_bar(rng: np.random.Generator, dy: int, dx: int, frames: int = 16, size: int = 32) -> np.ndarray:
    """A bar crossing the frame (wrapping around) in direction (dy, dx); random start, colours and noise."""
    clip = np.full((frames, size, size, 3), rng.integers(0, 100), np.uint8)
    clip += rng.integers(0, 20, size=clip.shape, dtype=np.uint8)
    colour, start = rng.integers(150, 256, size=3), rng.integers(0, size)
    for t in range(frames):
        rows_or_cols = [(start + 2 * t * (dx + dy) + k) % size for k in range(6)]
        if dx:
            clip[t, :, rows_or_cols] = colour
        else:
            clip[t, rows_or_cols, :] = colour
    return clip


def write_bars(root: Path, train: int, val: int) -> None:
    """Class folders of short mp4 clips: the class is the direction a bar moves in."""
    rng = np.random.default_rng(0)
    for part, n in (("train", train), ("val", val)):
        for name, (dy, dx) in DIRECTIONS.items():
            folder = root / part / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                write_video(folder / f"{i:03d}.mp4", moving_bar(rng, dy, dx), fps=8)


def finetune_args(data: Path, output: Path, *extra: str, model: str = "mvit_tiny",
                  kwargs: Dict | None = None) -> List[str]:
    return ["--model", model, "--no-pretrained", "--model-kwargs", json.dumps(kwargs or SMALL_2D),
            "--data", str(data), "--output", str(output), "--no-progress", *extra]


def metrics(output: Path) -> List[Dict]:
    rows = json.loads((output / "metrics.json").read_text())
    for row in rows:
        row.pop("epoch_time")
    return rows


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    write_digits(root)
    return root


@pytest.fixture(scope="module")
def digits_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """400 digits in one class-folder tree (the held-out split is made by --val-split)."""
    root = tmp_path_factory.mktemp("digits_small")
    write_digits(root, per_class=40, split=False)
    return root


@pytest.fixture(scope="module")
def digits_run(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Dict:
    """A small MViTv2 trained from scratch on the digits; also used by the loading tests."""
    output = tmp_path_factory.mktemp("digits_run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started = time.perf_counter()
    try:
        rc = finetune.main(finetune_args(digits, output, "--epochs", "3", "--batch-size", "32", "--lr", "3e-3",
                                         "--warmup-epochs", "0.5", *DIGIT_AUG))
    finally:
        torch.set_num_threads(threads)
    return {"rc": rc, "output": output, "seconds": time.perf_counter() - started}


# -- must hold ----------------------------------------------------------------------------------------

def test_digits_learns_to_90_percent(digits_run: Dict) -> None:
    assert digits_run["rc"] == 0
    rows = metrics(digits_run["output"])
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert rows[-1]["val_top1"] >= 90.0, rows
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] and rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert digits_run["seconds"] < 180, digits_run["seconds"]


def test_video_moving_bars_above_chance(tmp_path: Path) -> None:
    """A frame shows the bar's orientation, not its direction: above 50% needs motion (chance: 25%)."""
    data, output = tmp_path / "bars", tmp_path / "run"
    write_bars(data, train=12, val=6)
    rc = finetune.main(finetune_args(data, output, "--epochs", "3", "--batch-size", "8", "--lr", "2e-3",
                                     "--warmup-epochs", "0.5", "--sampling-rate", "2", "--scale", "0.6", "1",
                                     "--hflip", "0", model="mvit_v2_s_16x4", kwargs=SMALL_3D))
    assert rc == 0
    rows = metrics(output)
    assert rows[-1]["val_top1"] > 50.0, rows
    config = json.loads((output / "config.json").read_text())
    assert config["label_names"] == sorted(DIRECTIONS)
    assert config["data_config"] == {"num_frames": 8, "sampling_rate": 2, "channel_order": "RGB"}


def test_resume_mid_epoch_is_exact(digits_small: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Interrupted at step 17 (last checkpoint at step 15, inside epoch 1), then resumed: same numbers.

    Drop path, mixup and EMA are on, so every random stream has to continue exactly.
    """
    extra = ["--epochs", "2", "--batch-size", "32", "--lr", "3e-3", "--val-split", "0.2", "--drop-path", "0.1",
             "--mixup", "0.2", "--ema", "--ema-decay", "0.9", "--save-every", "5", *DIGIT_AUG]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert finetune.main(finetune_args(digits_small, straight, *extra)) == 0

    train_step = Trainer.train_step

    def crash_at_step_17(self: Trainer, x: torch.Tensor, y: torch.Tensor) -> float:
        if self.global_step == 17:
            raise KeyboardInterrupt
        return train_step(self, x, y)

    monkeypatch.setattr(Trainer, "train_step", crash_at_step_17)
    with pytest.raises(KeyboardInterrupt):
        finetune.main(finetune_args(digits_small, interrupted, *extra))
    monkeypatch.setattr(Trainer, "train_step", train_step)
    state = json.loads((interrupted / "train_state.json").read_text())
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 5, 15)  # 10 steps per epoch
    assert len(metrics(interrupted)) == 1

    assert finetune.main(finetune_args(digits_small, interrupted, *extra, "--resume")) == 0
    assert metrics(interrupted) == metrics(straight)
    for name in ("model.safetensors", "model_ema.safetensors"):
        a, b = load_file(straight / name), load_file(interrupted / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_torchrun_two_processes_match_single(digits_small: Path, tmp_path: Path) -> None:
    """2 gloo processes with batch 16 each see the same global batches as 1 process with batch 32."""
    extra = ["--epochs", "1", "--lr", "3e-3", "--val-split", "0.2", *DIGIT_AUG]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert finetune.main(finetune_args(digits_small, single, *extra, "--batch-size", "32")) == 0
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "mvit_zoo", "finetune", *finetune_args(digits_small, ddp, *extra, "--batch-size", "16")]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 process(es)" in proc.stderr
    a, b = metrics(single)[0], metrics(ddp)[0]
    assert a["step"] == b["step"]
    assert a["val_top1"] == pytest.approx(b["val_top1"], abs=100 / 80 + 1e-6)  # at most one of 80 images
    for key in ("train_loss", "val_loss"):
        assert a[key] == pytest.approx(b[key], rel=1e-3), key


# -- outputs --------------------------------------------------------------------------------------------

def test_output_folder_contents(digits_run: Dict) -> None:
    output = digits_run["output"]
    for name in ("model.safetensors", "model_best.safetensors", "config.json", "train_state.json",
                 "optimizer.pt", "metrics.csv", "metrics.json"):
        assert (output / name).is_file(), name
    config = json.loads((output / "config.json").read_text())
    assert config["architecture"] == "mvit_tiny"
    assert config["num_classes"] == 10 and config["label_names"] == [str(i) for i in range(10)]
    assert config["model_args"] == {**SMALL_2D, "num_classes": 10}
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    # timm accepts the pretrained_cfg back as is
    timm.models.PretrainedCfg(**config["pretrained_cfg"])
    csv_lines = (output / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("epoch,step,lr,train_loss,val_loss,val_top1,val_top5") and len(csv_lines) == 4
    extra = torch.load(output / "optimizer.pt", weights_only=True)
    assert extra["global_step"] == 3 * (1437 // 32) and {"optimizer", "scheduler", "rng"} <= extra.keys()


def test_output_loads_with_timm_pretrained_cfg_overlay(digits_run: Dict, digits: Path) -> None:
    output = digits_run["output"]
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in SMALL_2D.items()}
    model = timm.create_model("mvit_tiny", pretrained=True, num_classes=10,
                              pretrained_cfg_overlay=dict(file=str(output / "model.safetensors")), **kwargs).eval()
    reference = mvit_zoo.create_model("mvit_tiny", num_classes=10, **kwargs).eval()
    reference.load_state_dict(load_file(output / "model.safetensors"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


def test_existing_run_needs_resume(digits_run: Dict, digits: Path) -> None:
    with pytest.raises(SystemExit, match="--resume"):
        finetune.main(finetune_args(digits, digits_run["output"], "--epochs", "1"))


def test_resume_refuses_other_classes(digits_run: Dict, tmp_path: Path) -> None:
    data = tmp_path / "other"
    for name in ("a", "b"):
        (data / name).mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(data / name / "x.png")
    with pytest.raises(SystemExit, match="classes"):
        finetune.main(finetune_args(data, digits_run["output"], "--resume", str(digits_run["output"]),
                                    "--output", str(tmp_path / "out")))


# -- recipe details -------------------------------------------------------------------------------------

def _setup(data: Path, output: Path, *extra: str) -> Trainer:
    parser = finetune.argparse.ArgumentParser()
    finetune.configure_parser(parser)
    trainer = Trainer(parser.parse_args(finetune_args(data, output, *extra)))
    trainer.setup()
    return trainer


def test_layer_decay_and_no_weight_decay_groups(digits_small: Path, tmp_path: Path) -> None:
    trainer = _setup(digits_small, tmp_path / "o", "--layer-decay", "0.5", "--lr", "1e-3", "--weight-decay", "0.05")
    groups = trainer.optimizer.param_groups
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    scales = sorted({g["lr_scale"] for g in groups})
    assert scales[-1] == 1.0 and scales[0] == pytest.approx(0.5 ** (len(scales) - 1))
    for g in groups:
        for p in g["params"]:
            name = names[id(p)]
            if p.ndim <= 1 or name in trainer.model.no_weight_decay():
                assert g["weight_decay"] == 0.0, name
            else:
                assert g["weight_decay"] == 0.05, name
            if name.startswith("head."):
                assert g["lr_scale"] == 1.0
            if name.startswith("patch_embed."):
                assert g["lr_scale"] == scales[0]
    # the scheduler starts the warm-up at warmup_lr for every group, scaled by the group's lr_scale
    assert all(g["lr"] == pytest.approx(1e-6 * g["lr_scale"]) for g in groups)


def test_head_sized_to_class_folders(digits_small: Path, tmp_path: Path) -> None:
    trainer = _setup(digits_small, tmp_path / "o", "--grad-checkpointing")
    assert trainer.model.num_classes == 10 and trainer.model.get_classifier().out_features == 10
    assert trainer.classes == [str(i) for i in range(10)]
    assert trainer.num_train + trainer.num_val == 400 and trainer.num_val == 40  # default --val-split 0.1


def test_scan_data_stratified_split(digits_small: Path) -> None:
    classes, train, val = scan_data(digits_small, finetune.IMAGE_EXTENSIONS, 0.25, seed=1)
    assert classes == [str(i) for i in range(10)]
    assert len(val) == 100 and {t for _, t in val} == set(range(10))
    assert not {p for p, _ in train} & {p for p, _ in val}
    assert scan_data(digits_small, finetune.IMAGE_EXTENSIONS, 0.25, seed=1)[2] == val
    assert scan_data(digits_small, finetune.IMAGE_EXTENSIONS, 0.25, seed=2)[2] != val


def test_shard_sampler_global_batches_match_single_process() -> None:
    single = ShardSampler(10, shuffle=True, seed=3, pad=True)
    shards = [ShardSampler(10, 2, r, shuffle=True, seed=3, pad=True) for r in range(2)]
    for s in (single, *shards):
        s.set_epoch(4)
    order = list(single)
    assert sorted(order) == list(range(10))
    assert [list(s) for s in shards] == [order[0::2], order[1::2]]
    single.set_epoch(5)
    assert list(single) != order
    single.set_epoch(4, skip=6)
    assert list(single) == order[6:] and len(single) == 4
    odd = [ShardSampler(5, 2, r, pad=True) for r in range(2)]
    assert [len(s) for s in odd] == [3, 3]
    val = [ShardSampler(5, 2, r) for r in range(2)]
    assert sorted(list(val[0]) + list(val[1])) == list(range(5))


def test_transfer_from_pretrained_file(digits_run: Dict, tmp_path: Path) -> None:
    """--pretrained-file: backbone from the file, a new head for another class count, layer decay on by default."""
    data = tmp_path / "two"
    for name in ("odd", "even"):
        (data / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(data / name / f"{i}.png")
    weights = digits_run["output"] / "model.safetensors"
    parser = finetune.argparse.ArgumentParser()
    finetune.configure_parser(parser)
    args = parser.parse_args(finetune_args(data, tmp_path / "o", "--pretrained-file", str(weights)))
    trainer = Trainer(args)
    trainer.setup()
    source = load_file(weights)
    state = trainer.model.state_dict()
    assert trainer.model.get_classifier().out_features == 2 and trainer.classes == ["even", "odd"]
    assert all(torch.equal(state[k], v) for k, v in source.items() if not k.startswith("head."))
    assert len({g["lr_scale"] for g in trainer.optimizer.param_groups}) > 1  # default 0.75 layer decay


def test_data_config_follows_the_pretrained_config() -> None:
    """T from the model as built, tau / mean / std / crop from the tag's pretrained config."""
    small = {k: tuple(v) if isinstance(v, list) else v for k, v in SMALL_2D.items() if k != "img_size"}
    video = mvit_zoo.create_model("mvit_b_32x3.pv_k400", img_size=(8, 32, 32), **small)
    cfg = finetune.resolve_data_config(video)
    assert cfg.is_video and cfg.input_size == (3, 8, 32, 32) and cfg.num_frames == 8
    assert cfg.sampling_rate == 3 and cfg.mean == (0.45, 0.45, 0.45) and cfg.interpolation == "bilinear"
    assert finetune.resolve_data_config(video, sampling_rate=2).sampling_rate == 2
    assert cfg.to_dict()["input_size"] == [3, 32, 32]  # timm convention; T is num_frames
    image = finetune.resolve_data_config(mvit_zoo.create_model("mvit_tiny.fb_in1k", img_size=48, **small))
    assert not image.is_video and image.input_size == (3, 48, 48) and image.crop_pct == 0.9
