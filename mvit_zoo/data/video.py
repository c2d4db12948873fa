"""Video clips for MViT models: finetune's training clips and its validation view.

A video model takes clips of `T` frames taken every `tau` frames at 30 fps (the model's
`pretrained_cfg['num_frames']` and `['sampling_rate']`), laid out as float tensors `(C, T, H, W)`.
Every clip is read through :mod:`mvit_zoo.data.reader`, which decodes only the frames a clip needs:
:class:`VideoClips` (training clips, SlowFast's sampling, several augmented clips per decode) and
:class:`ViewClips` (validation: the view `validate --views 1x1` and `predict` score). :func:`write_video`
encodes frames, for tests and examples.

Decoding needs the optional `av` package (`pip install mvit-zoo[video]`).
"""
from __future__ import annotations

import os
import random
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .reader import _import_av, probe, read_frames
from .sampling import train_clip_indices, train_segment_indices
from .views import SLOWFAST_TARGET_FPS, ViewSampling, decode_views

__all__ = [
    "VIDEO_EXTENSIONS",
    "is_video_file",
    "write_video",
    "shrink_frames",
    "VideoClips",
    "ViewClips",
]

VIDEO_EXTENSIONS: Tuple[str, ...] = (
    ".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".ogv", ".gif",
)

PathLike = Union[str, os.PathLike]


def is_video_file(path: PathLike) -> bool:
    """True if the file name has a known video extension."""
    return str(path).lower().endswith(VIDEO_EXTENSIONS)


def write_video(
        path: PathLike,
        frames: Union[np.ndarray, torch.Tensor],
        fps: int = 25,
        codec: str = "mpeg4",
        quality: int = 3,
) -> None:
    """Encode RGB `uint8` frames `(N, H, W, 3)` (even H and W) into a video file with PyAV.

    `quality` is the codec's fixed quantiser (lower is better) for `mpeg4`.
    """
    av = _import_av()
    frames = np.asarray(frames, dtype=np.uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"Expected frames of shape (N, H, W, 3), got {frames.shape}")
    height, width = frames.shape[1:3]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        if codec == "mpeg4":  # fixed quantiser, as `ffmpeg -q:v quality`
            stream.codec_context.qscale = True
            stream.codec_context.global_quality = quality * 118  # FF_QP2LAMBDA
        for array in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def shrink_frames(frames: np.ndarray, short_side: Optional[int]) -> np.ndarray:
    """`(T, H, W, 3)` uint8 frames with the short side brought down to `short_side` (antialiased), if larger.

    SlowFast's decoder hands its training augmentation frames of short side `TRAIN_JITTER_SCALES[0]`
    (its `max_spatial_scale`); doing the same keeps RandAugment's cost independent of the file's resolution.
    """
    height, width = frames.shape[1:3]
    if not short_side or min(height, width) <= short_side:
        return frames
    scale = short_side / min(height, width)
    size = (short_side, round(width * scale)) if height <= width else (round(height * scale), short_side)
    out = np.empty((len(frames), *size, 3), np.uint8)
    for t, frame in enumerate(frames):  # one frame at a time: a float copy of a 720p clip would be 177 MB
        x = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[None].float()
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        out[t] = x[0].round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return out


class VideoClips(Dataset):
    """Training clips of a list of `(path, class index)` videos, as SlowFast trains.

    Each video is probed and only the frames of one random clip are decoded (`frame_sampling`
    `'stride'`: :func:`~mvit_zoo.data.sampling.train_clip_indices`, at `target_fps`; `'segment'`:
    one random frame per segment, SSv2). The clip is then augmented `clips_per_video` times with
    independent parameters (SlowFast's `AUG.NUM_SAMPLE`, repeated augmentation): an item is
    `(clips, target)` with `clips` `(clips_per_video, C, T, H, W)`, or `(C, T, H, W)` for one clip.
    `transform(frames, rng)` maps `(T, H, W, 3)` uint8 to `(C, T, H, W)`
    (:class:`~mvit_zoo.data.augment.TrainClipTransform`). Randomness is drawn from Python's global
    generator, which :class:`~mvit_zoo.data.folders.EpochSeeded` seeds per (seed, epoch, sample), and
    split into one generator for the frames and one per clip.
    """

    def __init__(
            self,
            samples: Sequence[Tuple[str, int]],
            num_frames: int,
            sampling_rate: int,
            transform: Callable[[np.ndarray, random.Random], torch.Tensor],
            frame_sampling: str = "stride",
            target_fps: Optional[float] = SLOWFAST_TARGET_FPS,
            clips_per_video: int = 1,
            backend: Optional[str] = None,
            short_side: Optional[int] = None,
    ) -> None:
        if frame_sampling not in ("stride", "segment"):
            raise ValueError(f"frame_sampling must be 'stride' or 'segment', got {frame_sampling!r}")
        if clips_per_video < 1:
            raise ValueError(f"clips_per_video must be at least 1, got {clips_per_video}")
        self.samples = list(samples)
        self.targets = [target for _, target in self.samples]
        self.num_frames, self.sampling_rate = num_frames, sampling_rate
        self.transform = transform
        self.frame_sampling, self.target_fps = frame_sampling, target_fps
        self.clips_per_video = clips_per_video
        self.backend = backend
        self.short_side = short_side

    def __len__(self) -> int:
        return len(self.samples)

    def frame_indices(self, num_available: int, fps: Optional[float], rng: random.Random) -> List[int]:
        """The frames of one training clip of a video of `num_available` frames at `fps`."""
        if self.frame_sampling == "segment":
            return train_segment_indices(num_available, self.num_frames, rng)
        return train_clip_indices(num_available, self.num_frames, self.sampling_rate, fps, self.target_fps, rng)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        path, target = self.samples[index]
        rng = random.Random(random.getrandbits(64))
        info = probe(path, self.backend)
        frames, rows = read_frames(path, self.frame_indices(info.num_frames, info.fps, rng), backend=self.backend,
                                   info=info)
        frames = shrink_frames(frames, self.short_side)[rows]
        clips = [self.transform(frames, random.Random(rng.getrandbits(64))) for _ in range(self.clips_per_video)]
        return (clips[0] if self.clips_per_video == 1 else torch.stack(clips)), target


class ViewClips(Dataset):
    """The one test view of each of a list of `(path, class index)` videos: `((C, T, H, W), target)`.

    The frames, resize and crop are those of `sampling` (:class:`~mvit_zoo.data.views.ViewSampling`
    with one view), so fine-tuning's validation scores exactly what `mvit-zoo validate --views 1x1` does.
    """

    def __init__(self, samples: Sequence[Tuple[str, int]], sampling: ViewSampling,
                 backend: Optional[str] = None) -> None:
        if len(sampling.views) != 1:
            raise ValueError(f"ViewClips gives one view per video, got views {sampling.views}")
        self.samples = list(samples)
        self.targets = [target for _, target in self.samples]
        self.sampling, self.backend = sampling, backend

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        path, target = self.samples[index]
        frames, clips, _ = decode_views(path, self.sampling, self.backend)
        (view,) = self.sampling.iter_views(frames, clips)
        return view, target
