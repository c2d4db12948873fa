"""Fine-tune an MViT model (or any timm classifier) on a folder of images or videos.

Usage::

    mvit-zoo finetune --model mvit_small.fb_in1k --data DIR --epochs 30 --output runs/flowers
    mvit-zoo finetune --resume runs/flowers        # after a Ctrl-C: continues exactly
    torchrun --nproc_per_node=4 -m mvit_zoo finetune --model mvit_v2_s_16x4.fb_k400 --data clips/ ...

`DIR` holds one folder per class (`DIR/<class>/<file>`), or `train/` and `val/`
trees of class folders. Image models read images; video models (`model.is_video`) read
video files decoded with PyAV and sample `T` frames every `tau` frames as in the
model's pretrained config.

The recipe is the standard transfer one: AdamW, warm-up then cosine decay per step,
layer-wise learning-rate decay from `group_matcher`, no weight decay on norms, biases and
position tables, label smoothing, optional mixup/cutmix and EMA, bf16 autocast, and a new
head sized to the class folders. The output folder holds `model.safetensors` and a
timm-style `config.json` (with `label_names`), per-epoch metrics (CSV and JSON), and the
training state that `--resume` continues from exactly: `train_state.json` names the last
complete checkpoint folder under `checkpoints/`, so a save cut short (Ctrl-C, a kill, a full
disk) leaves the previous one to resume from. A run removes only the step folders it wrote
(`step-N-<id>`, each holding a marker with the run's id), and refuses an output whose
`checkpoints/` is a link or holds anything else; it keeps the latest `--keep-checkpoints` of its
step folders (default 1). `model_best.safetensors` holds the weights of the best validation epoch
(a link to the published weights when that is the last one); a finished run prints (on stdout) where
its weights are and which epoch was best. One run at a time writes to an output folder: it holds the
lock `.mvit-zoo.lock` there, and a second run is refused. A first Ctrl-C finishes the step under way,
saves a checkpoint and prints the command that resumes it.

Determinism: augmentation is seeded per (seed, epoch, sample) and everything else per
(seed, step, rank), so a run gives the same numbers whatever the number of data workers,
and a resumed run gives the same numbers as an uninterrupted one.
"""
from __future__ import annotations

import argparse
import csv
import difflib
import inspect
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import sys
import threading
import time
import uuid
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import timm
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3

from ..data.config import ModelConfig, check_model_args, config_for_model, write_config
from ..data.folders import (
    IMAGE_EXTENSIONS, EpochSeeded, SampleError, Samples, ShardSampler, derive_seed, seed_everything,
)
from ..data.pipeline import Augmentation, build_datasets, flatten_clips
from ..data.reader import BACKENDS, resolve_backend
from ..data.recipes import RECIPES, apply_recipe, get_recipe
from ..data.sources import FORMATS, DatasetSplit, find_splits
from ..data.transforms import DataConfig, is_video_model, resolve_data_config
from ..data.video import VIDEO_EXTENSIONS
from ..data.views import SLOWFAST_TARGET_FPS
from ..evaluation import evaluate as evaluate_model, view_sampling
from ..files import atomic_write
from ..weights.convert import CheckpointMismatchError
from ..weights.hub import UnsafeCheckpointError, check_build_size, read_training_state, read_weights
from .cli import CliError
from .threads import add_threads_argument, apply_threads

__all__ = [
    "check_model_name",
    "parse_model_kwargs",
    "resolve_model_kwargs",
    "Trainer",
    "configure_parser",
    "run",
    "main",
]

STATE_FILE = "train_state.json"
CHECKPOINTS_DIR = "checkpoints"
# Every step folder a run writes holds this file with the run's id: only such folders are ever removed
RUN_MARKER = ".mvit-zoo-run"
_STEP_FOLDER = re.compile(r"step-\d{8}-[0-9a-f]{8}")
_CHECKPOINT_FILES = frozenset({RUN_MARKER, "model.safetensors", "model_ema.safetensors", "optimizer.pt"})
OPTIMIZER_FILE = "optimizer.pt"
WEIGHTS_FILE = "model.safetensors"
EMA_WEIGHTS_FILE = "model_ema.safetensors"
BEST_WEIGHTS_FILE = "model_best.safetensors"
# Arguments that describe the run rather than the result; they may change on --resume
_RUNTIME_ARGS = frozenset({"resume", "output", "workers", "progress", "device", "save_every", "data", "data_root",
                           "val_data", "keep_checkpoints", "threads"})
# Where the data is: may change on --resume (the data moved), taken from the run when not given
_DATA_ARGS = ("data", "data_root", "val_data")
# Held by the run writing to an output folder (its pid in LOCK_FILE + ".pid"): a second run there is refused
LOCK_FILE = ".mvit-zoo.lock"
# Arguments a run cannot start without; `--resume DIR` alone takes them from the run
_RUN_ARGS = ("model", "data", "output")
# Set in the parsed arguments by prepare_parser when it made a --recipe the options' defaults (not saved)
_RECIPE_APPLIED = "_recipe_applied"


def _ignore_sigint(worker_id: int) -> None:
    """Data-loader workers leave Ctrl-C to the main process, which saves a checkpoint and stops them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _loader(dataset: Dataset, sampler: ShardSampler, batch_size: int, workers: int,
            drop_last: bool, pin_memory: bool) -> DataLoader:
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
        pin_memory=pin_memory, persistent_workers=False, worker_init_fn=_ignore_sigint if workers else None,
    )


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------

def _tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def parse_model_kwargs(text: Optional[str]) -> Dict[str, Any]:
    """`--model-kwargs` JSON object -> keyword arguments (JSON lists become tuples)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as e:
        raise CliError(f'--model-kwargs is not valid JSON ({e}); give an object, e.g. \'{{"img_size": 64}}\'') from e
    if not isinstance(value, dict):
        raise CliError(f'--model-kwargs must be a JSON object, got {text!r}; e.g. \'{{"img_size": 64}}\'')
    try:
        check_model_args(value, "--model-kwargs")
    except ValueError as e:
        raise CliError(str(e)) from None
    return _tuples(value)


def check_model_name(name: str) -> None:
    """A clear error for an unknown architecture (with close names) or pretrained tag; the one message of
    every command that takes `--model`."""
    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f'did you mean {", ".join(close)}?' if close else "see `timm.list_models('mvit*')`"
        raise CliError(f"--model {name}: unknown model; {hint}")
    if tag:
        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
        if tag not in tags:
            raise CliError(f'--model {name}: {arch} has no pretrained tag {tag!r}; available: '
                           f'{", ".join(tags) or f"none (name the architecture alone: --model {arch})"}')


def _valid_fields(arch: str) -> str:
    """The architecture arguments an mvit-zoo model accepts, for error messages."""
    from ..model.mvit import MViT, MViTCfg
    from ..model.registry import list_models

    if arch not in list_models():
        return f"see the constructor of the class behind timm.create_model({arch!r})"
    params = set(inspect.signature(MViT.__init__).parameters) - {"self", "cfg", "cfg_overrides"}
    return "valid fields: " + ", ".join(sorted(params | {f.name for f in fields(MViTCfg)} | {"num_frames"}))


def _meta_model(name: str, kwargs: Dict[str, Any]) -> nn.Module:
    """A weightless copy of the model (meta device), built to check `kwargs` and read the input kind."""
    arch = name.partition(".")[0]
    try:
        with torch.device("meta"):
            return timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:
        raise CliError(f"--model-kwargs {json.dumps(kwargs, default=list)}: {e}; {_valid_fields(arch)}") from e
    except ValueError as e:
        raise CliError(f"--model-kwargs {json.dumps(kwargs, default=list)}: {e}") from e


