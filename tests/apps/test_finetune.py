"""`mvit-zoo finetune`: learning on real data, exact resume, torchrun agreement, outputs loadable by timm."""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import stat
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
from mvit_zoo.apps import finetune, models, run_folder
from mvit_zoo.apps.cli import CliError
from mvit_zoo.apps.trainer import Trainer
from mvit_zoo.data.transforms import resolve_data_config
from mvit_zoo.files import part_file
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
                write_video(folder / f"{i:03d}.mp4", moving_bar(rng, dy, dx), fps=30)


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
    rc = finetune.main(finetune_args(data, output, "--epochs", "5", "--batch-size", "8", "--lr", "2e-3",
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
                 "metrics.csv", "metrics.json"):
        assert (output / name).is_file(), name
    # the resumable state is the checkpoint folder that train_state.json names; the published weights are its own
    checkpoint = output / json.loads((output / "train_state.json").read_text())["checkpoint"]
    assert sorted(p.name for p in checkpoint.iterdir()) == [".mvit-zoo-run", "model.safetensors", "optimizer.pt"]
    assert (checkpoint / "model.safetensors").read_bytes() == (output / "model.safetensors").read_bytes()
    assert [p.name for p in (output / "checkpoints").iterdir()] == [checkpoint.name]  # older ones are removed
    config = json.loads((output / "config.json").read_text())
    assert config["architecture"] == "mvit_tiny"
    assert config["num_classes"] == 10 and config["label_names"] == [str(i) for i in range(10)]
    assert config["model_args"] == {**SMALL_2D, "num_classes": 10}
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    # timm accepts the pretrained_cfg back as is
    timm.models.PretrainedCfg(**config["pretrained_cfg"])
    csv_lines = (output / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("epoch,step,lr,train_loss,val_loss,val_top1,val_top5") and len(csv_lines) == 4
    extra = torch.load(checkpoint / "optimizer.pt", weights_only=True)
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
    with pytest.raises(CliError, match="--resume"):
        finetune.main(finetune_args(digits, digits_run["output"], "--epochs", "1"))


def test_resume_refuses_other_classes(digits_run: Dict, tmp_path: Path) -> None:
    data = tmp_path / "other"
    for name in ("a", "b"):
        (data / name).mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(data / name / "x.png")
    with pytest.raises(CliError, match="classes"):
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


# -- interruption, resume and files ---------------------------------------------------------------------

TINY = ["--batch-size", "4", "--val-split", "0"]  # 12 images: 3 steps per epoch


class Killed(BaseException):
    """The process dies here: nothing after it runs (no Ctrl-C handling, no checkpoint)."""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two class folders of six random 32x32 images."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir()
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def assert_same_weights(a: Path, b: Path) -> None:
    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), (a, b)


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    """SIGINT during step 5 of 6: the step is finished and saved; `--resume DIR` alone continues the run to
    the numbers of an uninterrupted one; resuming the finished run then says so and trains nothing."""
    extra = ["--epochs", "2", *TINY]
    straight, run = tmp_path / "straight", tmp_path / "run"
    assert finetune.main(finetune_args(tiny, straight, *extra)) == 0
    train_step = Trainer.train_step

    def ctrl_c_in_step_5(self: Trainer, x: torch.Tensor, y: torch.Tensor) -> float:
        if self.global_step == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return train_step(self, x, y)

    monkeypatch.setattr(Trainer, "train_step", ctrl_c_in_step_5)
    capsys.readouterr()
    assert finetune.main(finetune_args(tiny, run, *extra)) == 130
    assert f"resume with:\n  mvit-zoo finetune --resume {run}\n" in capsys.readouterr().err
    state = json.loads((run / "train_state.json").read_text())
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 2, 5)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is only held while training

    monkeypatch.setattr(Trainer, "train_step", train_step)
    assert finetune.main(["--resume", str(run), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "resumed from" in err and "warning" not in err
    assert metrics(run) == metrics(straight)
    assert_same_weights(run / "model.safetensors", straight / "model.safetensors")

    published = (run / "model.safetensors").read_bytes()
    assert finetune.main(["--resume", str(run)]) == 0
    assert "is finished (2 of 2 epochs, global step 6): nothing to resume" in capsys.readouterr().err
    assert (run / "model.safetensors").read_bytes() == published and len(metrics(run)) == 2


def test_resume_warns_only_about_changed_arguments(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The saved arguments read back from JSON (lists) compare equal to argparse's (tuple defaults)."""
    args = _args(*finetune_args(tiny, tmp_path / "unused"))
    saved = json.loads(json.dumps(finetune._args_dict(args)))
    assert args.scale == (0.08, 1.0) and saved["scale"] == [0.08, 1.0]
    finetune._check_resume_args(saved, args)
    assert capsys.readouterr().err == ""
    args.scale = (0.2, 1.0)
    finetune._check_resume_args(saved, args)
    assert "(scale: [0.08, 1.0] -> [0.2, 1.0])" in capsys.readouterr().err

    output = tmp_path / "o"
    args = finetune_args(tiny, output, *TINY, "--scale", "0.5", "1")
    assert finetune.main([*args, "--epochs", "1"]) == 0
    capsys.readouterr()
    assert finetune.main([*args, "--epochs", "1", "--resume"]) == 0
    err = capsys.readouterr().err
    assert "is finished" in err and "warning" not in err
    assert finetune.main([*args, "--epochs", "2", "--scale", "0.4", "1", "--resume"]) == 0
    err = capsys.readouterr().err
    assert "warning: resuming with changed arguments (scale: [0.5, 1.0] -> [0.4, 1.0], epochs: 1 -> 2)" in err
    assert [r["epoch"] for r in metrics(output)] == [0, 1]


def test_killed_during_any_checkpoint_write_resumes_exactly(tiny: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The process dies at each file write of an epoch-end save (step 3) and a mid-epoch save (step 4),
    after writing the file's temporary copy: the run resumes, from the last whole checkpoint, to the
    numbers of an uninterrupted run; the published weights stay loadable throughout."""
    extra = ["--epochs", "2", "--save-every", "1", *TINY]
    atomic_write = run_folder.atomic_write
    writes: List[str] = []

    def recording(path: Path, write) -> None:
        writes.append(path.parent.name)
        atomic_write(path, write)

    monkeypatch.setattr(run_folder, "atomic_write", recording)
    straight = tmp_path / "straight"
    assert finetune.main(finetune_args(tiny, straight, *extra)) == 0
    # the save of step N writes its checkpoint folder step-N-<id>/ ... (config.json is written on its own,
    # atomically, by data.config.write_config)
    first = next(i for i, parent in enumerate(writes) if parent.startswith("step-00000003"))
    last = next(i for i, parent in enumerate(writes) if parent.startswith("step-00000005"))
    assert last - first == 10  # 4 files per save, metrics.json and metrics.csv at the epoch end

    for k in range(first, last):
        calls: List[Path] = []

        def dying(path: Path, write, calls: List[Path] = calls, k: int = k) -> None:
            calls.append(path)
            if len(calls) == k + 1:
                write(part_file(path))  # its temporary copy whole, then the process dies
                raise Killed
            atomic_write(path, write)

        output = tmp_path / f"killed{k}"
        monkeypatch.setattr(run_folder, "atomic_write", dying)
        with pytest.raises(Killed):
            finetune.main(finetune_args(tiny, output, *extra))
        state = json.loads((output / "train_state.json").read_text())
        assert state["global_step"] in (2, 3, 4), k
        assert load_file(output / "model.safetensors").keys() == load_file(straight / "model.safetensors").keys()
        monkeypatch.setattr(run_folder, "atomic_write", atomic_write)
        assert finetune.main(["--resume", str(output), "--no-progress"]) == 0, k
        assert metrics(output) == metrics(straight), k
        assert_same_weights(output / "model.safetensors", straight / "model.safetensors")
        assert len(list((output / "checkpoints").iterdir())) == 1, k  # what the interrupted save left is removed


@pytest.mark.parametrize("foreign", ["folder", "step-like folder", "other run", "file", "link"])
def test_checkpoints_of_others_are_never_removed(tiny: Path, tmp_path: Path, foreign: str) -> None:
    """An output whose checkpoints/ holds what the run did not write (another tool's folder, a step folder of
    another run, a link to the user's files) is refused before training, and nothing there is touched."""
    output, elsewhere = tmp_path / "o", tmp_path / "users"
    (output / "checkpoints").mkdir(parents=True)
    (elsewhere / "keep").mkdir(parents=True)
    (elsewhere / "keep" / "data.txt").write_text("mine")
    if foreign == "folder":
        (output / "checkpoints" / "epoch_10").mkdir()
        (output / "checkpoints" / "epoch_10" / "weights.pt").write_text("mine")
    elif foreign == "step-like folder":  # named like the run's own, but without the run's marker
        (output / "checkpoints" / "step-00000003-0123abcd").mkdir()
        (output / "checkpoints" / "step-00000003-0123abcd" / "notes.txt").write_text("mine")
    elif foreign == "other run":
        (output / "checkpoints" / "step-00000003-0123abcd").mkdir()
        (output / "checkpoints" / "step-00000003-0123abcd" / ".mvit-zoo-run").write_text("another run")
    elif foreign == "file":
        (output / "checkpoints" / "README").write_text("mine")
    else:
        (output / "checkpoints").rmdir()
        (output / "checkpoints").symlink_to(elsewhere, target_is_directory=True)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(CliError, match="checkpoints is a link" if foreign == "link" else "holds entries this run "
                       "did not write .*choose another --output, or move them away"):
        finetune.main(finetune_args(tiny, output, "--epochs", "1", *TINY))
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    assert (elsewhere / "keep" / "data.txt").read_text() == "mine"


def test_resume_removes_only_its_own_step_folders(tiny: Path, tmp_path: Path) -> None:
    """A foreign entry that appears in a run's checkpoints/ stops --resume (kept as it is); once moved away the
    run resumes, and each save removes its own older step folders, also those of a run saved before markers."""
    output = tmp_path / "o"
    assert finetune.main(finetune_args(tiny, output, "--epochs", "1", *TINY)) == 0
    checkpoints = output / "checkpoints"
    foreign = checkpoints / "epoch_10"
    foreign.mkdir()
    with pytest.raises(CliError, match="epoch_10"):
        finetune.main(["--resume", str(output), "--epochs", "2", "--no-progress"])
    assert foreign.is_dir()
    foreign.rmdir()
    # the run as an earlier version saved it: no run id, no marker in its step folder
    state = json.loads((output / "train_state.json").read_text())
    del state["run_id"]
    (output / "train_state.json").write_text(json.dumps(state))
    (output / state["checkpoint"] / ".mvit-zoo-run").unlink()
    assert finetune.main(["--resume", str(output), "--epochs", "2", "--no-progress"]) == 0
    state = json.loads((output / "train_state.json").read_text())
    assert list(checkpoints.iterdir()) == [output / state["checkpoint"]]
    assert (output / state["checkpoint"] / ".mvit-zoo-run").read_text().strip() == state["run_id"]


def test_written_files_get_the_umask_mode(tiny: Path, tmp_path: Path) -> None:
    output = tmp_path / "o"
    umask = os.umask(0o027)
    try:
        assert finetune.main(finetune_args(tiny, output, "--epochs", "1", *TINY)) == 0
    finally:
        os.umask(umask)
    modes = {str(p.relative_to(output)): stat.S_IMODE(p.stat().st_mode) for p in output.rglob("*") if p.is_file()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o640}, modes


def test_non_finite_loss_stops_before_updating_the_weights(tiny: Path, tmp_path: Path) -> None:
    trainer = _setup(tiny, tmp_path / "o", *TINY)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.criterion = lambda logits, target: logits.sum() * float("nan")
    with pytest.raises(CliError, match=r"the training loss is nan at global step 0; .*fix: a lower --lr"):
        trainer.train()
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.pt"])
def test_damaged_checkpoint_file_is_named_on_resume(tiny: Path, tmp_path: Path, name: str) -> None:
    output = tmp_path / "o"
    assert finetune.main(finetune_args(tiny, output, "--epochs", "1", *TINY)) == 0
    path = output / json.loads((output / "train_state.json").read_text())["checkpoint"] / name
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CliError, match=f"cannot resume from {re.escape(str(path))} .*start a new run"):
        finetune.main(["--resume", str(output), "--epochs", "2"])


# -- input size ------------------------------------------------------------------------------------------

def _args(*argv: str):
    parser = finetune.argparse.ArgumentParser()
    finetune.configure_parser(parser)
    return parser.parse_args(list(argv))


def test_img_size_sets_model_and_data(tiny: Path, tmp_path: Path) -> None:
    kwargs = {k: v for k, v in SMALL_2D.items() if k != "img_size"}
    trainer = Trainer(_args(*finetune_args(tiny, tmp_path / "o", "--img-size", "64", *TINY, kwargs=kwargs)))
    trainer.setup()
    assert trainer.model.img_size == (64, 64) and trainer.data_cfg.input_size == (3, 64, 64)
    config = trainer.config().to_dict()
    assert config["model_args"]["img_size"] == 64 and config["pretrained_cfg"]["input_size"] == [3, 64, 64]


def test_img_size_and_num_frames_for_video_models(tmp_path: Path) -> None:
    kwargs = {k: v for k, v in SMALL_3D.items() if k != "img_size"}

    def resolve(*extra: str) -> Dict:
        args = _args(*finetune_args(tmp_path, tmp_path / "o", *extra, model="mvit_v2_s_16x4", kwargs=kwargs))
        model_kwargs, is_video = models.resolve_model_kwargs(args)
        assert is_video
        return model_kwargs

    assert resolve("--img-size", "48", "--num-frames", "4")["img_size"] == (4, 48, 48)
    assert resolve("--num-frames", "4")["img_size"] == (4, 224, 224)
    assert resolve("--img-size", "64")["img_size"] == (16, 64, 64)
    model = mvit_zoo.create_model("mvit_v2_s_16x4", **resolve("--img-size", "32", "--num-frames", "4"))
    assert resolve_data_config(model).input_size == (3, 4, 32, 32)
    with pytest.raises(CliError, match="input size is given twice"):
        models.resolve_model_kwargs(_args(*finetune_args(tmp_path, tmp_path / "o", "--img-size", "48")))
    with pytest.raises(CliError, match="--num-frames is for video models and mvit_tiny is an image model"):
        models.resolve_model_kwargs(_args(*finetune_args(tmp_path, tmp_path / "o", "--num-frames", "4",
                                                           kwargs={"depths": [1, 1, 1, 1]})))


# -- clear errors ------------------------------------------------------------------------------------------

def _error_case(case: str, tiny: Path, tmp: Path) -> List[str]:
    if case == "data is a file":
        return finetune_args(tiny / "a" / "0.png", tmp / "o")
    if case == "data missing":
        return finetune_args(tmp / "missing", tmp / "o")
    if case == "data empty":
        (tmp / "empty").mkdir()
        return finetune_args(tmp / "empty", tmp / "o")
    if case == "no images":
        for name in ("a", "b"):
            (tmp / "txt" / name).mkdir(parents=True)
            (tmp / "txt" / name / "x.txt").touch()
        return finetune_args(tmp / "txt", tmp / "o")
    flags = {
        "unknown model": ["--model", "mvit_smal"],
        "unknown tag": ["--model", "mvit_small.nope", "--pretrained"],
        "img_size too small": ["--model-kwargs", '{"img_size": 16}'],
        "unknown field": ["--model-kwargs", '{"embed_dims": 16}'],
        "not JSON": ["--model-kwargs", "{img_size: 16}"],
        "batch size 0": ["--batch-size", "0"],
        "negative batch size": ["--batch-size", "-2"],
        "0 epochs": ["--epochs", "0"],
        "odd batch with mixup": ["--batch-size", "3", "--mixup", "0.2"],
    }[case]
    return [*finetune_args(tiny, tmp / "o"), *flags]


@pytest.mark.parametrize("case, message", [
    ("unknown model", "--model mvit_smal: unknown model; did you mean mvit_small"),
    ("unknown tag", "--model mvit_small.nope: mvit_small has no pretrained tag 'nope'; available: fb_in1k"),
    ("data is a file", r"--data: .*a/0\.png is a file but not a text annotation file .*; give a folder of class "
                       r"folders, an annotation file"),
    ("data missing", r"--data: .*missing does not exist; give a class-folder tree, an annotation file or a folder"),
    ("data empty", r"--data: .*empty has no class folders; a classifier needs at least two"),
    ("no images", r"--data: no files with the extensions \.jpg, .* in the class folder\(s\) a, b of "),
    ("img_size too small", r"input size \(16, 16\) is too small for mvit_tiny: H=16 \(min 32\), W=16 \(min 32\), "
                           r'its total stride; fix: a size of 32 or more \(--img-size 32, or "img_size": 32 in'),
    ("unknown field", r"unknown MViT config field\(s\): \['embed_dims'\]; valid fields: .*depths, .*embed_dim, "),
    ("not JSON", r"--model-kwargs is not valid JSON \(.*\); give an object"),
    ("batch size 0", "--batch-size 0: must be at least 1"),
    ("negative batch size", "--batch-size -2: must be at least 1"),
    ("0 epochs", "--epochs 0: must be at least 1"),
    ("odd batch with mixup", "use an even --batch-size"),
])
def test_input_mistakes_raise_one_clear_error(case: str, message: str, tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(CliError, match=message) as info:
        finetune.main(_error_case(case, tiny, tmp_path))
    assert "\n" not in str(info.value)


def test_cli_prints_input_mistakes_as_one_line(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from mvit_zoo.apps import cli

    assert cli.main(["finetune", *finetune_args(tiny, tmp_path / "o", "--batch-size", "0")]) != 0
    assert capsys.readouterr().err == "mvit-zoo finetune: error: --batch-size 0: must be at least 1\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_device_cuda_without_a_gpu(tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(CliError, match="--device cuda: no CUDA GPU is available to torch; use --device cpu"):
        finetune.main(finetune_args(tiny, tmp_path / "o", "--device", "cuda"))


@pytest.mark.parametrize("workers", [0, 1])
def test_video_without_frames_is_named(tmp_path: Path, workers: int) -> None:
    import av

    data = tmp_path / "clips"
    rng = np.random.default_rng(0)
    for name, (dy, dx) in list(DIRECTIONS.items())[:2]:
        (data / name).mkdir(parents=True)
        write_video(data / name / "0.mp4", moving_bar(rng, dy, dx, frames=4), fps=8)
    empty = data / "down" / "1.mp4"
    with av.open(str(empty), mode="w") as container:  # a stream header, no frames
        stream = container.add_stream("mpeg4", rate=8)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        container.start_encoding()
    kwargs = {**SMALL_3D, "img_size": [2, 32, 32]}
    with pytest.raises(CliError, match=f"^cannot read {re.escape(str(empty))} .*; remove or re-encode that file$"):
        finetune.main(finetune_args(data, tmp_path / "o", "--epochs", "1", "--batch-size", "3", "--val-split", "0",
                                    "--workers", str(workers), model="mvit_v2_s_16x4", kwargs=kwargs))


# -- hints, summary, disk use, argument ranges, one run per folder ------------------------------------------------

VAL = ["--batch-size", "4", "--val-split", "0.34"]  # 8 train images (2 steps per epoch), 4 val


def test_finished_run_hint_carries_the_architecture(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The 'start a new run from its weights' hint of a run built with --model-kwargs and --img-size works as
    printed; a weights file that does not fit is named, with the arguments that fit it."""
    kwargs = {k: v for k, v in SMALL_2D.items() if k != "img_size"}
    run = tmp_path / "run"
    assert finetune.main(finetune_args(tiny, run, "--img-size", "32", "--epochs", "1", *TINY, kwargs=kwargs)) == 0
    capsys.readouterr()
    assert finetune.main(["--resume", str(run)]) == 0
    hint = capsys.readouterr().err.split("start a new run from its weights: ")[1].strip()
    assert hint.startswith("--model mvit_tiny --model-kwargs ") and f"--pretrained-file {run}" in hint
    argv = [*shlex.split(hint), "--data", str(tiny), "--output", str(tmp_path / "next"), "--no-progress", "--epochs",
            "1", *TINY]
    assert finetune.main(argv) == 0

    weights = run / "model.safetensors"
    with pytest.raises(CliError, match=f"^--pretrained-file {re.escape(str(weights))} does not fit mvit_tiny .*pass "
                                       r"the arguments of the run that wrote it: --model mvit_tiny --model-kwargs"):
        finetune.main(["--model", "mvit_tiny", "--pretrained-file", str(weights), "--data", str(tiny), "--output",
                       str(tmp_path / "other"), "--no-progress", *TINY])


def test_closing_summary_best_weights_and_readable_lr(tiny: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    assert finetune.main(finetune_args(tiny, run, "--epochs", "1", "--lr", "9.5e-6", "--min-lr", "9.5e-6",
                                       "--warmup-epochs", "0", *VAL)) == 0
    captured = capsys.readouterr()
    assert " lr=9.5e-06 " in captured.err and "lr=0.0000" not in captured.err
    out = captured.out.splitlines()
    assert out[0] == f"weights (last epoch, 0): {run / 'model.safetensors'}"
    assert re.fullmatch(rf"best weights \(epoch 0, val top-1 \d+\.\d\d%\): {re.escape(str(run))}/model_best"
                        r"\.safetensors", out[1])
    assert f"--checkpoint {run} (the last epoch's weights" in captured.out
    # the best epoch is the last one: its weights are a link to the same file, not a second copy
    assert os.path.samefile(run / "model_best.safetensors", run / "model.safetensors")


def test_keep_checkpoints(tiny: Path, tmp_path: Path) -> None:
    """Saves at steps 1, 2 and 3: the default keeps the last, --keep-checkpoints 2 the last two."""
    for keep, expected in ((None, ["step-00000003"]), ("2", ["step-00000002", "step-00000003"])):
        run = tmp_path / f"keep{keep}"
        extra = ["--keep-checkpoints", keep] if keep else []
        assert finetune.main(finetune_args(tiny, run, "--epochs", "1", "--save-every", "1", *extra, *TINY)) == 0
        assert sorted(p.name[:13] for p in (run / "checkpoints").iterdir()) == expected
    run = tmp_path / "keep2"
    (run / "checkpoints" / "mine").mkdir()  # not the run's: refused, never removed
    with pytest.raises(CliError, match="holds entries this run did not write"):
        finetune.main(["--resume", str(run), "--epochs", "2", "--keep-checkpoints", "1"])
    assert (run / "checkpoints" / "mine").is_dir()


@pytest.mark.parametrize("flags, message", [
    (["--clip-grad", "-1"], r"--clip-grad -1: must be in \(0, inf\) \(a gradient norm"),
    (["--val-split", "2"], r"--val-split 2: must be in \[0, 1\)"),
    (["--val-split", "-0.5"], r"--val-split -0.5: must be in \[0, 1\)"),
    (["--warmup-epochs", "-1"], r"--warmup-epochs -1: must be in \[0, inf\)"),
    (["--hflip", "2"], r"--hflip 2: must be in \[0, 1\] \(a probability\)"),
    (["--ema-decay", "2"], r"--ema-decay 2: must be in \[0, 1\)"),
    (["--smoothing", "1.5"], r"--smoothing 1.5: must be in \[0, 1\)"),
    (["--drop-path", "5"], r"--drop-path 5: must be in \[0, 1\)"),
    (["--lr", "nan"], r"--lr nan: must be in \(0, inf\)"),
    (["--scale", "0.5", "0.2"], r"--scale 0.5 0.2: give MIN MAX with 0 < MIN <= MAX <= 1"),
    (["--keep-checkpoints", "0"], r"--keep-checkpoints 0: must be at least 1"),
    (["--model-kwargs", '{"embed_dim": 0}'], r"--model-kwargs: embed_dim must be a number or list of numbers >= 1"),
    (["--model-kwargs", '{"depths": [1, 1, 0, 1]}'], r"--model-kwargs: depths must be"),
])
def test_out_of_range_numbers_are_refused(flags: List[str], message: str, tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(CliError, match=message):
        finetune.main([*finetune_args(tiny, tmp_path / "o"), *flags])
    assert not (tmp_path / "o").exists()


def test_second_run_into_the_same_folder_is_refused(tiny: Path, tmp_path: Path) -> None:
    from filelock import FileLock

    output = tmp_path / "o"
    output.mkdir()
    with FileLock(str(output / run_folder.LOCK_FILE)):  # another run holds the folder
        (output / f"{run_folder.LOCK_FILE}.pid").write_text("4242\n")
        with pytest.raises(CliError, match=f"^another run is writing to {re.escape(str(output))} \\(pid 4242\\)"):
            finetune.main(finetune_args(tiny, output, "--epochs", "1", *TINY))
    assert finetune.main(finetune_args(tiny, output, "--epochs", "1", *TINY)) == 0  # free again


# -- checkpoint files are read without running code ------------------------------------------------------

def test_resume_refuses_integer_weights(tiny: Path, tmp_path: Path) -> None:
    """model.safetensors with an int or bool tensor is not weights: --resume names the file."""
    from safetensors.torch import save_file

    output = tmp_path / "o"
    assert finetune.main(finetune_args(tiny, output, "--epochs", "1", *TINY)) == 0
    path = output / json.loads((output / "train_state.json").read_text())["checkpoint"] / "model.safetensors"
    for dtype in (torch.int64, torch.bool):
        state = load_file(path)
        key = next(k for k in state if k.endswith("weight"))
        state[key] = state[key].to(dtype)
        save_file(state, str(path))
        with pytest.raises(CliError, match=f"cannot resume from {re.escape(str(path))} "):
            finetune.main(["--resume", str(output), "--epochs", "2"])


class _RunsCode:
    """Unpickling this touches a marker file: the code a malicious optimizer.pt would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_resume_refuses_a_training_state_that_runs_code(tiny: Path, tmp_path: Path) -> None:
    output, marker = tmp_path / "o", tmp_path / "pwned"
    assert finetune.main(finetune_args(tiny, output, "--epochs", "1", *TINY)) == 0
    path = output / json.loads((output / "train_state.json").read_text())["checkpoint"] / "optimizer.pt"
    torch.save({"optimizer": _RunsCode(marker)}, path)
    with pytest.raises(mvit_zoo.UnsafeCheckpointError, match=f"refused to load {re.escape(str(path))}"):
        finetune.main(["--resume", str(output), "--epochs", "2"])
    assert not marker.exists()


def test_pretrained_file_too_small_for_the_model_kwargs(tiny: Path, tmp_path: Path) -> None:
    """--model-kwargs that would build a model far larger than the --pretrained-file are refused before building."""
    output = tmp_path / "o"
    assert finetune.main(finetune_args(tiny, output, "--epochs", "1", *TINY)) == 0
    big = {**SMALL_2D, "embed_dim": 512, "depths": [2, 2, 8, 2]}
    with pytest.raises(CliError, match="does not fit mvit_tiny with these --model-kwargs .* would hold"):
        finetune.main(finetune_args(tiny, tmp_path / "big", "--epochs", "1", *TINY, "--pretrained-file",
                                    str(output / "model.safetensors"), kwargs=big))
