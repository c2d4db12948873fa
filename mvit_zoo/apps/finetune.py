"""Fine-tune an MViT model (or any timm classifier) on a folder of images or videos.

Usage::

    mvit-zoo finetune --model mvit_small.fb_in1k --data DIR --epochs 30 --output runs/flowers
    torchrun --nproc_per_node=4 -m mvit_zoo finetune --model mvit_v2_s_16x4.fb_k400 --data clips/ ...

``DIR`` holds one folder per class (``DIR/<class>/<file>``), or ``train/`` and ``val/``
trees of class folders. Image models read images; video models (``model.is_video``) read
video files decoded with PyAV and sample ``T`` frames every ``tau`` frames as in the
model's pretrained config.

The recipe is the standard transfer one: AdamW, warm-up then cosine decay per step,
layer-wise learning-rate decay from ``group_matcher``, no weight decay on norms, biases and
position tables, label smoothing, optional mixup/cutmix and EMA, bf16 autocast, and a new
head sized to the class folders. The output folder holds ``model.safetensors`` and a
timm-style ``config.json`` (with ``label_names``), per-epoch metrics (CSV and JSON), and the
training state that ``--resume`` continues from exactly.

Determinism: augmentation is seeded per (seed, epoch, sample) and everything else per
(seed, step, rank), so a run gives the same numbers whatever the number of data workers,
and a resumed run gives the same numbers as an uninterrupted one.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3

from ..data.config import CONFIG_FILE  # noqa: F401 - the name callers import from here
from ..data.config import ModelConfig, config_for_model, write_config
from ..data.video import VIDEO_EXTENSIONS, ClipTransform, VideoFolder

__all__ = [
    'DataConfig',
    'resolve_data_config',
    'build_transform',
    'parse_model_kwargs',
    'configure_parser',
    'run',
    'main',
]

IMAGE_EXTENSIONS: Tuple[str, ...] = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')
STATE_FILE = 'train_state.json'
OPTIMIZER_FILE = 'optimizer.pt'
WEIGHTS_FILE = 'model.safetensors'
EMA_WEIGHTS_FILE = 'model_ema.safetensors'
BEST_WEIGHTS_FILE = 'model_best.safetensors'
# Arguments that describe the run rather than the result; they may change on --resume
_RUNTIME_ARGS = frozenset({'resume', 'output', 'workers', 'progress', 'device', 'save_every', 'data'})


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DataConfig:
    """Preprocessing a model expects: ``input_size`` is ``(C, H, W)`` or ``(C, T, H, W)``."""

    input_size: Tuple[int, ...]
    mean: Tuple[float, ...] = IMAGENET_DEFAULT_MEAN
    std: Tuple[float, ...] = IMAGENET_DEFAULT_STD
    crop_pct: float = 0.875
    interpolation: str = 'bicubic'
    sampling_rate: int = 1
    channel_order: str = 'RGB'

    @property
    def is_video(self) -> bool:
        return len(self.input_size) == 4

    @property
    def num_frames(self) -> int:
        return self.input_size[1] if self.is_video else 1

    def to_dict(self) -> Dict[str, Any]:
        """pretrained_cfg-style keys: ``input_size`` is ``(C, H, W)``, with ``num_frames`` etc. for video."""
        d: Dict[str, Any] = dict(
            input_size=[self.input_size[0], *self.input_size[-2:]], mean=list(self.mean), std=list(self.std),
            crop_pct=self.crop_pct, interpolation=self.interpolation,
        )
        if self.is_video:
            d.update(num_frames=self.num_frames, sampling_rate=self.sampling_rate, channel_order=self.channel_order)
        return d


def resolve_data_config(model: nn.Module, sampling_rate: Optional[int] = None) -> DataConfig:
    """Input size from the model as built (``model.img_size``), statistics from its pretrained_cfg."""
    cfg = dict(getattr(model, 'pretrained_cfg', None) or {})
    default_size = tuple(cfg.get('input_size', (3, 224, 224)))
    img_size = getattr(model, 'img_size', None)
    if img_size is None:
        img_size = default_size[1:]
    elif isinstance(img_size, int):
        img_size = (img_size, img_size)
    in_chans = int(getattr(model, 'in_chans', default_size[0]))
    return DataConfig(
        input_size=(in_chans, *(int(s) for s in img_size)),
        mean=tuple(float(m) for m in cfg.get('mean', IMAGENET_DEFAULT_MEAN)),
        std=tuple(float(s) for s in cfg.get('std', IMAGENET_DEFAULT_STD)),
        crop_pct=float(cfg.get('crop_pct', 0.875) or 0.875),
        interpolation=str(cfg.get('interpolation', 'bicubic') or 'bicubic'),
        sampling_rate=int(sampling_rate or cfg.get('sampling_rate', 1) or 1),
        channel_order=str(cfg.get('channel_order', 'RGB') or 'RGB'),
    )


def build_transform(
        data_cfg: DataConfig,
        is_training: bool,
        scale: Tuple[float, float] = (0.08, 1.0),
        hflip: float = 0.5,
        color_jitter: float = 0.4,
        auto_augment: Optional[str] = None,
        re_prob: float = 0.0,
) -> Callable:
    """timm's image transforms, or :class:`~mvit_zoo.data.video.ClipTransform` for video models."""
    if data_cfg.is_video:
        return ClipTransform(
            data_cfg.input_size, is_training, data_cfg.mean, data_cfg.std, crop_pct=data_cfg.crop_pct,
            interpolation=data_cfg.interpolation, scale=scale, hflip=hflip, channel_order=data_cfg.channel_order,
        )
    if is_training:
        return create_transform(
            data_cfg.input_size, is_training=True, scale=scale, hflip=hflip, color_jitter=color_jitter,
            auto_augment=auto_augment, re_prob=re_prob, interpolation=data_cfg.interpolation,
            mean=data_cfg.mean, std=data_cfg.std,
        )
    return create_transform(
        data_cfg.input_size, is_training=False, interpolation=data_cfg.interpolation,
        mean=data_cfg.mean, std=data_cfg.std, crop_pct=data_cfg.crop_pct,
    )