def resolve_model_kwargs(args: argparse.Namespace) -> Tuple[Dict[str, Any], bool]:
    """Architecture overrides of the run (`--model-kwargs` with `--img-size`/`--num-frames` merged
    in), checked on a weightless copy of the model; also whether the model takes video clips."""
    check_model_name(args.model)
    kwargs = parse_model_kwargs(args.model_kwargs)
    if (args.img_size or args.num_frames) and "img_size" in kwargs:
        raise CliError("the input size is given twice (--img-size/--num-frames and --model-kwargs img_size); "
                       "give it once")
    size = kwargs.pop("img_size", None)
    model = _meta_model(args.model, kwargs)  # at its own size: a too small one may not even build
    is_video = is_video_model(model)
    if args.num_frames and not is_video:
        raise CliError(f"--num-frames is for video models and {args.model} is an image model; drop it")
    if args.img_size or args.num_frames:
        if is_video:
            frames, height, width = tuple(model.img_size)
            size = (args.num_frames or frames, args.img_size or height, args.img_size or width)
        else:
            size = args.img_size
    if size is not None:
        _check_input_size(args.model, model, size)
        kwargs["img_size"] = size
        _meta_model(args.model, kwargs)
    return kwargs, is_video


def _check_input_size(name: str, model: nn.Module, size: Any) -> None:
    """A clear error for an input size below the model's `min_input_size` (its total stride)."""
    low = getattr(model, "min_input_size", None)
    if low is None:
        return
    grid = (size, size) if isinstance(size, int) else tuple(size)
    low = tuple(low)[-len(grid):]
    if any(s < m for s, m in zip(grid, low)):
        axes = ("T", "H", "W")[-len(grid):]
        what = ", ".join(f"{a}={s} (min {m})" for a, s, m in zip(axes, grid, low))
        m = max(low[-2:])
        raise CliError(f'input size {grid} is too small for {name}: {what}, its total stride; fix: a size of '
                       f'{m} or more (--img-size {m}, or "img_size": {m} in --model-kwargs)')


def _architecture_hint(weights: Path) -> str:
    """How to build the model that `weights` fit: the arguments its config.json records, if there is one."""
    from ..data.config import ConfigError, find_config

    try:
        config = find_config(weights)
    except (ConfigError, OSError):
        config = None
    if config is None:
        return "pass the --model and --model-kwargs the weights were trained with"
    return f"pass the arguments of the run that wrote it: {_start_from(weights.parent)}"


def _start_from(run: Path) -> str:
    """The finetune arguments that start a new run from the weights of the run in `run`: its architecture
    and architecture arguments (from its config.json) and `--pretrained-file`."""
    from ..data.config import ConfigError, find_config

    try:
        config = find_config(run)
    except (ConfigError, OSError):
        config = None
    flags = ["--pretrained-file", str(run / WEIGHTS_FILE)]
    if config is not None:
        model_args = {k: v for k, v in config.model_args.items() if k != "num_classes"}
        flags = ["--model", config.architecture, *(["--model-kwargs", json.dumps(model_args)] if model_args else []),
                 *flags]
    return " ".join(map(shlex.quote, flags))


def create_finetune_model(
        name: str,
        num_classes: int,
        pretrained: bool,
        model_kwargs: Dict[str, Any],
        pretrained_file: Optional[str] = None,
        drop_path_rate: Optional[float] = None,
) -> nn.Module:
    """The model with pretrained weights (if asked) and a `num_classes` head.

    The head of a pretrained tag is always new (freshly initialised). The head of a
    `pretrained_file` is kept when its class count matches (continuing a fine-tune),
    otherwise left out for a new one.
    """
    kwargs = dict(model_kwargs, num_classes=num_classes)
    if drop_path_rate is not None:
        kwargs["drop_path_rate"] = drop_path_rate
    if pretrained_file:
        # an unknown class count: the loader keeps a fitting classifier and leaves out another
        kwargs["pretrained_cfg_overlay"] = dict(file=str(pretrained_file), num_classes=None)
        try:
            check_build_size(name, {k: v for k, v in kwargs.items() if k != "pretrained_cfg_overlay"}, pretrained_file,
                             source="--model-kwargs")
            return timm.create_model(name, pretrained=True, **kwargs)
        except CheckpointMismatchError as e:
            detail = str(e).split(": ", 1)[-1]  # after the loader's title, which names the tag, not the file
            raise CliError(f"--pretrained-file {pretrained_file} does not fit {name}"
                           f"{' with these --model-kwargs' if model_kwargs else ''} ({detail[:300]}...); "
                           f"{_architecture_hint(Path(pretrained_file))}") from e
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    if pretrained and model.pretrained_cfg.get("num_classes") == num_classes:
        model.reset_classifier(num_classes)  # the tag's own head was loaded: start a new one
    return model


# --------------------------------------------------------------------------------------------------
# Distributed helpers
# --------------------------------------------------------------------------------------------------

@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_arg: str) -> Tuple[DistInfo, torch.device]:
    """Join the `torchrun` process group if launched by it (nccl on GPU, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(int(os.environ.get("RANK", "0")), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device_arg)
    except RuntimeError as e:
        raise CliError(f"--device {device_arg}: {e}; give cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError(f"--device {device_arg}: no CUDA GPU is available to torch; use --device cpu "
                       "(or install a CUDA build of torch on a machine with a GPU)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CliError(f"--device {device_arg}: only {torch.cuda.device_count()} CUDA device(s); "
                       f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", info.local_rank if info.enabled else torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if info.enabled and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return info, device


def all_reduce_sum(values: Sequence[float], info: DistInfo, device: torch.device) -> List[float]:
    """Sum of `values` over all processes (float64)."""
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def _barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------

def _write_json(path: Path, value: Any) -> None:
    def write(p: Path) -> None:
        p.write_text(json.dumps(value, indent=2) + "\n")
    atomic_write(path, write)


def save_weights(path: Path, model: nn.Module, global_step: int) -> None:
    """`model`'s state dict as safetensors, tagged with the step it was saved at."""
    from safetensors.torch import save_file
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda p: save_file(state, str(p), metadata={"format": "pt", "global_step": str(global_step)}))


def _link(source: Path, path: Path) -> None:
    """Make `path` a copy of the checkpoint file `source` (a hard link where the file system allows)."""
    def link(p: Path) -> None:
        p.unlink(missing_ok=True)
        try:
            os.link(source, p)
        except OSError:
            shutil.copyfile(source, p)
    atomic_write(path, link)


def _is_own_checkpoint(entry: Path, run_id: str, legacy: bool) -> bool:
    """True if `entry` is a step folder this run wrote: a real folder named `step-N-<id>` holding the run's
    marker. A run saved before markers existed (`legacy`) owns step folders that hold only checkpoint files."""
    if entry.is_symlink() or not entry.is_dir() or not _STEP_FOLDER.fullmatch(entry.name):
        return False
    marker = entry / RUN_MARKER
    if marker.is_file() and not marker.is_symlink():
        return marker.read_text().strip() == run_id
    return legacy and all(f.name in _CHECKPOINT_FILES or f.name.endswith(".part") for f in entry.iterdir())


