"""The folder of a `mvit-zoo finetune` run: its checkpoints, training state, published weights, metrics and lock.

The resumable state of step N lives in its own folder, `checkpoints/step-N-<id>/` (weights, EMA weights,
optimizer/scheduler/RNG state), written in full before `train_state.json` (the manifest, replaced atomically)
names it. A run removes only the step folders it wrote (each holds `RUN_MARKER` with the run's id) and refuses a
`checkpoints/` that is a link or holds anything else. One run at a time writes to a folder: it holds `LOCK_FILE`.
"""
from __future__ import annotations

import csv
import json
import os
import random
import re
import shlex
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..data.config import ModelConfig, config_for_model
from ..data.transforms import DataConfig
from ..files import atomic_write
from ..weights.hub import UnsafeCheckpointError, read_weights
from .cli import CliError

__all__ = [
    "BEST_WEIGHTS_FILE", "CHECKPOINTS_DIR", "EMA_WEIGHTS_FILE", "LOCK_FILE", "OPTIMIZER_FILE", "RUN_MARKER",
    "STATE_FILE", "WEIGHTS_FILE", "check_checkpoints_folder", "model_config", "output_lock", "read_state",
    "save_training_state", "save_weights", "start_from", "summary",
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
# Held by the run writing to an output folder (its pid in LOCK_FILE + ".pid"): a second run there is refused
LOCK_FILE = ".mvit-zoo.lock"


def _write_json(path: Path, value: Any) -> None:
    def write(p: Path) -> None:
        p.write_text(json.dumps(value, indent=2) + "\n")
    atomic_write(path, write)


def save_weights(path: Path, model: nn.Module, global_step: int) -> None:
    """`model`'s state dict as safetensors, tagged with the step it was saved at."""
    from safetensors.torch import save_file
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda p: save_file(state, str(p), metadata={"format": "pt", "global_step": str(global_step)}))


def save_training_state(path: Path, state: Dict[str, Any]) -> None:
    """The optimizer, scheduler and RNG state of a checkpoint (`torch.save`; read back by
    :func:`mvit_zoo.weights.hub.read_training_state`, which refuses code-running pickles)."""
    atomic_write(path, lambda p: torch.save(state, p))


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
            f"{start_from(run)})") from e


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
                       f"(e.g. from its published weights: {start_from(folder)})")
    return state

def start_from(run: Path) -> str:
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



@contextmanager
def output_lock(output: Path, is_main: bool = True) -> Iterator[None]:
    """Hold `output/LOCK_FILE` for the whole run (the main process): a second run writing to the same folder
    is refused, naming the process that holds it, instead of the two overwriting each other's checkpoints."""
    if not is_main:
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


