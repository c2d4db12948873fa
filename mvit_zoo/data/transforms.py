"""Preprocessing a model expects (`DataConfig`), read from the model, and the transforms built from it.

Images use timm's transforms; a video model's clips (`input_size` `(C, T, H, W)`) are made by
:class:`~mvit_zoo.data.augment.TrainClipTransform` in training and :class:`~mvit_zoo.data.views.ViewSampling`
for its test views.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import torch.nn as nn
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.auto_augment import AugmentOp


__all__ = ["DataConfig", "is_video_model", "resolve_data_config", "build_transform"]


@dataclass(frozen=True)
class DataConfig:
    """Preprocessing a model expects: `input_size` is `(C, H, W)` or `(C, T, H, W)`."""

    input_size: Tuple[int, ...]
    mean: Tuple[float, ...] = IMAGENET_DEFAULT_MEAN
    std: Tuple[float, ...] = IMAGENET_DEFAULT_STD
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    sampling_rate: int = 1
    channel_order: str = "RGB"

    @property
    def is_video(self) -> bool:
        return len(self.input_size) == 4

    @property
    def num_frames(self) -> int:
        return self.input_size[1] if self.is_video else 1

    def to_dict(self) -> Dict[str, Any]:
        """pretrained_cfg-style keys: `input_size` is `(C, H, W)`, with `num_frames` etc. for video."""
        d: Dict[str, Any] = dict(
            input_size=[self.input_size[0], *self.input_size[-2:]], mean=list(self.mean), std=list(self.std),
            crop_pct=self.crop_pct, interpolation=self.interpolation,
        )
        if self.is_video:
            d.update(num_frames=self.num_frames, sampling_rate=self.sampling_rate, channel_order=self.channel_order)
        return d


def is_video_model(model: nn.Module) -> bool:
    """True for models that take clips `(B, C, T, H, W)`."""
    if hasattr(model, "is_video"):
        return bool(model.is_video)
    img_size = getattr(model, "img_size", None)
    if isinstance(img_size, (tuple, list)):
        return len(img_size) == 3
    return len((getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))) == 4


def resolve_data_config(model: nn.Module, sampling_rate: Optional[int] = None) -> DataConfig:
    """Input size from the model as built (`model.img_size`), statistics from its pretrained_cfg."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    default_size = tuple(cfg.get("input_size", (3, 224, 224)))
    img_size = getattr(model, "img_size", None)
    if img_size is None:
        img_size = default_size[1:]
    elif isinstance(img_size, int):
        img_size = (img_size, img_size)
    in_chans = int(getattr(model, "in_chans", default_size[0]))
    return DataConfig(
        input_size=(in_chans, *(int(s) for s in img_size)),
        mean=tuple(float(m) for m in cfg.get("mean", IMAGENET_DEFAULT_MEAN)),
        std=tuple(float(s) for s in cfg.get("std", IMAGENET_DEFAULT_STD)),
        crop_pct=float(cfg.get("crop_pct", 0.875) or 0.875),
        interpolation=str(cfg.get("interpolation", "bicubic") or "bicubic"),
        sampling_rate=int(sampling_rate or cfg.get("sampling_rate", 1) or 1),
        channel_order=str(cfg.get("channel_order", "RGB") or "RGB"),
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
    """timm's image transforms. A video model's clips are made by :class:`~mvit_zoo.data.augment.TrainClipTransform`
    (training) and :class:`~mvit_zoo.data.views.ViewSampling` (test views)."""
    if data_cfg.is_video:
        raise ValueError(f"build_transform makes image transforms; a video input {data_cfg.input_size} is made by "
                         "mvit_zoo.data.augment.TrainClipTransform (training) or mvit_zoo.data.views.ViewSampling "
                         "(test views)")
    if is_training:
        transform = create_transform(
            data_cfg.input_size, is_training=True, scale=scale, hflip=hflip, color_jitter=color_jitter,
            auto_augment=auto_augment, re_prob=re_prob, interpolation=data_cfg.interpolation,
            mean=data_cfg.mean, std=data_cfg.std,
        )
        _patch_posterize(transform)
        return transform
    return create_transform(
        data_cfg.input_size, is_training=False, interpolation=data_cfg.interpolation,
        mean=data_cfg.mean, std=data_cfg.std, crop_pct=data_cfg.crop_pct,
    )


def posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """Keep the `bits_to_keep` most significant bits of each channel; 0 bits gives a black image."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _patch_posterize(transform: Any) -> None:
    """Point the posterize ops of timm's auto-augment policies in `transform` at :func:`posterize`.

    NOTE: RandAugment's increasing posterize ('inc1', as in 'rand-m9-mstd0.5-inc1') keeps 4 down to 0
    bits; Pillow >= 13 refuses 0 bits, which Pillow < 13 turned into a black image (the TF reference
    behaviour that timm's policy follows). The ops are patched per instance; timm itself is untouched.
    """
    pending = [transform]
    while pending:
        node = pending.pop()
        if isinstance(node, (list, tuple)):  # AutoAugment's policy is a list of lists of ops
            pending.extend(node)
        elif isinstance(node, AugmentOp):
            if node.name.startswith("Posterize"):
                node.aug_fn = posterize
        else:
            pending.extend(getattr(node, attr) for attr in ("transforms", "ops", "policy") if hasattr(node, attr))