def check_checkpoints_folder(output: Path, run_id: str, legacy: bool = False) -> List[Path]:
    """The step folders of `output/checkpoints/` that this run wrote; a clear error if that folder is a link
    or a file, or holds anything else (another tool's or another run's files are never touched)."""
    folder = output / CHECKPOINTS_DIR
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        kind = "a link" if folder.is_symlink() else "a file"
        raise CliError(f"{folder} is {kind}; a run keeps its checkpoints in a folder of its own there: "
                       "choose another --output, or move it away")
    if not folder.exists():
        return []
    entries = sorted(folder.iterdir())
    foreign = [e.name for e in entries if not _is_own_checkpoint(e, run_id, legacy)]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise CliError(f"{folder} holds entries this run did not write ({shown}); the run removes its own old "
                       "checkpoints there and touches nothing else: choose another --output, or move them away")
    return entries


def _load_checkpoint_file(path: Path, load: Callable[[Path], Any], run: Path) -> Any:
    """`load(path)`, with an error naming the file and the fix if it is missing, damaged or does not fit."""
    try:
        return load(path)
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to read or apply the file means the same to the user
        detail = " ".join(f"{type(e).__name__}: {e}".split())
        raise CliError(
            f"cannot resume from {path} ({detail[:300]}); if the model arguments were changed, resume with the "
            f"run's own; if the file is damaged, start a new run (e.g. from the run's published weights: "
            f"{_start_from(run)})") from e


def _load_weights(path: Path, model: nn.Module) -> None:
    model.load_state_dict(read_weights(path))


def _rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    state: Dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _json_safe(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return None


def model_config(
        model: nn.Module,
        name: str,
        label_names: Sequence[str],
        model_kwargs: Dict[str, Any],
        data_cfg: DataConfig,
        frame_sampling: Optional[str] = None,
) -> ModelConfig:
    """The `config.json` of the fine-tuned weights (schema: :mod:`mvit_zoo.data.config`).

    `timm.create_model('local-dir:<folder>', pretrained=True)` rebuilds the model from it;
    `label_names` are the dataset's class names. The preprocessing and the frame sampling (`frame_sampling`,
    default the pretrained config's: an SSv2 model's 'segment') are the run's.
    """
    source = dict(getattr(model, "pretrained_cfg", None) or {})
    data = data_cfg.to_dict()
    video = {k: data[k] for k in ("num_frames", "sampling_rate", "channel_order") if k in data}
    if data_cfg.is_video:
        video["frame_sampling"] = frame_sampling or source.get("frame_sampling")
    model_args = {k: v for k, v in model_kwargs.items() if k not in ("drop_path_rate", "drop_rate")}
    model_args["num_classes"] = len(label_names)
    return config_for_model(
        model, model_args=model_args, label_names=label_names, data_config=video,
        pretrained_cfg={**source, **{k: data[k] for k in ("mean", "std", "crop_pct", "interpolation")}},
        source={"tag": name if "." in name else None, "description": f"fine-tuned from {name} with mvit-zoo finetune"},
    )


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------

def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, amp: bool, info: DistInfo,
             progress: bool = False, desc: str = "val") -> Dict[str, float]:
    """Loss, top-1 and top-5 (percent) over this process's shard, reduced over all processes."""
    def reduce(t: torch.Tensor) -> torch.Tensor:
        return torch.tensor(all_reduce_sum(t.tolist(), info, device), dtype=torch.float64)
    return evaluate_model(model, loader, device=device, amp=amp, progress=progress, desc=desc,
                          all_reduce=reduce).metrics()