Samples = List[Tuple[str, int]]


def scan_data(root: Path, extensions: Tuple[str, ...], val_split: float, seed: int) -> Tuple[List[str], Samples, Samples]:
    """Classes and (train, val) samples of a class-folder tree.

    ``root/train`` and ``root/val`` (or ``validation``) are used when present; otherwise the
    classes are ``root``'s folders and a stratified ``val_split`` fraction of each class is
    held out, chosen by ``seed``.
    """
    from torchvision.datasets.folder import find_classes, make_dataset

    train_root = root / 'train' if (root / 'train').is_dir() else root
    classes, class_to_idx = find_classes(str(train_root))
    train = make_dataset(str(train_root), class_to_idx, extensions=extensions)
    if train_root != root:
        for name in ('val', 'validation'):
            if (root / name).is_dir():
                val = make_dataset(str(root / name), class_to_idx, extensions=extensions, allow_empty=True)
                return classes, train, val
    if val_split <= 0:
        return classes, train, []
    rng = random.Random(seed)
    kept: Samples = []
    held: Samples = []
    for idx in range(len(classes)):
        items = [s for s in train if s[1] == idx]
        rng.shuffle(items)
        n_val = min(int(round(len(items) * val_split)), len(items) - 1)
        held.extend(items[:n_val])
        kept.extend(items[n_val:])
    return classes, sorted(kept), sorted(held)


class ImageSamples(Dataset):
    """``(path, target)`` samples read with PIL as RGB and transformed."""

    def __init__(self, samples: Samples, transform: Optional[Callable] = None) -> None:
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        from PIL import Image
        path, target = self.samples[index]
        with open(path, 'rb') as f:
            img = Image.open(f).convert('RGB')
        return (self.transform(img) if self.transform is not None else img), target


def _derive_seed(*values: int) -> int:
    return int(np.random.SeedSequence([int(v) & 0xFFFFFFFF for v in values]).generate_state(1)[0])


def seed_everything(seed: int, accelerators: bool = True) -> None:
    """Seed Python's, NumPy's and torch's global generators (CPU only if not ``accelerators``)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    if accelerators:
        torch.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)  # much cheaper, for per-sample use


class EpochSeeded(Dataset):
    """Seeds the global generators from (seed, epoch, index) before loading each sample.

    Augmentation then depends only on the sample and epoch, not on the data-loader workers,
    the process rank or where an interrupted run was resumed.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        seed_everything(_derive_seed(self.seed, 1, self.epoch, index), accelerators=False)
        return self.dataset[index]


