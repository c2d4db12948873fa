"""Fine-tuning's input pipeline: the training and validation datasets of a model and its data.

Images use timm's transforms (:func:`~mvit_zoo.data.transforms.build_transform`). Video models train
on :class:`~mvit_zoo.data.video.VideoClips` (SlowFast's clip sampling and
:class:`~mvit_zoo.data.augment.TrainClipTransform`, optionally several augmented clips of each decoded
video) and validate on :class:`~mvit_zoo.data.video.ViewClips` (the one centre view of
`mvit-zoo validate --views 1x1`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch.utils.data import Dataset

from .augment import TrainClipTransform
from .folders import ImageSamples, Samples
from .transforms import DataConfig, build_transform
from .video import VideoClips, ViewClips
from .views import SLOWFAST_TARGET_FPS, ViewSampling

__all__ = ["Augmentation", "build_datasets", "flatten_clips"]


@dataclass(frozen=True)
class Augmentation:
    """Training augmentation and clip sampling (`mvit-zoo finetune`'s options of the same names).

    Images use `scale`, `hflip`, `color_jitter`, `auto_augment` and `re_prob`; the other fields are
    for video clips, whose `auto_augment` must be a RandAugment policy.
    """

    scale: Tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    color_jitter: float = 0.4
    auto_augment: Optional[str] = None
    re_prob: float = 0.0
    # -- video
    clips_per_video: int = 1
    frame_sampling: str = "stride"
    target_fps: float = SLOWFAST_TARGET_FPS
    crop_mode: str = "resized"
    jitter_scales: Tuple[int, int] = (256, 320)
    inverse_uniform: bool = False
    aa_interpolation: str = "bicubic"
    re_mode: str = "pixel"
    backend: Optional[str] = None


def build_datasets(train: Samples, val: Samples, cfg: DataConfig, aug: Augmentation,
                   val_sampling: Optional[ViewSampling] = None) -> Tuple[Dataset, Dataset]:
    """(train, val) datasets of `(path, class index)` samples for a model with preprocessing `cfg`.

    Video models need `val_sampling`, the one-view test sampling of the model. A training item of a
    video model is `((C, T, H, W), target)`, or `((clips_per_video, C, T, H, W), target)` with several
    clips (:func:`flatten_clips` makes a batch of them a batch of clips).
    """
    if not cfg.is_video:
        train_tf = build_transform(cfg, True, scale=aug.scale, hflip=aug.hflip, color_jitter=aug.color_jitter,
                                   auto_augment=aug.auto_augment, re_prob=aug.re_prob)
        return ImageSamples(train, train_tf), ImageSamples(val, build_transform(cfg, False))
    if val_sampling is None:
        raise ValueError("a video model's validation needs its view sampling (val_sampling)")
    transform = TrainClipTransform(
        cfg.input_size, cfg.mean, cfg.std, crop_mode=aug.crop_mode, scale=aug.scale, jitter_scales=aug.jitter_scales,
        inverse_uniform=aug.inverse_uniform, hflip=aug.hflip, auto_augment=aug.auto_augment,
        interpolation=aug.aa_interpolation, re_prob=aug.re_prob, re_mode=aug.re_mode, channel_order=cfg.channel_order,
    )
    # NOTE: frames are decoded at SlowFast's training size, short side TRAIN_JITTER_SCALES[0], before RandAugment
    train_ds = VideoClips(train, cfg.num_frames, cfg.sampling_rate, transform, frame_sampling=aug.frame_sampling,
                          target_fps=aug.target_fps, clips_per_video=aug.clips_per_video, backend=aug.backend,
                          short_side=aug.jitter_scales[0])
    return train_ds, ViewClips(val, val_sampling, backend=aug.backend)


def flatten_clips(x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """A batch of `B` videos of `N` clips each, `(B, N, C, T, H, W)` with targets `(B,)`, as a batch of `B * N`
    clips `(B * N, C, T, H, W)` with each video's target repeated `N` times; other batches as they are."""
    if x.ndim != 6:
        return x, y
    clips = x.shape[1]
    return x.flatten(0, 1), y.repeat_interleave(clips, dim=0)