def _autocast(device: torch.device, enabled: bool):
    if not enabled:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _apply_mixup(mixup: Mixup, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """timm mixup/cutmix; video clips get the same box on every frame."""
    if x.ndim == 5:
        b, c, t, h, w = x.shape
        x, y = mixup(x.reshape(b, c * t, h, w), y)
        return x.reshape(b, c, t, h, w), y
    return mixup(x, y)


def _write_metrics(output: Path, history: List[Dict[str, Any]]) -> None:
    _write_json(output / "metrics.json", history)
    keys: List[str] = []
    for row in history:
        keys.extend(k for k in row if k not in keys)

    def write(p: Path) -> None:
        with open(p, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(history)
    atomic_write(output / "metrics.csv", write)


def _normalised(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists), or None where JSON cannot hold it."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        return None


def _check_resume_args(saved: Dict[str, Any], args: argparse.Namespace) -> None:
    current = _args_dict(args)
    changed = [k for k, v in saved.items() if k not in _RUNTIME_ARGS and current.get(k, v) != v]
    if changed:
        detail = ", ".join(f"{k}: {saved[k]!r} -> {current.get(k)!r}" for k in changed)
        print(f"warning: resuming with changed arguments ({detail}); the run will not match an uninterrupted one",
              file=sys.stderr)


def _args_dict(args: argparse.Namespace) -> Dict[str, Any]:
    return {k: _normalised(v) for k, v in vars(args).items() if not callable(v) and not k.startswith("_")}


def _read_splits(args: argparse.Namespace, extensions: Tuple[str, ...]) -> Tuple[DatasetSplit, DatasetSplit]:
    """The (train, val) splits of `--data` (`--data-root`, `--data-format`, `--val-data`, `--val-split`), with a
    one-line note (main process) on the listed files that are not found."""
    try:
        train, val = find_splits(args.data, args.data_root, args.data_format, args.val_data, args.val_split,
                                 args.seed, extensions)
    except UnicodeDecodeError as e:  # an image or a video given as the annotation file
        raise CliError(f"--data: {args.data} is a file but not a text annotation file ({e}); give a folder of "
                       "class folders, an annotation file (path-label list, Kinetics CSV, SSv2 JSON) or a dataset "
                       "folder") from e
    except (OSError, ValueError) as e:
        raise CliError(f"--data: {e}") from e
    missing = train.missing + val.missing
    if missing and int(os.environ.get("RANK", "0")) == 0:
        print(f"note: {len(missing)} listed file(s) not found, left out (first: {missing[0]}); check --data-root",
              file=sys.stderr)
    return train, val


def _decoder(name: str) -> str:
    """The video backend of `--decoder` (auto: torchcodec if it works here, else PyAV)."""
    try:
        return resolve_backend(None if name == "auto" else name)
    except (ImportError, ValueError) as e:
        raise CliError(f"--decoder {name}: {e}") from e


class Trainer:
    """One fine-tuning run; see :func:`run`."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.info, self.device = init_distributed(args.device)
        self.output = Path(args.output)
        self.amp = args.amp if args.amp is not None else self.device.type == "cuda"
        self.progress = args.progress and self.info.is_main
        self.history: List[Dict[str, Any]] = []
        self.global_step = 0
        self.start_epoch = 0
        self.start_step = 0
        self.epoch_loss = [0.0, 0.0]  # summed training loss and sample count of the current epoch
        self.best = {"top1": -1.0, "epoch": -1}
        self.finished = False  # set by --resume of a run that has trained all its epochs
        self.run_id = ""  # names the step folders this run writes (RUN_MARKER), kept in train_state.json
        self._legacy_checkpoints = False  # resumed from a run saved before step folders carried RUN_MARKER
        self.interrupted = False  # set when a Ctrl-C stopped training after saving a checkpoint
        self._stop_requested = 0.0  # time of the first Ctrl-C, 0 if none

    # -- setup ----------------------------------------------------------------------------------

    def setup(self) -> None:
        """Build model, data, optimizer and schedule; load the saved state with `--resume`."""
        args = self.args
        if args.resume is None and (self.output / STATE_FILE).exists():
            raise CliError(f"{self.output} already holds a run; pass --resume to continue it "
                           f"or choose another --output")
        if args.resume is None:
            self.run_id = uuid.uuid4().hex
            check_checkpoints_folder(self.output, self.run_id)
        # The data type depends on the model and the head on the data: the overrides are checked and
        # the model's input kind read on a weightless copy first.
        self.model_kwargs, is_video = resolve_model_kwargs(args)
        train, val = _read_splits(args, VIDEO_EXTENSIONS if is_video else IMAGE_EXTENSIONS)
        self.classes = train.classes
        if args.clips_per_video > 1 and not is_video:
            raise CliError(f"--clips-per-video {args.clips_per_video} is for video models and {args.model} is an "
                           "image model; drop it")

        seed_everything(args.seed)
        self.model = create_finetune_model(
            args.model, len(self.classes), args.pretrained, self.model_kwargs,
            pretrained_file=args.pretrained_file, drop_path_rate=args.drop_path,
        )
        if args.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.model.to(self.device)
        self.data_cfg = resolve_data_config(self.model, args.sampling_rate)
        if args.channel_order is not None:
            self.data_cfg = replace(self.data_cfg, channel_order=args.channel_order)
        self.frame_sampling = args.frame_sampling or self.model.pretrained_cfg.get("frame_sampling") or "stride"
        self._build_data(train.samples, val.samples)
        self._build_optimisation()
        if args.resume is not None:
            self._resume(Path(args.resume) if args.resume else self.output)
            check_checkpoints_folder(self.output, self.run_id, legacy=self._legacy_checkpoints)
        self.ddp_model: nn.Module = self.model
        if self.info.enabled:
            # MViT's depthwise pooling convs keep channels-last gradients: a harmless DDP performance note
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            )

    def _build_data(self, train_samples: Samples, val_samples: Samples) -> None:
        args, info, cfg = self.args, self.info, self.data_cfg
        aug = Augmentation(
            scale=tuple(args.scale), hflip=args.hflip, color_jitter=args.color_jitter, auto_augment=args.aa,
            re_prob=args.reprob, clips_per_video=args.clips_per_video, frame_sampling=self.frame_sampling,
            target_fps=args.target_fps, crop_mode=args.crop_mode, jitter_scales=tuple(args.jitter_scales),
            inverse_uniform=args.inverse_uniform, aa_interpolation=args.aa_interpolation, re_mode=args.re_mode,
            backend=_decoder(args.decoder) if cfg.is_video else None,
        )
        # the run's frame sampling, which config.json records: `mvit-zoo validate` of the weights scores the same
        val_sampling = (replace(view_sampling(self.model, "1x1", cfg), frame_sampling=self.frame_sampling)
                        if cfg.is_video else None)
        try:
            train_ds, val_ds = build_datasets(train_samples, val_samples, cfg, aug, val_sampling)
        except ValueError as e:  # the one option the parser cannot check: a video clip's --aa policy
            raise CliError(f"--aa {args.aa}: {e}") from e
        self.num_train, self.num_val = len(train_samples), len(val_samples)
        self.train_ds = EpochSeeded(train_ds, args.seed)
        self.train_sampler = ShardSampler(self.num_train, info.world_size, info.rank, shuffle=True, seed=args.seed,
                                          pad=True)
        shard = len(self.train_sampler)
        drop_last = shard >= args.batch_size
        self.steps_per_epoch = shard // args.batch_size if drop_last else 1
        pin = self.device.type == "cuda"
        self.train_loader = _loader(self.train_ds, self.train_sampler, args.batch_size, args.workers, drop_last, pin)
        self.val_loader: Optional[DataLoader] = None
        if val_samples:
            self.val_loader = _loader(EpochSeeded(val_ds, None), ShardSampler(self.num_val, info.world_size, info.rank),
                                      args.eval_batch_size or args.batch_size, args.workers, False, pin)

    def _build_optimisation(self) -> None:
        args = self.args
        # timm groups the parameters by layer (group_matcher) for layer decay, and exempts 1-D parameters and
        # model.no_weight_decay() from weight decay; SGD is SlowFast's: momentum, Nesterov
        extra = {"momentum": args.momentum, "nesterov": True} if args.opt == "sgd" else {}
        self.optimizer = create_optimizer_v2(self.model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                             layer_decay=self._layer_decay(), **extra)
        total_steps = self.steps_per_epoch * args.epochs
        warmup = min(int(round(args.warmup_epochs * self.steps_per_epoch)), max(total_steps - 1, 0))
        self.scheduler = CosineLRScheduler(
            self.optimizer, t_initial=max(total_steps - warmup, 1), lr_min=args.min_lr, warmup_t=warmup,
            warmup_lr_init=args.warmup_lr, warmup_prefix=True, t_in_epochs=False,
        )
        self.mixup: Optional[Mixup] = None
        if args.mixup > 0 or args.cutmix > 0:
            if args.batch_size * args.clips_per_video % 2:
                raise CliError(f"mixup/cutmix pairs the clips of a batch (--batch-size x --clips-per-video); use an "
                               f"even --batch-size (not {args.batch_size})")
            self.mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                               label_smoothing=args.smoothing, num_classes=len(self.classes))
            self.criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = SoftTargetCrossEntropy()
        else:
            self.criterion = nn.CrossEntropyLoss(label_smoothing=args.smoothing)
        self.ema = ModelEmaV3(self.model, decay=args.ema_decay, use_warmup=True) if args.ema else None

    def _layer_decay(self) -> Optional[float]:
        layer_decay = self.args.layer_decay
        if layer_decay is None:
            layer_decay = 0.75 if (self.args.pretrained or self.args.pretrained_file) else 1.0
        return None if layer_decay >= 1.0 else layer_decay

    # -- checkpoints ----------------------------------------------------------------------------
    #
    # The resumable state of step N lives in its own folder, checkpoints/step-N-<id>/ (weights,
    # EMA weights, optimizer/scheduler/RNG state), written in full before train_state.json (the
    # manifest, replaced atomically) names it. An interrupted save leaves the previous checkpoint
    # named and whole. The published model.safetensors (and model_ema.safetensors) beside
    # config.json are then linked to the new checkpoint's files and the older folders removed.

    def _resume(self, folder: Path) -> None:
        state = read_state(folder)
        if state["label_names"] != self.classes:
            raise CliError(f"the classes under {self.args.data} differ from those of the run in {folder}; "
                           "give the run's own --data (or start a new run)")
        if state["steps_per_epoch"] != self.steps_per_epoch:
            raise CliError(f'steps per epoch changed ({state["steps_per_epoch"]} -> {self.steps_per_epoch}: data, '
                           '--batch-size or process count differ); resume with the run\'s own to continue exactly')
        _check_resume_args(state.get("args", {}), self.args)
        # a run saved before step folders carried its id gets one now; its own folders are told by their files
        self.run_id = state.get("run_id") or uuid.uuid4().hex
        self._legacy_checkpoints = "run_id" not in state
        check_checkpoints_folder(folder, self.run_id, legacy=self._legacy_checkpoints)
        checkpoint = folder / state["checkpoint"]
        _load_checkpoint_file(checkpoint / WEIGHTS_FILE, lambda p: _load_weights(p, self.model), folder)
        if self.ema is not None:
            if not (checkpoint / EMA_WEIGHTS_FILE).exists():
                raise CliError(f"--ema given but the run in {folder} kept no EMA weights; resume without --ema")
            _load_checkpoint_file(checkpoint / EMA_WEIGHTS_FILE, lambda p: _load_weights(p, self.ema.module), folder)

        def load_extra(path: Path) -> None:
            extra = read_training_state(path)
            self.optimizer.load_state_dict(extra["optimizer"])
            self.scheduler.load_state_dict(extra["scheduler"])
            _set_rng_state(extra["rng"])
        _load_checkpoint_file(checkpoint / OPTIMIZER_FILE, load_extra, folder)
        self.global_step = state["global_step"]
        self.start_epoch, self.start_step = state["epoch"], state["step_in_epoch"]
        self.epoch_loss = list(state["epoch_loss"]) if self.info.is_main else [0.0, 0.0]
        self.best = state["best"]
        self.history = state["history"]
        self.finished = self.start_epoch >= self.args.epochs
        if self.info.is_main:
            # the files derived from the checkpoint, in case the save that made it was cut short
            self.output.mkdir(parents=True, exist_ok=True)
            self._publish(checkpoint)
            if self.history:
                _write_metrics(self.output, self.history)
        if self.info.is_main and not self.finished:
            print(f"resumed from {folder} at epoch {self.start_epoch} step {self.start_step} "
                  f"(global step {self.global_step})", file=sys.stderr)

    def save(self, epoch: int, step_in_epoch: int) -> None:
        """Write a checkpoint (weights, optimizer/scheduler/RNG state, training state; rank 0) and publish
        its weights in the output folder."""
        # the running training loss is summed over processes first (a collective)
        epoch_loss = all_reduce_sum(self.epoch_loss, self.info, self.device)
        if self.info.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
            write_config(self.output, self.config())
            name = f"{CHECKPOINTS_DIR}/step-{self.global_step:08d}-{uuid.uuid4().hex[:8]}"
            checkpoint = self.output / name
            own = check_checkpoints_folder(self.output, self.run_id, legacy=self._legacy_checkpoints)
            checkpoint.mkdir(parents=True)
            (checkpoint / RUN_MARKER).write_text(self.run_id + "\n")  # first: a save cut short is still ours
            save_weights(checkpoint / WEIGHTS_FILE, self.model, self.global_step)
            if self.ema is not None:
                save_weights(checkpoint / EMA_WEIGHTS_FILE, self.ema.module, self.global_step)
            extra = {"global_step": self.global_step, "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(), "rng": _rng_state()}
            atomic_write(checkpoint / OPTIMIZER_FILE, lambda p: torch.save(extra, p))
            state = {
                "model": self.args.model, "epoch": epoch, "step_in_epoch": step_in_epoch,
                "global_step": self.global_step, "steps_per_epoch": self.steps_per_epoch,
                "epochs": self.args.epochs, "epoch_loss": epoch_loss, "best": self.best,
                "label_names": self.classes, "world_size": self.info.world_size, "args": _args_dict(self.args),
                "history": self.history, "checkpoint": name, "run_id": self.run_id,
            }
            _write_json(self.output / STATE_FILE, state)  # the switch: from here on the run resumes from `name`
            self._publish(checkpoint)
            # the older step folders of this run, as checked before the save (nothing else), but the newest
            # --keep-checkpoints - 1 of them; the names sort by step
            for old in own[:max(len(own) - (self.args.keep_checkpoints - 1), 0)]:
                shutil.rmtree(old, ignore_errors=True)
            self._legacy_checkpoints = False
        _barrier(self.info)

    def _publish(self, checkpoint: Path) -> None:
        """The checkpoint's weights (and EMA weights) as the output folder's model files."""
        for file in (WEIGHTS_FILE, EMA_WEIGHTS_FILE):
            if (checkpoint / file).exists():
                _link(checkpoint / file, self.output / file)

    def config(self) -> ModelConfig:
        return model_config(self.model, self.args.model, self.classes, self.model_kwargs, self.data_cfg,
                            self.frame_sampling if self.data_cfg.is_video else None)

    # -- loop -----------------------------------------------------------------------------------

    def train(self) -> List[Dict[str, Any]]:
        """Train from the start (or the resumed step) to the last epoch, or until a Ctrl-C: then the step
        under way is finished, a checkpoint saved and `self.interrupted` set."""
        args, info = self.args, self.info
        if info.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
            write_config(self.output, self.config())
            print(f'{args.model}: {len(self.classes)} classes, {self.num_train} train / {self.num_val} val '
                  f'{"clips" if self.data_cfg.is_video else "images"}, input {tuple(self.data_cfg.input_size)}, '
                  f'{self.steps_per_epoch} steps/epoch x {args.epochs} epochs, {info.world_size} process(es) '
                  f'on {self.device}{", bf16" if self.amp else ""}', file=sys.stderr)
        with self._save_on_interrupt(), self._sample_errors():
            for epoch in range(self.start_epoch, args.epochs):
                skip_steps = self.start_step if epoch == self.start_epoch else 0
                if skip_steps >= self.steps_per_epoch:
                    continue
                self.train_ds.epoch = epoch
                self.train_sampler.set_epoch(epoch, skip=skip_steps * args.batch_size)
                if skip_steps == 0:
                    self.epoch_loss = [0.0, 0.0]
                started = time.time()
                self.ddp_model.train()
                bar = tqdm(self.train_loader, total=self.steps_per_epoch - skip_steps,
                           desc=f"epoch {epoch}", disable=not self.progress, dynamic_ncols=True, leave=False)
                step = skip_steps
                for x, y in bar:
                    loss = self.train_step(x, y)
                    step += 1
                    if self.progress:
                        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self._lr():.2e}")
                    if step < self.steps_per_epoch:
                        stop = self._stop_agreed()
                        if stop or (args.save_every and self.global_step % args.save_every == 0):
                            self.save(epoch, step)
                        if stop:
                            self.interrupted = True
                            return self.history
                bar.close()
                self.end_epoch(epoch, time.time() - started)
                if epoch + 1 < args.epochs and self._stop_agreed():
                    self.interrupted = True
                    break
        return self.history

    @contextmanager
    def _save_on_interrupt(self) -> Iterator[None]:
        """While training, a first Ctrl-C asks the loop to save and stop after the current step; another
        one (a second or more later) stops at once, as Ctrl-C usually does."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if self._stop_requested and time.monotonic() - self._stop_requested > 1.0:
                raise KeyboardInterrupt
            if not self._stop_requested:
                self._stop_requested = time.monotonic()
                if self.info.is_main:
                    print("\ninterrupted: saving a checkpoint after this step (Ctrl-C again to stop at once)",
                          file=sys.stderr)
        # NOTE: torchrun forwards a Ctrl-C to its workers, which the terminal also signals: the 1 s grace
        # keeps that pair from counting as the second Ctrl-C
        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _stop_agreed(self) -> bool:
        """Whether a Ctrl-C asked to stop, agreed over all processes (so that all save the same step)."""
        if not self.info.enabled:
            return bool(self._stop_requested)
        return all_reduce_sum([float(bool(self._stop_requested))], self.info, self.device)[0] > 0

    @staticmethod
    @contextmanager
    def _sample_errors() -> Iterator[None]:
        """A data file that cannot be read stops the run with one line naming it."""
        try:
            yield
        except SampleError as e:
            # raised in a loader worker, the message holds the worker's traceback; its last line is ours
            message = str(e).strip().splitlines()[-1]
            raise CliError(message.split("SampleError: ", 1)[-1]) from e

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One optimizer update; returns the batch loss."""
        seed_everything(derive_seed(self.args.seed, 3, self.global_step, self.info.rank))
        x, y = flatten_clips(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))
        if self.mixup is not None:
            x, y = _apply_mixup(self.mixup, x, y)
        self.scheduler.step_update(self.global_step)
        with _autocast(self.device, self.amp):
            logits = self.ddp_model(x)
        loss = self.criterion(logits.float(), y)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise CliError(
                f"the training loss is {value} at global step {self.global_step}; stopped before updating the "
                f"weights (the last checkpoint in {self.output} is intact); fix: a lower --lr, --clip-grad 1, "
                "--no-amp, or check the data and the starting weights")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.args.clip_grad:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.args.clip_grad)
        self.optimizer.step()
        self.global_step += 1
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step)
        self.epoch_loss[0] += value * x.shape[0]
        self.epoch_loss[1] += x.shape[0]
        return value

    def _lr(self) -> float:
        return max(g["lr"] for g in self.optimizer.param_groups)

    def validate(self, model: nn.Module, desc: str = "val") -> Dict[str, float]:
        """Loss, top-1 and top-5 (percent) of `model` on the validation data, over all processes."""
        return evaluate(model, self.val_loader, self.device, self.amp, self.info, self.progress, desc)

    def end_epoch(self, epoch: int, seconds: float) -> None:
        loss_sum, count = all_reduce_sum(self.epoch_loss, self.info, self.device)
        row: Dict[str, Any] = {"epoch": epoch, "step": self.global_step, "lr": self._lr(),
                               "train_loss": loss_sum / max(count, 1.0)}
        if self.val_loader is not None:
            row.update({f"val_{k}": v for k, v in self.validate(self.model).items()})
            if self.ema is not None:
                row.update({f"ema_val_{k}": v for k, v in self.validate(self.ema.module, "val (ema)").items()})
        row["epoch_time"] = round(seconds, 3)
        self.history.append(row)
        improved = "val_top1" in row and row["val_top1"] > self.best["top1"]
        if improved:
            self.best = {"top1": row["val_top1"], "epoch": epoch}
        self.epoch_loss = [0.0, 0.0]
        self.save(epoch + 1, 0)
        if self.info.is_main:
            if improved:  # the weights just saved: a link to them, not another copy
                _link(self.output / WEIGHTS_FILE, self.output / BEST_WEIGHTS_FILE)
            _write_metrics(self.output, self.history)
            print(" ".join(_field(k, v) for k, v in row.items()), file=sys.stderr)


def _field(key: str, value: Any) -> str:
    """`key=value` of an epoch's log line: the learning rate in 3 significant digits (9.5e-06, 0.0005), other
    floats with 4 decimals."""
    if key.endswith("lr") and isinstance(value, float):
        return f"{key}={value:.3g}"
    return f"{key}={value:.4f}" if isinstance(value, float) else f"{key}={value}"


def summary(output: Path, history: List[Dict[str, Any]], best: Dict[str, Any]) -> str:
    """The closing lines of a run: where its weights are, and which epoch was best."""
    last = history[-1]["epoch"] if history else None
    lines = [f"weights (last epoch, {last}): {output / WEIGHTS_FILE}"]
    if best.get("epoch", -1) >= 0:
        lines.append(f"best weights (epoch {best['epoch']}, val top-1 {best['top1']:.2f}%): "
                     f"{output / BEST_WEIGHTS_FILE}")
    lines += [f"config and class names: {output / 'config.json'}", f"metrics: {output / 'metrics.csv'}",
              f"use them: mvit-zoo predict FILE --checkpoint {shlex.quote(str(output))} (the last epoch's weights; "
              f"--checkpoint {shlex.quote(str(output / BEST_WEIGHTS_FILE))} for the best)"]
    return "\n".join(lines)


def read_state(folder: Path) -> Dict[str, Any]:
    """The training state of the run saved in `folder` (its `train_state.json`)."""
    path = folder / STATE_FILE
    if not path.is_file():
        raise CliError(f"nothing to resume: {path} does not exist; give the --output folder of a run, "
                       "or drop --resume to start a new one")
    try:
        state = json.loads(path.read_text())
    except ValueError as e:
        state = {"error": str(e)}
    if not isinstance(state, dict) or "checkpoint" not in state:
        raise CliError(f"{path} is damaged or not a training state; start a new run "
                       f"(e.g. from its published weights: {_start_from(folder)})")
    return state


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------

def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the `finetune` options to `parser`."""
    parser.description = __doc__.split("\n\n")[0]
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="model name, optionally with a pretrained tag: NAME[.tag] (required but with --resume)")
    g.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                   help="start from the pretrained weights of NAME[.tag] (default: yes)")
    g.add_argument("--pretrained-file", default=None, metavar="FILE",
                   help="start from the weights in this local file instead (safetensors or torch checkpoint)")
    g.add_argument("--model-kwargs", default=None, metavar="JSON",
                   help='architecture overrides, e.g. \'{"depths": [1,1,1,1], "embed_dim": 32}\'')
    g.add_argument("--img-size", type=int, default=None, metavar="SIZE",
                   help="input height and width (square) for model and data (default: the model's)")
    g.add_argument("--num-frames", type=int, default=None, metavar="T",
                   help="video models: frames per clip for model and data (default: the model's)")
    g.add_argument("--drop-path", type=float, default=None, help="stochastic depth rate (default: the model's)")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations to save memory")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                        help="SlowFast's MViTv2-S training recipe (k400: Kinetics, ssv2: Something-Something v2) as "
                             "the defaults of the options below, learning rates scaled to the global batch; options "
                             "given explicitly override it; what it sets is printed (not applied with --resume)")
    d = parser.add_argument_group("data")
    d.add_argument("--data", default=None, metavar="FILE|DIR",
                   help="class folders DIR/<class>/<file> (or DIR/train/ and DIR/val/ trees of them), one annotation "
                        "file (path-label list, Kinetics CSV, SSv2 JSON), or a dataset folder with its train and val "
                        "annotation files as distributed (required but with --resume)")
    d.add_argument("--data-root", default=None, metavar="DIR",
                   help="the folder the listed video paths are relative to (default: the annotation file's folder)")
    d.add_argument("--data-format", choices=FORMATS, default=None,
                   help="the layout of --data (default: detected from the files)")
    d.add_argument("--val-data", default=None, metavar="FILE|DIR",
                   help="validation data: an annotation file or class folders (default: the dataset's own val split)")
    d.add_argument("--val-split", type=float, default=0.1,
                   help="fraction of each class held out for validation when the data has no val split "
                        "(default: %(default)s)")
    d.add_argument("--workers", type=int, default=0, help="data-loading processes (default: %(default)s)")
    d.add_argument("--sampling-rate", type=int, default=None, metavar="TAU",
                   help="video: stride between the T sampled frames (default: the model's pretrained config)")
    d.add_argument("--frame-sampling", choices=("stride", "segment"), default=None,
                   help="video: T frames TAU apart at a random start (stride, Kinetics) or one random frame in each "
                        "of T segments (segment, SSv2) (default: the model's pretrained config, else stride)")
    d.add_argument("--target-fps", type=float, default=SLOWFAST_TARGET_FPS, metavar="FPS",
                   help="video: TAU counts frames at this rate, whatever the file's (default: %(default)g)")
    d.add_argument("--clips-per-video", type=int, default=1, metavar="N",
                   help="video: SlowFast's repeated augmentation: each video is decoded once and augmented N times; "
                        "--batch-size counts videos, so each step trains on batch x N clips (default: %(default)s)")
    d.add_argument("--decoder", choices=("auto", *BACKENDS), default="auto",
                   help="video decoding library (default: auto, torchcodec if it works here, else pyav)")
    d.add_argument("--crop-mode", choices=("resized", "jitter"), default="resized",
                   help="video: random resized crop (--scale) or short-side jitter (--jitter-scales) + random crop "
                        "(default: %(default)s)")
    d.add_argument("--jitter-scales", type=int, nargs=2, default=(256, 320), metavar=("MIN", "MAX"),
                   help="video: short-side range of --crop-mode jitter; frames are decoded at short side MIN "
                        "(default: 256 320)")
    d.add_argument("--inverse-uniform", action=argparse.BooleanOptionalAction, default=False,
                   help="video: draw the jitter short side uniformly in 1/size (default: no)")
    d.add_argument("--channel-order", choices=("RGB", "BGR"), default=None,
                   help="video: channel order of the model's input (default: the model's pretrained config)")
    d.add_argument("--scale", type=float, nargs=2, default=(0.08, 1.0), metavar=("MIN", "MAX"),
                   help="random-resized-crop area range (default: 0.08 1.0)")
    d.add_argument("--hflip", type=float, default=0.5,
                   help="horizontal flip probability (the whole clip for video) (default: %(default)s)")
    d.add_argument("--color-jitter", type=float, default=0.4, help="images: colour jitter (default: %(default)s)")
    d.add_argument("--aa", default=None,
                   help="auto-augment policy, e.g. 'rand-m7-n4-mstd0.5-inc1'; images: any of timm's, video: "
                        "RandAugment, the same ops on every frame (default: none)")
    d.add_argument("--aa-interpolation", choices=("bilinear", "bicubic"), default="bicubic",
                   help="video: interpolation of RandAugment's geometric ops (default: %(default)s)")
    d.add_argument("--reprob", type=float, default=0.0,
                   help="random erasing probability (video: one box for the whole clip) (default: 0)")
    d.add_argument("--re-mode", choices=("pixel", "rand", "const"), default="pixel",
                   help="video: random erasing fill, per-pixel noise, a random colour or the mean "
                        "(default: %(default)s)")
    d.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (default: 0, off)")
    d.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (default: 0, off)")
    d.add_argument("--mixup-prob", type=float, default=1.0, help="probability of mixing a batch (default: 1)")
    o = parser.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=10, help="(default: %(default)s)")
    o.add_argument("--batch-size", type=int, default=32,
                   help="images or videos per process and step (default: %(default)s)")
    o.add_argument("--eval-batch-size", type=int, default=None, help="per process (default: --batch-size)")
    o.add_argument("--opt", choices=("adamw", "sgd"), default="adamw",
                   help="optimizer; sgd is SlowFast's, with --momentum and Nesterov (default: %(default)s)")
    o.add_argument("--momentum", type=float, default=0.9, help="--opt sgd: momentum (default: %(default)s)")
    o.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (default: %(default)s)")
    o.add_argument("--min-lr", type=float, default=1e-6, help="learning rate at the end (default: %(default)s)")
    o.add_argument("--warmup-epochs", type=float, default=1.0,
                   help="linear warm-up, may be fractional (default: %(default)s)")
    o.add_argument("--warmup-lr", type=float, default=1e-6, help="warm-up start (default: %(default)s)")
    o.add_argument("--weight-decay", type=float, default=0.05,
                   help="weight decay, not applied to norms, biases and position tables (default: %(default)s)")
    o.add_argument("--layer-decay", type=float, default=None,
                   help="layer-wise learning-rate decay; 1 turns it off (default: 0.75 from pretrained weights, "
                        "else 1)")
    o.add_argument("--smoothing", type=float, default=0.1, help="label smoothing (default: %(default)s)")
    o.add_argument("--clip-grad", type=float, default=None, metavar="NORM", help="gradient norm clipping")
    o.add_argument("--ema", action="store_true", help="also keep (and validate) an EMA of the weights")
    o.add_argument("--ema-decay", type=float, default=0.9998, help="(default: %(default)s)")
    o.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on with CUDA, off on CPU)")
    o.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    r = parser.add_argument_group("run")
    r.add_argument("--output", default=None, metavar="DIR",
                   help="where model.safetensors, config.json, metrics and the training state go "
                        "(required but with --resume)")
    r.add_argument("--resume", nargs="?", const="", default=None, metavar="DIR",
                   help="continue the run saved in DIR (default: --output) exactly where it stopped; options "
                        "not given take the run's values, so `--resume DIR` alone is enough")
    r.add_argument("--save-every", type=int, default=0, metavar="STEPS",
                   help="also save the training state every STEPS steps within epochs (default: epoch ends only)")
    r.add_argument("--keep-checkpoints", type=int, default=1, metavar="N",
                   help="resumable checkpoints (weights + optimizer state, about 3x the weights each) kept under "
                        "DIR/checkpoints/; older ones of this run are removed (default: %(default)s, the latest)")
    r.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: CUDA if available)")
    r.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="tqdm progress bars (default: yes)")
    add_threads_argument(r)


