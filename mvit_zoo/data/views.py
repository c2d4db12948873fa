"""Multi-view video testing as SlowFast defines it: `T` temporal clips x `S` spatial crops per video.

Temporal clips (`frame_sampling='stride'`, Kinetics): a clip covers `num_frames * sampling_rate`
frames at the target frame rate (30 fps; a video at another rate covers the same time span); the
`T` clip starts are spread uniformly over the video (SlowFast's offset sampling: the first clip
starts on the first frame, the last ends on or just before the last frame, a single clip is
centred); `num_frames` indices are spaced evenly over the clip, rounded down and clamped to the
video, so a video shorter than a clip repeats its last frame. Segment sampling
(`frame_sampling='segment'`, Something-Something v2): the video is cut into `num_frames` equal
segments and one frame is taken from each; SlowFast's test takes the middle one, which is what one
temporal view gives (it has no temporal views); with `T` views, view `t` takes the frame at
`(2t + 1) / 2T` of each segment.

Spatial crops: one crop is a centre crop after resizing the short side to `crop / crop_pct`, the
minimum of the tag's training jitter scales as SlowFast's Kinetics test takes (256 for 224, 356 for
the 312 crop of `mvit_v2_l_40x3.fb_k400`); three crops resize the short side to the crop size and take
the left, centre and right crops of a landscape frame (top, centre, bottom of a portrait one). A frame
whose short side already has that size is not resampled. SlowFast's SSv2 test takes the left crop
when asked for one (its crop index modulo 1); one SSv2 crop here is the centre one, as for Kinetics.

Scores of the `T x S` views of a video are averaged (softmax) by :func:`mvit_zoo.evaluate`.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .reader import PathLike, VideoInfo, probe, read_frames

__all__ = [
    "MAX_TEMPORAL_VIEWS",
    "SLOWFAST_TARGET_FPS",
    "ViewSampling",
    "Views",
    "crop_offset",
    "decode_views",
    "segment_indices",
    "stride_clip_indices",
]

SLOWFAST_TARGET_FPS = 30.0  # SlowFast's DATA.TARGET_FPS: the frame rate sampling_rate is counted in
# The published protocols take 1 to 10 temporal clips; a typo such as 99999x3 is refused, not run for hours
MAX_TEMPORAL_VIEWS = 100


@dataclass(frozen=True)
class Views:
    """`temporal` clips x `spatial` crops per video (written `TxS`, e.g. `5x3`)."""

    temporal: int = 1
    spatial: int = 1

    def __post_init__(self) -> None:
        if self.temporal < 1:
            raise ValueError(f"views: at least one temporal clip is needed, got {self.temporal}")
        if self.spatial not in (1, 3):
            # NOTE: the model table writes views as the papers do, crops x clips ('1x5')
            swapped = (f"; did you mean {self.spatial}x{self.temporal} (TxS is clips x crops, the reverse of the "
                       f"papers' '{self.temporal}x{self.spatial}')?" if self.temporal in (1, 3) else "")
            raise ValueError(f"views: {self.spatial} spatial crops asked; SlowFast defines 1 (centre) or 3 "
                             f"(left/centre/right): use TxS with S = 1 or 3{swapped}")
        if self.temporal > MAX_TEMPORAL_VIEWS:
            raise ValueError(f"views: {self.temporal} temporal clips asked; at most {MAX_TEMPORAL_VIEWS} are taken "
                             f"(the published protocols use 1 to 10): use TxS with T <= {MAX_TEMPORAL_VIEWS}")

    @classmethod
    def parse(cls, value: str | Sequence[int] | Views) -> Views:
        """`'5x3'`, `(5, 3)` or a :class:`Views`."""
        if isinstance(value, Views):
            return value
        if isinstance(value, str):
            match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", value)
            if not match:
                raise ValueError(f"views must be written TxS (temporal clips x spatial crops, e.g. 5x1), "
                                 f"got {value!r}")
            return cls(int(match.group(1)), int(match.group(2)))
        temporal, spatial = value
        return cls(int(temporal), int(spatial))

    def __len__(self) -> int:
        return self.temporal * self.spatial

    def __str__(self) -> str:
        return f"{self.temporal}x{self.spatial}"


def stride_clip_indices(
        num_available: int,
        num_frames: int,
        sampling_rate: int,
        clip_idx: int = 0,
        num_clips: int = 1,
        fps: float | None = None,
        target_fps: float | None = SLOWFAST_TARGET_FPS,
) -> list[int]:
    """Frame indices of temporal clip `clip_idx` of `num_clips` (SlowFast's offset sampling).

    `fps` is the video's frame rate: a clip spans `num_frames * sampling_rate` frames at
    `target_fps`; without `fps` (or `target_fps`) it spans that many of the video's frames.
    """
    if num_available < 1:
        raise ValueError("A video needs at least one frame")
    if not 0 <= clip_idx < num_clips:
        raise ValueError(f"clip_idx must be in [0, {num_clips}), got {clip_idx}")
    clip_size = float(num_frames * sampling_rate)
    if fps and target_fps:
        clip_size *= fps / target_fps
    clip_size = max(1.0, clip_size)
    delta = max(num_available - clip_size, 0.0)
    start = math.floor(delta / 2) if num_clips == 1 else clip_idx * math.floor(delta / (num_clips - 1))
    index = torch.linspace(start, start + clip_size - 1, num_frames)
    return index.clamp(0, num_available - 1).long().tolist()


def segment_indices(num_available: int, num_frames: int, clip_idx: int = 0, num_clips: int = 1) -> list[int]:
    """One frame from each of `num_frames` equal segments (SlowFast's SSv2 sampling).

    View `clip_idx` of `num_clips` takes the frame at `(2 clip_idx + 1) / (2 num_clips)` of each
    segment; one view takes the middle frame, as SlowFast's test does.
    """
    if num_available < 1:
        raise ValueError("A video needs at least one frame")
    if not 0 <= clip_idx < num_clips:
        raise ValueError(f"clip_idx must be in [0, {num_clips}), got {clip_idx}")
    segment = (num_available - 1) / num_frames
    out = []
    for i in range(num_frames):
        # NOTE: round() halves to even, as numpy's np.round in SlowFast's ssv2.py
        start, end = round(segment * i), round(segment * (i + 1))
        out.append(start + (end - start) * (2 * clip_idx + 1) // (2 * num_clips))
    return out


def crop_offset(height: int, width: int, size: tuple[int, int], spatial_idx: int) -> tuple[int, int]:
    """`(y, x)` of crop `spatial_idx` (0, 1, 2) of `size` in a `height x width` frame.

    1 is the centre; 0 and 2 are the ends of the long side (left/right, or top/bottom if portrait).
    """
    if spatial_idx not in (0, 1, 2):
        raise ValueError(f"spatial_idx must be 0, 1 or 2, got {spatial_idx}")
    y, x = math.ceil((height - size[0]) / 2), math.ceil((width - size[1]) / 2)
    if spatial_idx != 1:
        if height > width:
            y = 0 if spatial_idx == 0 else height - size[0]
        else:
            x = 0 if spatial_idx == 0 else width - size[1]
    return y, x


def _short_side_size(height: int, width: int, short: int) -> tuple[int, int]:
    """`(H, W)` with the short side resized to `short` (the long side rounded down); a frame whose short
    side is already `short` keeps its size, as SlowFast's `random_short_side_scale_jitter` leaves it."""
    if min(height, width) == short:
        return height, width
    if width <= height:
        return math.floor(height / width * short), short
    return short, math.floor(width / height * short)


@dataclass(frozen=True)
class ViewSampling:
    """How a video becomes `views`: frame indices, resize, crops and normalisation of each view.

    `crop_size` is the model's `(H, W)`; `crop_pct` sets the short side of the one-crop test
    (`crop / crop_pct`). `channel_order='BGR'` reverses the channels before normalising (the
    `mean`/`std` are in the model's order), as the training transform.
    """

    num_frames: int
    crop_size: tuple[int, int]
    views: Views = Views()
    sampling_rate: int = 1
    frame_sampling: str = "stride"
    crop_pct: float = 1.0
    mean: tuple[float, ...] = (0.45, 0.45, 0.45)
    std: tuple[float, ...] = (0.225, 0.225, 0.225)
    channel_order: str = "RGB"
    interpolation: str = "bilinear"
    target_fps: float | None = SLOWFAST_TARGET_FPS

    def __post_init__(self) -> None:
        if self.frame_sampling not in ("stride", "segment"):
            raise ValueError(f"frame_sampling must be 'stride' or 'segment', got {self.frame_sampling!r}")
        if self.channel_order.upper() not in ("RGB", "BGR"):
            raise ValueError(f"channel_order must be RGB or BGR, got {self.channel_order}")

    def is_short(self, num_available: int, fps: float | None = None) -> bool:
        """True if a video has fewer frames than one clip spans (the sampling then repeats frames)."""
        if self.frame_sampling == "segment":
            return num_available < self.num_frames
        span = self.num_frames * self.sampling_rate * (fps / self.target_fps if fps and self.target_fps else 1.0)
        return num_available < span

    def clip_indices(self, num_available: int, fps: float | None = None) -> list[list[int]]:
        """Frame indices of each temporal clip: `views.temporal` lists of `num_frames`."""
        n = self.views.temporal
        if self.frame_sampling == "segment":
            return [segment_indices(num_available, self.num_frames, t, n) for t in range(n)]
        return [stride_clip_indices(num_available, self.num_frames, self.sampling_rate, t, n, fps, self.target_fps)
                for t in range(n)]

    def short_side(self) -> int:
        """Short side the frames are resized to before cropping."""
        crop = min(self.crop_size)
        return crop if self.views.spatial > 1 else round(crop / self.crop_pct)

    def crops(self, height: int, width: int) -> list[tuple[int, int]]:
        """`(y, x)` of each spatial crop in the resized frame of :meth:`resized_size`."""
        spatial = [1] if self.views.spatial == 1 else [0, 1, 2]
        return [crop_offset(height, width, self.crop_size, s) for s in spatial]

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        return _short_side_size(height, width, self.short_side())

    def iter_views(self, frames: np.ndarray, clips: Sequence[Sequence[int]]) -> Iterator[torch.Tensor]:
        """The views of one video, temporal clip major: `(C, T, h, w)` float tensors.

        `frames` is `(N, H, W, 3)` uint8 (array or tensor) and `clips` the rows of `frames` of each clip. One
        clip is resized at a time, so memory holds one clip, not the video.
        """
        mean = torch.tensor(self.mean).view(-1, 1, 1, 1)
        std = torch.tensor(self.std).view(-1, 1, 1, 1)
        for rows in clips:
            clip = torch.as_tensor(frames)[list(rows)].permute(0, 3, 1, 2).float()
            if self.channel_order.upper() == "BGR":
                clip = clip.flip(1)
            height, width = clip.shape[-2:]
            size = self.resized_size(height, width)
            if size != (height, width):
                # NOTE: no antialiasing, as SlowFast's F.interpolate resize
                clip = F.interpolate(clip, size=size, mode=self.interpolation, align_corners=False
                                     if self.interpolation in ("bilinear", "bicubic") else None)
            clip = ((clip.div_(255).permute(1, 0, 2, 3)) - mean) / std  # C, T, H, W
            h, w = self.crop_size
            for y, x in self.crops(*size):
                yield clip[:, :, y:y + h, x:x + w].contiguous()

    def to_dict(self) -> dict[str, object]:
        return {
            "views": str(self.views), "num_frames": self.num_frames, "sampling_rate": self.sampling_rate,
            "frame_sampling": self.frame_sampling, "crop_size": list(self.crop_size),
            "short_side": self.short_side(), "mean": list(self.mean), "std": list(self.std),
            "channel_order": self.channel_order, "interpolation": self.interpolation, "target_fps": self.target_fps,
        }


def decode_views(path: PathLike, sampling: ViewSampling, backend: str | None = None,
                 info: VideoInfo | None = None) -> tuple[np.ndarray, list[list[int]], bool]:
    """The frames a video's views need, the rows of each temporal clip, and whether the video is shorter than
    a clip: `((K, H, W, 3) uint8 unique frames, views.temporal lists of num_frames rows, bool)`, the input of
    :meth:`ViewSampling.iter_views`.

    Only the clips' frames are decoded (:func:`mvit_zoo.data.reader.read_frames` seeks to the keyframe before
    each run of them), so `5x1` views of a long video cost five short decodes, not the file. `backend`:
    'pyav', 'torchcodec' or None (the first that works here); `info`: the file's :func:`~mvit_zoo.data.reader.probe`,
    where the caller has it.
    """
    info = info or probe(path, backend)
    clips = sampling.clip_indices(info.num_frames, info.fps)
    frames, rows = read_frames(path, [i for clip in clips for i in clip], backend=backend, info=info)
    n = sampling.num_frames
    return frames, [rows[t * n:(t + 1) * n] for t in range(len(clips))], sampling.is_short(info.num_frames, info.fps)
