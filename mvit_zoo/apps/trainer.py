"""The training loop of `mvit-zoo finetune` (:mod:`mvit_zoo.apps.finetune` parses and checks its options and
documents the recipe): data, model, optimizer and schedule, data-parallel under `torchrun`, checkpoints into the
run's folder (:mod:`mvit_zoo.apps.run_folder`) and an exact resume from them.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import sys
import threading
import time
import uuid
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3

from ..data.config import ModelConfig, write_config
from ..data.folders import (
    IMAGE_EXTENSIONS, EpochSeeded, SampleError, Samples, ShardSampler, derive_seed, seed_everything,
)
from ..data.pipeline import Augmentation, build_datasets, flatten_clips
from ..data.reader import resolve_backend
from ..data.sources import DatasetSplit, find_splits
from ..data.transforms import resolve_data_config
from ..data.video import VIDEO_EXTENSIONS
from ..evaluation import evaluate as evaluate_model, view_sampling
from ..weights.hub import read_training_state
from .cli import CliError
from .finetune import _args_dict, _check_resume_args
from .models import create_finetune_model, resolve_model_kwargs
from .run_folder import (
    BEST_WEIGHTS_FILE, CHECKPOINTS_DIR, EMA_WEIGHTS_FILE, OPTIMIZER_FILE, RUN_MARKER, STATE_FILE, WEIGHTS_FILE,
    _link, _load_checkpoint_file, _load_weights, _rng_state, _set_rng_state, _write_json, _write_metrics,
    check_checkpoints_folder, model_config, read_state, save_training_state, save_weights,
)

__all__ = ["DistInfo", "Trainer", "all_reduce_sum", "evaluate", "init_distributed"]


def _ignore_sigint(worker_id: int) -> None:
    """Data-loader workers leave Ctrl-C to the main process, which saves a checkpoint and stops them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _loader(dataset: Dataset, sampler: ShardSampler, batch_size: int, workers: int,
            drop_last: bool, pin_memory: bool) -> DataLoader:
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
        pin_memory=pin_memory, persistent_workers=False, worker_init_fn=_ignore_sigint if workers else None,
    )


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
            save_training_state(checkpoint / OPTIMIZER_FILE, extra)
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