def _defaults() -> Dict[str, Any]:
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    return vars(parser.parse_args([]))


# (low, high or None, (low included, high included)) of the numeric options, and what the range means
_RANGES: Dict[str, Tuple[float, Optional[float], Tuple[bool, bool]]] = {
    "val_split": (0.0, 1.0, (True, False)),
    "hflip": (0.0, 1.0, (True, True)),
    "color_jitter": (0.0, None, (True, False)),
    "reprob": (0.0, 1.0, (True, True)),
    "mixup": (0.0, None, (True, False)),
    "cutmix": (0.0, None, (True, False)),
    "mixup_prob": (0.0, 1.0, (True, True)),
    "lr": (0.0, None, (False, False)),
    "min_lr": (0.0, None, (True, False)),
    "warmup_epochs": (0.0, None, (True, False)),
    "warmup_lr": (0.0, None, (True, False)),
    "weight_decay": (0.0, None, (True, False)),
    "layer_decay": (0.0, 1.0, (False, True)),
    "smoothing": (0.0, 1.0, (True, False)),
    "clip_grad": (0.0, None, (False, False)),
    "ema_decay": (0.0, 1.0, (True, False)),
    "drop_path": (0.0, 1.0, (True, False)),
    "target_fps": (0.0, None, (False, False)),
    "momentum": (0.0, 1.0, (True, False)),
}
_RANGE_NOTES = {
    "val_split": "the fraction of each class held out; 0 for none",
    "hflip": "a probability", "color_jitter": "a jitter strength", "reprob": "a probability",
    "mixup": "a Beta alpha; 0 turns it off", "cutmix": "a Beta alpha; 0 turns it off", "mixup_prob": "a probability",
    "lr": "a learning rate", "min_lr": "a learning rate", "warmup_epochs": "epochs; 0 for no warm-up",
    "warmup_lr": "a learning rate", "weight_decay": "a decay factor",
    "layer_decay": "the factor per layer; 1 turns it off", "smoothing": "the probability mass spread over the classes",
    "clip_grad": "a gradient norm; leave it out for no clipping",
    "ema_decay": "the weight of the old average per step, e.g. 0.9998",
    "drop_path": "the stochastic depth rate of the last block",
    "target_fps": "frames per second", "momentum": "the SGD momentum, e.g. 0.9",
}