class ShardSampler(Sampler[int]):
    """Per-epoch shuffled indices, split across processes like ``DistributedSampler``.

    ``pad`` repeats samples so that every rank gets the same count (training);
    ``set_epoch(epoch, skip)`` reshuffles and skips the first ``skip`` indices of this rank
    (resuming within an epoch). With one process the global batches are the same sets as
    those of N processes with 1/N of the batch size.
    """

    def __init__(self, size: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = False,
                 seed: int = 0, pad: bool = False) -> None:
        self.size = size
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.pad = pad
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch = epoch
        self.skip = skip

    def shard(self) -> List[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(_derive_seed(self.seed, 2, self.epoch))
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        if self.pad and self.size % self.num_replicas:
            total = math.ceil(self.size / self.num_replicas) * self.num_replicas
            order += (order * math.ceil(total / max(self.size, 1)))[:total - self.size]
        return order[self.rank::self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.shard()[self.skip:])

    def __len__(self) -> int:
        return max(len(self.shard()) - self.skip, 0)


def _loader(dataset: Dataset, sampler: ShardSampler, batch_size: int, workers: int,
                           drop_last: bool, pin_memory: bool) -> DataLoader:
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
        drop_last=drop_last, pin_memory=pin_memory, persistent_workers=False,
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
    """``--model-kwargs`` JSON object -> keyword arguments (JSON lists become tuples)."""
    if not text:
        return {}
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f'--model-kwargs must be a JSON object, got {text!r}')
    return _tuples(value)


def is_video_model(model: nn.Module) -> bool:
    """True for models that take clips ``(B, C, T, H, W)``."""
    if hasattr(model, 'is_video'):
        return bool(model.is_video)
    img_size = getattr(model, 'img_size', None)
    if isinstance(img_size, (tuple, list)):
        return len(img_size) == 3
    return len((getattr(model, 'pretrained_cfg', None) or {}).get('input_size', (3, 224, 224))) == 4


def create_finetune_model(
        name: str,
        num_classes: int,
        pretrained: bool,
        model_kwargs: Dict[str, Any],
        pretrained_file: Optional[str] = None,
        drop_path_rate: Optional[float] = None,
) -> nn.Module:
    """The model with pretrained weights (if asked) and a ``num_classes`` head.

    The head of a pretrained tag is always new (freshly initialised). The head of a
    ``pretrained_file`` is kept when its class count matches (continuing a fine-tune),
    otherwise left out for a new one.
    """
    kwargs = dict(model_kwargs, num_classes=num_classes)
    if drop_path_rate is not None:
        kwargs['drop_path_rate'] = drop_path_rate
    if pretrained_file:
        # an unknown class count: the loader keeps a fitting classifier and leaves out another
        kwargs['pretrained_cfg_overlay'] = dict(file=str(pretrained_file), num_classes=None)
        return timm.create_model(name, pretrained=True, **kwargs)
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    if pretrained and model.pretrained_cfg.get('num_classes') == num_classes:
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
    """Join the ``torchrun`` process group if launched by it (nccl on GPU, gloo on CPU)."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    info = DistInfo(int(os.environ.get('RANK', '0')), world_size, int(os.environ.get('LOCAL_RANK', '0')))
    if device_arg == 'auto':
        device_arg = 'cuda' if torch.cuda.is_available() else 'cpu'
    device = torch.device(device_arg)
    if device.type == 'cuda' and device.index is None:
        device = torch.device('cuda', info.local_rank if info.enabled else torch.cuda.current_device())
    if device.type == 'cuda':
        torch.cuda.set_device(device)
    if info.enabled and not dist.is_initialized():
        dist.init_process_group(backend='nccl' if device.type == 'cuda' else 'gloo')
    return info, device


def all_reduce_sum(values: Sequence[float], info: DistInfo, device: torch.device) -> List[float]:
    """Sum of ``values`` over all processes (float64)."""
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

def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(path.name + '.tmp')
    write(tmp)
    os.replace(tmp, path)


def _write_json(path: Path, value: Any) -> None:
    def write(p: Path) -> None:
        p.write_text(json.dumps(value, indent=2) + '\n')
    _atomic_write(path, write)


def save_weights(path: Path, model: nn.Module, global_step: int) -> None:
    """``model``'s state dict as safetensors, tagged with the step it was saved at."""
    from safetensors.torch import save_file
    state = {k: v.detach().to('cpu').contiguous() for k, v in model.state_dict().items()}
    _atomic_write(path, lambda p: save_file(state, str(p), metadata={'format': 'pt', 'global_step': str(global_step)}))