def _check_args(args: argparse.Namespace) -> None:
    missing = [f"--{name}" for name in _RUN_ARGS if getattr(args, name) is None]
    if missing:
        raise CliError(f'{", ".join(missing)} required (or --resume DIR to continue a run)')
    for name in ("epochs", "batch_size", "eval_batch_size", "img_size", "num_frames", "save_every",
                 "keep_checkpoints", "sampling_rate", "clips_per_video"):
        value = getattr(args, name)
        if value is not None and (value < 1 if name != "save_every" else value < 0):
            flag = "--" + name.replace("_", "-")
            raise CliError(f'{flag} {value}: must be {"at least 1" if name != "save_every" else "0 or more"}')
    for name, (low, high, closed) in _RANGES.items():
        value = getattr(args, name)
        if value is None:
            continue
        above = value >= low if closed[0] else value > low
        below = high is None or (value <= high if closed[1] else value < high)
        if not (math.isfinite(value) and above and below):
            interval = (f'{"[" if closed[0] else "("}{low:g}, {"inf)" if high is None else f"{high:g}"}'
                        f'{"" if high is None else "]" if closed[1] else ")"}')
            raise CliError(f'--{name.replace("_", "-")} {value:g}: must be in {interval} ({_RANGE_NOTES[name]})')
    scale_min, scale_max = args.scale
    if not 0 < scale_min <= scale_max <= 1:
        raise CliError(f"--scale {scale_min:g} {scale_max:g}: give MIN MAX with 0 < MIN <= MAX <= 1 (fractions of the "
                       "image area)")
    low, high = args.jitter_scales
    if not 1 <= low <= high:
        raise CliError(f"--jitter-scales {low} {high}: give MIN MAX with 1 <= MIN <= MAX (short sides in pixels)")
    if args.recipe is not None and args.resume is None and not getattr(args, _RECIPE_APPLIED, False):
        raise CliError(f"--recipe {args.recipe} was not applied: it is read before the other options, so give it in "
                       f"full (--recipe {args.recipe}) to `mvit-zoo finetune`")


def _restore_run_args(args: argparse.Namespace) -> None:
    """`--resume`: options not given (left at their defaults) take the values of the run being resumed;
    the output folder defaults to the run's folder."""
    if not (args.resume or args.output):
        raise CliError("--resume needs the folder of the run: --resume DIR")
    folder = Path(args.resume or args.output)
    state = read_state(folder)
    defaults = _defaults()
    for key, value in state.get("args", {}).items():
        if key not in defaults or key in ("resume", "output"):
            continue
        current = getattr(args, key, None)
        if ((key in _RUN_ARGS or key in _DATA_ARGS) and current is None) or (
                key not in _RUNTIME_ARGS and _normalised(current) == _normalised(defaults[key])):
            setattr(args, key, value)
    if args.output is None:
        args.output = str(folder)
    args.resume = str(folder)


def run(args: argparse.Namespace) -> int:
    """Fine-tune as described by parsed `args`; returns the exit status (130 after a Ctrl-C)."""
    if args.resume is not None:
        _restore_run_args(args)
    _check_args(args)
    apply_threads(args.threads, args.workers)
    for name in _DATA_ARGS:  # saved with the run, for `--resume DIR` from anywhere
        if getattr(args, name) is not None:
            setattr(args, name, str(Path(getattr(args, name)).absolute()))
    trainer = Trainer(args)
    try:
        with _output_lock(trainer.output, trainer.info):
            trainer.setup()
            if trainer.finished:
                if trainer.info.is_main:
                    print(f"the run in {args.resume} is finished ({trainer.start_epoch} of {args.epochs} epochs, "
                          f"global step {trainer.global_step}): nothing to resume. To train further, start a new run "
                          f"from its weights: {_start_from(Path(args.resume))}", file=sys.stderr)
                return 0
            trainer.train()
    finally:
        if trainer.info.enabled and dist.is_initialized():
            dist.destroy_process_group()
    if trainer.interrupted:
        if trainer.info.is_main:
            launcher = (f"torchrun --nproc_per_node={trainer.info.world_size} -m mvit_zoo"
                        if trainer.info.enabled else "mvit-zoo")
            print(f"saved a checkpoint at global step {trainer.global_step} in {trainer.output}; resume with:\n"
                  f"  {launcher} finetune --resume {shlex.quote(str(trainer.output))}", file=sys.stderr)
        return 130
    if trainer.info.is_main:
        print(summary(trainer.output, trainer.history, trainer.best))
    return 0