def load_weights(path: Path, model: nn.Module) -> int:
    """Load safetensors weights into ``model``; returns the step they were saved at (-1 if unknown)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(str(path), framework='pt') as f:
        step = int((f.metadata() or {}).get('global_step', -1))
    model.load_state_dict(load_file(str(path)))
    return step


def _rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    state: Dict[str, Any] = {
        'python': random.getstate(),
        'numpy': {'keys': torch.from_numpy(np_state[1].astype(np.int64)), 'pos': int(np_state[2]),
                  'has_gauss': int(np_state[3]), 'cached_gaussian': float(np_state[4])},
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    n = state['numpy']
    np.random.set_state(('MT19937', n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'], n['cached_gaussian']))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


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
) -> ModelConfig:
    """The ``config.json`` of the fine-tuned weights (schema: :mod:`mvit_zoo.data.config`).

    ``timm.create_model('local-dir:<folder>', pretrained=True)`` rebuilds the model from it;
    ``label_names`` are the class folder names. The preprocessing is the run's; the frame sampling
    (an SSv2 model's 'segment') is the pretrained config's.
    """
    source = dict(getattr(model, 'pretrained_cfg', None) or {})
    data = data_cfg.to_dict()
    video = {k: data[k] for k in ('num_frames', 'sampling_rate', 'channel_order') if k in data}
    if data_cfg.is_video:
        video['frame_sampling'] = source.get('frame_sampling')
    model_args = {k: v for k, v in model_kwargs.items() if k not in ('drop_path_rate', 'drop_rate')}
    model_args['num_classes'] = len(label_names)
    return config_for_model(
        model, model_args=model_args, label_names=label_names, data_config=video,
        pretrained_cfg={**source, **{k: data[k] for k in ('mean', 'std', 'crop_pct', 'interpolation')}},
        source={'tag': name if '.' in name else None, 'description': f'fine-tuned from {name} with mvit-zoo finetune'},
    )


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------

def accuracy_counts(logits: torch.Tensor, target: torch.Tensor) -> Tuple[float, float]:
    """Number of top-1 and top-5 hits (top-k capped at the class count)."""
    k = min(5, logits.shape[-1])
    topk = logits.topk(k, dim=-1).indices
    hits = topk.eq(target[:, None])
    return float(hits[:, :1].sum()), float(hits.sum())


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, amp: bool, info: DistInfo,
             progress: bool = False, desc: str = 'val') -> Dict[str, float]:
    """Loss, top-1 and top-5 (percent) over this process's shard, reduced over all processes."""
    model.eval()
    loss_sum = top1 = top5 = count = 0.0
    for x, y in tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with _autocast(device, amp):
            logits = model(x)
        logits = logits.float()
        loss_sum += float(F.cross_entropy(logits, y, reduction='sum'))
        c1, c5 = accuracy_counts(logits, y)
        top1 += c1
        top5 += c5
        count += y.numel()
    loss_sum, top1, top5, count = all_reduce_sum([loss_sum, top1, top5, count], info, device)
    count = max(count, 1.0)
    return {'loss': loss_sum / count, 'top1': 100.0 * top1 / count, 'top5': 100.0 * top5 / count}


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
    _write_json(output / 'metrics.json', history)
    keys: List[str] = []
    for row in history:
        keys.extend(k for k in row if k not in keys)

    def write(p: Path) -> None:
        with open(p, 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(history)
    _atomic_write(output / 'metrics.csv', write)


def _check_resume_args(saved: Dict[str, Any], args: argparse.Namespace) -> None:
    current = _args_dict(args)
    changed = [k for k, v in saved.items() if k not in _RUNTIME_ARGS and current.get(k, v) != v]
    if changed:
        detail = ', '.join(f'{k}: {saved[k]!r} -> {current.get(k)!r}' for k in changed)
        print(f'warning: resuming with changed arguments ({detail}); the run will not match an uninterrupted one',
              file=sys.stderr)


def _args_dict(args: argparse.Namespace) -> Dict[str, Any]:
    return {k: _json_safe(v) for k, v in vars(args).items() if not callable(v)}


class Trainer:
    """One fine-tuning run; see :func:`run`."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.info, self.device = init_distributed(args.device)
        self.output = Path(args.output)
        self.amp = args.amp if args.amp is not None else self.device.type == 'cuda'
        self.progress = args.progress and self.info.is_main
        self.history: List[Dict[str, Any]] = []
        self.global_step = 0
        self.start_epoch = 0
        self.start_step = 0
        self.epoch_loss = [0.0, 0.0]  # summed training loss and sample count of the current epoch
        self.best = {'top1': -1.0, 'epoch': -1}

    # -- setup ----------------------------------------------------------------------------------

    def setup(self) -> None:
        """Build model, data, optimizer and schedule; load the saved state with ``--resume``."""
        args = self.args
        if args.resume is None and (self.output / STATE_FILE).exists():
            raise SystemExit(f'error: {self.output} already holds a run; pass --resume to continue it '
                             f'or choose another --output')
        self.model_kwargs = parse_model_kwargs(args.model_kwargs)
        # The data type depends on the model and the head on the data: read the model's input
        # kind from a weightless copy (meta device) first.
        with torch.device('meta'):
            is_video = is_video_model(timm.create_model(args.model, pretrained=False, **self.model_kwargs))
        extensions = VIDEO_EXTENSIONS if is_video else IMAGE_EXTENSIONS
        self.classes, train_samples, val_samples = scan_data(Path(args.data), extensions, args.val_split, args.seed)
        if len(self.classes) < 2:
            raise SystemExit(f'error: {args.data} must hold at least two class folders')
        if not train_samples:
            raise SystemExit(f'error: no {"video" if is_video else "image"} files found under {args.data}')

        seed_everything(args.seed)
        self.model = create_finetune_model(
            args.model, len(self.classes), args.pretrained, self.model_kwargs,
            pretrained_file=args.pretrained_file, drop_path_rate=args.drop_path,
        )
        if args.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.model.to(self.device)
        self.data_cfg = resolve_data_config(self.model, args.sampling_rate)
        self._build_data(train_samples, val_samples)
        self._build_optimisation()
        if args.resume is not None:
            self._resume(Path(args.resume) if args.resume else self.output)
        self.ddp_model: nn.Module = self.model
        if self.info.enabled:
            # MViT's depthwise pooling convs keep channels-last gradients: a harmless DDP performance note
            warnings.filterwarnings('ignore', message='Grad strides do not match bucket view strides')
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == 'cuda' else None,
            )

    def _build_data(self, train_samples: Samples, val_samples: Samples) -> None:
        args, info, cfg = self.args, self.info, self.data_cfg
        train_tf = build_transform(cfg, True, scale=tuple(args.scale), hflip=args.hflip,
                                   color_jitter=args.color_jitter, auto_augment=args.aa, re_prob=args.reprob)
        val_tf = build_transform(cfg, False)
        if cfg.is_video:
            train_ds: Dataset = VideoFolder(train_samples, cfg.num_frames, cfg.sampling_rate, random_start=True,
                                            transform=train_tf, classes=self.classes)
            val_ds: Dataset = VideoFolder(val_samples, cfg.num_frames, cfg.sampling_rate, random_start=False,
                                          transform=val_tf, classes=self.classes)
        else:
            train_ds, val_ds = ImageSamples(train_samples, train_tf), ImageSamples(val_samples, val_tf)
        self.num_train, self.num_val = len(train_samples), len(val_samples)
        self.train_ds = EpochSeeded(train_ds, args.seed)
        self.train_sampler = ShardSampler(self.num_train, info.world_size, info.rank, shuffle=True, seed=args.seed,
                                          pad=True)
        shard = len(self.train_sampler)
        drop_last = shard >= args.batch_size
        self.steps_per_epoch = shard // args.batch_size if drop_last else 1
        pin = self.device.type == 'cuda'
        self.train_loader = _loader(self.train_ds, self.train_sampler, args.batch_size, args.workers, drop_last, pin)
        self.val_loader: Optional[DataLoader] = None
        if val_samples:
            self.val_loader = _loader(val_ds, ShardSampler(self.num_val, info.world_size, info.rank),
                                      args.eval_batch_size or args.batch_size, args.workers, False, pin)

    def _build_optimisation(self) -> None:
        args = self.args
        # AdamW; timm groups the parameters by layer (group_matcher) for layer decay, and exempts
        # 1-D parameters and model.no_weight_decay() from weight decay
        self.optimizer = create_optimizer_v2(self.model, opt='adamw', lr=args.lr, weight_decay=args.weight_decay,
                                             layer_decay=self._layer_decay())
        total_steps = self.steps_per_epoch * args.epochs
        warmup = min(int(round(args.warmup_epochs * self.steps_per_epoch)), max(total_steps - 1, 0))
        self.scheduler = CosineLRScheduler(
            self.optimizer, t_initial=max(total_steps - warmup, 1), lr_min=args.min_lr, warmup_t=warmup,
            warmup_lr_init=args.warmup_lr, warmup_prefix=True, t_in_epochs=False,
        )
        self.mixup: Optional[Mixup] = None
        if args.mixup > 0 or args.cutmix > 0:
            if args.batch_size % 2:
                raise SystemExit('error: mixup/cutmix needs an even --batch-size')
            self.mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                               label_smoothing=args.smoothing, num_classes=len(self.classes))
            self.criterion: nn.Module = SoftTargetCrossEntropy()
        else:
            self.criterion = nn.CrossEntropyLoss(label_smoothing=args.smoothing)
        self.ema = ModelEmaV3(self.model, decay=args.ema_decay, use_warmup=True) if args.ema else None

    def _layer_decay(self) -> Optional[float]:
        layer_decay = self.args.layer_decay
        if layer_decay is None:
            layer_decay = 0.75 if (self.args.pretrained or self.args.pretrained_file) else 1.0
        return None if layer_decay >= 1.0 else layer_decay

    # -- checkpoints ----------------------------------------------------------------------------

    def _resume(self, folder: Path) -> None:
        state_path = folder / STATE_FILE
        if not state_path.exists():
            raise SystemExit(f'error: nothing to resume: {state_path} does not exist')
        state = json.loads(state_path.read_text())
        if state['label_names'] != self.classes:
            raise SystemExit(f'error: the classes under {self.args.data} differ from those of the run in {folder}')
        if state['steps_per_epoch'] != self.steps_per_epoch:
            raise SystemExit('error: steps per epoch changed (data, --batch-size or process count differ); '
                             'cannot resume exactly')
        _check_resume_args(state.get('args', {}), self.args)
        step = state['global_step']
        steps = {WEIGHTS_FILE: load_weights(folder / WEIGHTS_FILE, self.model)}
        if self.ema is not None:
            if not (folder / EMA_WEIGHTS_FILE).exists():
                raise SystemExit(f'error: --ema given but {folder} has no {EMA_WEIGHTS_FILE}')
            steps[EMA_WEIGHTS_FILE] = load_weights(folder / EMA_WEIGHTS_FILE, self.ema.module)
        extra = torch.load(folder / OPTIMIZER_FILE, map_location='cpu', weights_only=True)
        steps[OPTIMIZER_FILE] = int(extra['global_step'])
        if any(s != step for s in steps.values()):
            raise SystemExit(f'error: checkpoint files in {folder} are from different steps ({steps}, state {step}); '
                             'the last save was interrupted')
        self.optimizer.load_state_dict(extra['optimizer'])
        self.scheduler.load_state_dict(extra['scheduler'])
        _set_rng_state(extra['rng'])
        self.global_step = step
        self.start_epoch, self.start_step = state['epoch'], state['step_in_epoch']
        self.epoch_loss = list(state['epoch_loss']) if self.info.is_main else [0.0, 0.0]
        self.best = state['best']
        metrics_path = folder / 'metrics.json'
        if metrics_path.exists():
            self.history = [r for r in json.loads(metrics_path.read_text()) if r['epoch'] < self.start_epoch]
        if self.info.is_main:
            print(f'resumed from {folder} at epoch {self.start_epoch} step {self.start_step} '
                  f'(global step {step})', file=sys.stderr)

    def save(self, epoch: int, step_in_epoch: int) -> None:
        """Write weights, optimizer/scheduler/RNG state and the training state (rank 0)."""
        # the running training loss is summed over processes first (a collective)
        epoch_loss = all_reduce_sum(self.epoch_loss, self.info, self.device)
        if self.info.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
            write_config(self.output, self.config())
            save_weights(self.output / WEIGHTS_FILE, self.model, self.global_step)
            if self.ema is not None:
                save_weights(self.output / EMA_WEIGHTS_FILE, self.ema.module, self.global_step)
            extra = {'global_step': self.global_step, 'optimizer': self.optimizer.state_dict(),
                     'scheduler': self.scheduler.state_dict(), 'rng': _rng_state()}
            _atomic_write(self.output / OPTIMIZER_FILE, lambda p: torch.save(extra, p))
            state = {
                'model': self.args.model, 'epoch': epoch, 'step_in_epoch': step_in_epoch,
                'global_step': self.global_step, 'steps_per_epoch': self.steps_per_epoch,
                'epochs': self.args.epochs, 'epoch_loss': epoch_loss, 'best': self.best,
                'label_names': self.classes, 'world_size': self.info.world_size, 'args': _args_dict(self.args),
            }
            _write_json(self.output / STATE_FILE, state)  # written last: marks the checkpoint complete
        _barrier(self.info)

    def config(self) -> ModelConfig:
        return model_config(self.model, self.args.model, self.classes, self.model_kwargs, self.data_cfg)

    # -- loop -----------------------------------------------------------------------------------

    def train(self) -> List[Dict[str, Any]]:
        args, info = self.args, self.info
        if info.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
            write_config(self.output, self.config())
            print(f'{args.model}: {len(self.classes)} classes, {self.num_train} train / {self.num_val} val '
                  f'{"clips" if self.data_cfg.is_video else "images"}, input {tuple(self.data_cfg.input_size)}, '
                  f'{self.steps_per_epoch} steps/epoch x {args.epochs} epochs, {info.world_size} process(es) '
                  f'on {self.device}{", bf16" if self.amp else ""}', file=sys.stderr)
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
            bar = tqdm(self.train_loader, total=self.steps_per_epoch - skip_steps, desc=f'epoch {epoch}',
                       disable=not self.progress, dynamic_ncols=True, leave=False)
            step = skip_steps
            for x, y in bar:
                loss = self.train_step(x, y)
                step += 1
                if self.progress:
                    bar.set_postfix(loss=f'{loss:.4f}', lr=f'{self._lr():.2e}')
                if args.save_every and self.global_step % args.save_every == 0 and step < self.steps_per_epoch:
                    self.save(epoch, step)
            bar.close()
            self.end_epoch(epoch, time.time() - started)
        return self.history

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One optimizer update; returns the batch loss."""
        seed_everything(_derive_seed(self.args.seed, 3, self.global_step, self.info.rank))
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self.mixup is not None:
            x, y = _apply_mixup(self.mixup, x, y)
        self.scheduler.step_update(self.global_step)
        with _autocast(self.device, self.amp):
            logits = self.ddp_model(x)
        loss = self.criterion(logits.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.args.clip_grad:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.args.clip_grad)
        self.optimizer.step()
        self.global_step += 1
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step)
        value = float(loss.detach())
        self.epoch_loss[0] += value * x.shape[0]
        self.epoch_loss[1] += x.shape[0]
        return value

    def _lr(self) -> float:
        return max(g['lr'] for g in self.optimizer.param_groups)

    def end_epoch(self, epoch: int, seconds: float) -> None:
        loss_sum, count = all_reduce_sum(self.epoch_loss, self.info, self.device)
        row: Dict[str, Any] = {'epoch': epoch, 'step': self.global_step, 'lr': self._lr(),
                               'train_loss': loss_sum / max(count, 1.0)}
        if self.val_loader is not None:
            row.update({f'val_{k}': v for k, v in evaluate(self.model, self.val_loader, self.device, self.amp,
                                                           self.info, self.progress).items()})
            if self.ema is not None:
                row.update({f'ema_val_{k}': v for k, v in evaluate(self.ema.module, self.val_loader, self.device,
                                                                   self.amp, self.info, self.progress,
                                                                   'val (ema)').items()})
        row['epoch_time'] = round(seconds, 3)
        self.history.append(row)
        improved = 'val_top1' in row and row['val_top1'] > self.best['top1']
        if improved:
            self.best = {'top1': row['val_top1'], 'epoch': epoch}
        self.epoch_loss = [0.0, 0.0]
        self.save(epoch + 1, 0)
        if self.info.is_main:
            if improved:
                save_weights(self.output / BEST_WEIGHTS_FILE, self.model, self.global_step)
            _write_metrics(self.output, self.history)
            print(' '.join(f'{k}={v:.4f}' if isinstance(v, float) else f'{k}={v}' for k, v in row.items()),
                  file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------

def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``finetune`` options to ``parser``."""
    parser.description = __doc__.split('\n\n')[0]
    g = parser.add_argument_group('model')
    g.add_argument('--model', required=True, help='model name, optionally with a pretrained tag: NAME[.tag]')
    g.add_argument('--pretrained', action=argparse.BooleanOptionalAction, default=True,
                   help='start from the pretrained weights of NAME[.tag] (default: yes)')
    g.add_argument('--pretrained-file', default=None, metavar='FILE',
                   help='start from the weights in this local file instead (safetensors or torch checkpoint)')
    g.add_argument('--model-kwargs', default=None, metavar='JSON',
                   help='architecture overrides, e.g. \'{"depths": [1,1,1,1], "embed_dim": 32, "img_size": 64}\'')
    g.add_argument('--drop-path', type=float, default=None, help="stochastic depth rate (default: the model's)")
    g.add_argument('--grad-checkpointing', action='store_true', help='recompute activations to save memory')
    d = parser.add_argument_group('data')
    d.add_argument('--data', required=True, metavar='DIR',
                   help='class folders DIR/<class>/<file>, or DIR/train/ and DIR/val/ trees of them')
    d.add_argument('--val-split', type=float, default=0.1,
                   help='fraction of each class held out for validation when DIR has no val/ (default: %(default)s)')
    d.add_argument('--workers', type=int, default=0, help='data-loading processes (default: %(default)s)')
    d.add_argument('--sampling-rate', type=int, default=None, metavar='TAU',
                   help="video: stride between the T sampled frames (default: the model's pretrained config)")
    d.add_argument('--scale', type=float, nargs=2, default=(0.08, 1.0), metavar=('MIN', 'MAX'),
                   help='random-resized-crop area range (default: 0.08 1.0)')
    d.add_argument('--hflip', type=float, default=0.5, help='horizontal flip probability (default: %(default)s)')
    d.add_argument('--color-jitter', type=float, default=0.4, help='images: colour jitter (default: %(default)s)')
    d.add_argument('--aa', default=None, help="images: timm auto-augment policy, e.g. 'rand-m9-mstd0.5-inc1'")
    d.add_argument('--reprob', type=float, default=0.0, help='images: random erasing probability (default: 0)')
    d.add_argument('--mixup', type=float, default=0.0, help='mixup alpha (default: 0, off)')
    d.add_argument('--cutmix', type=float, default=0.0, help='cutmix alpha (default: 0, off)')
    d.add_argument('--mixup-prob', type=float, default=1.0, help='probability of mixing a batch (default: 1)')
    o = parser.add_argument_group('optimisation')
    o.add_argument('--epochs', type=int, default=10, help='(default: %(default)s)')
    o.add_argument('--batch-size', type=int, default=32, help='per process (default: %(default)s)')
    o.add_argument('--eval-batch-size', type=int, default=None, help='per process (default: --batch-size)')
    o.add_argument('--lr', type=float, default=5e-4, help='peak AdamW learning rate (default: %(default)s)')
    o.add_argument('--min-lr', type=float, default=1e-6, help='learning rate at the end (default: %(default)s)')
    o.add_argument('--warmup-epochs', type=float, default=1.0,
                   help='linear warm-up, may be fractional (default: %(default)s)')
    o.add_argument('--warmup-lr', type=float, default=1e-6, help='warm-up start (default: %(default)s)')
    o.add_argument('--weight-decay', type=float, default=0.05,
                   help='AdamW weight decay, not applied to norms, biases and position tables (default: %(default)s)')
    o.add_argument('--layer-decay', type=float, default=None,
                   help='layer-wise learning-rate decay; 1 turns it off (default: 0.75 from pretrained weights, '
                        'else 1)')
    o.add_argument('--smoothing', type=float, default=0.1, help='label smoothing (default: %(default)s)')
    o.add_argument('--clip-grad', type=float, default=None, metavar='NORM', help='gradient norm clipping')
    o.add_argument('--ema', action='store_true', help='also keep (and validate) an EMA of the weights')
    o.add_argument('--ema-decay', type=float, default=0.9998, help='(default: %(default)s)')
    o.add_argument('--amp', action=argparse.BooleanOptionalAction, default=None,
                   help='bf16 autocast (default: on with CUDA, off on CPU)')
    o.add_argument('--seed', type=int, default=0, help='(default: %(default)s)')
    r = parser.add_argument_group('run')
    r.add_argument('--output', required=True, metavar='DIR',
                   help='where model.safetensors, config.json, metrics and the training state go')
    r.add_argument('--resume', nargs='?', const='', default=None, metavar='DIR',
                   help='continue the run saved in DIR (default: --output) exactly where it stopped')
    r.add_argument('--save-every', type=int, default=0, metavar='STEPS',
                   help='also save the training state every STEPS steps within epochs (default: epoch ends only)')
    r.add_argument('--device', default='auto', help="cpu, cuda, cuda:1, ... (default: CUDA if available)")
    r.add_argument('--progress', action=argparse.BooleanOptionalAction, default=True,
                   help='tqdm progress bars (default: yes)')


def run(args: argparse.Namespace) -> int:
    """Fine-tune as described by parsed ``args``; returns the exit status."""
    trainer = Trainer(args)
    try:
        trainer.setup()
        trainer.train()
    finally:
        if trainer.info.enabled and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='mvit-zoo finetune')
    configure_parser(parser)
    return run(parser.parse_args(argv))


if __name__ == '__main__':
    sys.exit(main())