@contextmanager
def _output_lock(output: Path, info: DistInfo) -> Iterator[None]:
    """Hold `output/LOCK_FILE` for the whole run (the main process): a second run writing to the same folder
    is refused, naming the process that holds it, instead of the two overwriting each other's checkpoints."""
    if not info.is_main:
        yield
        return
    from filelock import FileLock, Timeout

    created = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    path, pid_file = output / LOCK_FILE, output / f"{LOCK_FILE}.pid"
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        pid = pid_file.read_text().strip() if pid_file.is_file() else "unknown"
        raise CliError(f"another run is writing to {output} (pid {pid}); wait for it to end, or give this one "
                       "another --output") from None
    try:
        pid_file.write_text(f"{os.getpid()}\n")
        yield
    finally:
        # NOTE: the lock file goes with the run, so a folder holds only the run's files; a run that opened it
        # in the instant before this unlink locks a removed file: two runs started within microseconds of
        # this one's end are not told apart
        pid_file.unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        lock.release()
        if created and not any(output.iterdir()):  # a run that failed before writing leaves no folder behind
            output.rmdir()


def _flag_text(dest: str, value: Any) -> str:
    """`--option value` as it would be typed (`--scale 0.08 1`, `--inverse-uniform`, `--no-inverse-uniform`)."""
    flag = "--" + dest.replace("_", "-")
    if value is None:
        return f"{flag} off"
    if isinstance(value, bool):
        return flag if value else f"--no-{flag[2:]}"
    values = value if isinstance(value, tuple) else (value,)
    return " ".join([flag, *(f"{v:g}" if isinstance(v, float) else str(v) for v in values)])


def prepare_parser(parser: argparse.ArgumentParser, argv: Sequence[str]) -> Dict[str, Any]:
    """Before `parser` (configured by :func:`configure_parser`) reads `argv`: make the options of its `--recipe`
    their defaults, so that options given explicitly override them, and print (stderr, main process) what it
    set. Learning rates are scaled to the global batch (`--batch-size` x the torchrun processes). Nothing is
    applied with `--resume`: a resumed run keeps its own arguments. Returns `{dest: value}` of what was set."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--recipe", default=None)
    pre.add_argument("--batch-size", default=None)
    pre.add_argument("--resume", nargs="?", const="", default=None)
    known, _ = pre.parse_known_args(list(argv))
    if known.recipe not in RECIPES or known.resume is not None:
        return {}  # an unknown name is refused by the parser itself
    try:
        batch = int(known.batch_size) if known.batch_size is not None else parser.get_default("batch_size")
    except ValueError:
        return {}  # the parser refuses the value
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    chosen = apply_recipe(parser, known.recipe, batch * world_size)
    parser.set_defaults(**{_RECIPE_APPLIED: True})
    if int(os.environ.get("RANK", "0")) == 0:
        recipe = get_recipe(known.recipe)
        flags = " ".join(_flag_text(dest, value) for dest, value in chosen.items())
        print(f"--recipe {recipe.name} (SlowFast {recipe.config}; learning rates for a global batch of "
              f"{batch * world_size} videos) sets, unless given explicitly:\n  {flags}", file=sys.stderr)
    return chosen


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="mvit-zoo finetune")
    configure_parser(parser)
    prepare_parser(parser, argv)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
