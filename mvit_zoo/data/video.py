"""Video input for MViT models: decoding (PyAV), temporal sampling and clip transforms.

A video model takes clips of `T` frames taken every `tau` frames (the model's
`pretrained_cfg['num_frames']` and `['sampling_rate']`), laid out as
float tensors of shape `(C, T, H, W)`. This module is shared by
`mvit-zoo finetune` (class folders of video files) and `mvit-zoo predict`.

Decoding needs the optional `av` package (`pip install mvit-zoo[video]`).
"""
from __future__ import annotations

import os
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

__all__ = [
    "VIDEO_EXTENSIONS",
    "is_video_file",
    "read_video",
    "write_video",
    "sample_clip_indices",
    "ClipTransform",
    "load_clip",
    "VideoFolder",
]

VIDEO_EXTENSIONS: Tuple[str, ...] = (
    ".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".ogv", ".gif",
)

PathLike = Union[str, os.PathLike]


def is_video_file(path: PathLike) -> bool:
    """True if the file name has a known video extension."""
    return str(path).lower().endswith(VIDEO_EXTENSIONS)


def _import_av():
    try:
        import av
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            'Video decoding needs PyAV: install it with `pip install "mvit-zoo[video]"` (or `pip install av`).'
        ) from e
    return av


def read_video(path: PathLike) -> np.ndarray:
    """Decode all frames of the first video stream as an RGB `uint8` array `(N, H, W, 3)`."""
    av = _import_av()
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"No video stream in {path}")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    if not frames:
        raise ValueError(f"No frames could be decoded from {path}")
    return np.stack(frames)


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


def sample_clip_indices(
        num_available: int,
        num_frames: int,
        stride: int,
        random_start: bool = False,
        generator: Optional[torch.Generator] = None,
) -> List[int]:
    """Indices of one clip of `num_frames` frames taken every `stride` frames.

    The clip spans `(num_frames - 1) * stride + 1` frames. Its start is drawn uniformly
    (`random_start`, for training) or centred (for evaluation). Videos shorter than the
    span are read from their first frame and the last frame is repeated, as in PySlowFast.
    """
    if num_available < 1:
        raise ValueError("A video needs at least one frame")
    if num_frames < 1 or stride < 1:
        raise ValueError(f"num_frames and stride must be positive, got {num_frames} and {stride}")
    span = (num_frames - 1) * stride + 1
    slack = max(num_available - span, 0)
    if random_start:
        start = int(torch.randint(0, slack + 1, (1,), generator=generator))
    else:
        start = slack // 2
    return [min(start + i * stride, num_available - 1) for i in range(num_frames)]


_INTERPOLATION = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
}


class ClipTransform:
    """Spatial transform applied identically to every frame of a clip.

    `size` is the output (H, W), or a model input size ending in them (`(C, T, H, W)`).
    Input: `uint8` frames `(T, H, W, C)` (numpy or tensor). Output: normalised float
    `(C, T, H, W)`. Training uses a random resized crop (one crop for the whole clip) and
    an optional horizontal flip; evaluation resizes the short side to `size / crop_pct`
    and takes the centre crop. `channel_order='BGR'` reverses the channels for
    checkpoints trained on BGR frames (the mean/std are taken in the model's order).
    """

    def __init__(
            self,
            size: Sequence[int],
            is_training: bool,
            mean: Sequence[float],
            std: Sequence[float],
            crop_pct: float = 1.0,
            interpolation: str = "bilinear",
            scale: Tuple[float, float] = (0.08, 1.0),
            ratio: Tuple[float, float] = (3 / 4, 4 / 3),
            hflip: float = 0.5,
            channel_order: str = "RGB",
    ) -> None:
        self.size = tuple(size[-2:])  # (H, W), also from a model input size (C, T, H, W)
        self.is_training = is_training
        self.channel_order = channel_order.upper()
        if self.channel_order not in ("RGB", "BGR"):
            raise ValueError(f"channel_order must be RGB or BGR, got {channel_order}")
        interp = _INTERPOLATION[interpolation] if isinstance(interpolation, str) else interpolation
        if is_training:
            spatial = [v2.RandomResizedCrop(self.size, scale=scale, ratio=ratio, interpolation=interp, antialias=True)]
            if hflip > 0:
                spatial.append(v2.RandomHorizontalFlip(hflip))
        else:
            if self.size[0] == self.size[1]:
                resize: Union[int, Tuple[int, int]] = int(self.size[0] / crop_pct)
            else:
                resize = tuple(int(s / crop_pct) for s in self.size)
            spatial = [v2.Resize(resize, interpolation=interp, antialias=True), v2.CenterCrop(self.size)]
        self.spatial = v2.Compose(spatial)
        self.normalize = v2.Normalize(mean=list(mean), std=list(std))

    def __call__(self, frames: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
        clip = torch.as_tensor(np.asarray(frames)).permute(0, 3, 1, 2)  # T, C, H, W
        if self.channel_order == "BGR":
            clip = clip.flip(1)
        clip = self.spatial(clip)  # one set of random parameters for all frames
        clip = self.normalize(clip.float().div_(255))
        return clip.permute(1, 0, 2, 3).contiguous()  # C, T, H, W

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, training={self.is_training}, {self.spatial}, {self.normalize})"


def load_clip(
        path: PathLike,
        num_frames: int,
        stride: int,
        random_start: bool = False,
        transform: Optional[Callable[[np.ndarray], torch.Tensor]] = None,
) -> Union[np.ndarray, torch.Tensor]:
    """Decode a video and return one clip: `(T, H, W, 3)` uint8, or `transform` of it."""
    frames = read_video(path)
    clip = frames[sample_clip_indices(len(frames), num_frames, stride, random_start=random_start)]
    return transform(clip) if transform is not None else clip


class VideoFolder(Dataset):
    """Video classification dataset: a list of `(path, class_index)` samples.

    Build it from a `root/<class>/<video>` tree with :meth:`from_root`, or from an explicit
    sample list (e.g. a held-out split). Each item is `(clip, target)` with `clip` as
    returned by `transform` (`(C, T, H, W)` for :class:`ClipTransform`).
    """

    def __init__(
            self,
            samples: Sequence[Tuple[str, int]],
            num_frames: int,
            stride: int,
            random_start: bool = False,
            transform: Optional[Callable[[np.ndarray], torch.Tensor]] = None,
            classes: Optional[Sequence[str]] = None,
    ) -> None:
        self.samples = list(samples)
        self.targets = [target for _, target in self.samples]
        self.num_frames = num_frames
        self.stride = stride
        self.random_start = random_start
        self.transform = transform
        self.classes = list(classes) if classes is not None else None

    @classmethod
    def from_root(cls, root: PathLike, num_frames: int, stride: int, **kwargs) -> VideoFolder:
        """Scan `root/<class>/*` for video files; classes are the sorted folder names."""
        from torchvision.datasets.folder import find_classes, make_dataset
        classes, class_to_idx = find_classes(str(root))
        samples = make_dataset(str(root), class_to_idx, extensions=VIDEO_EXTENSIONS)
        return cls(samples, num_frames, stride, classes=classes, **kwargs)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[Union[np.ndarray, torch.Tensor], int]:
        path, target = self.samples[index]
        clip = load_clip(path, self.num_frames, self.stride, random_start=self.random_start, transform=self.transform)
        return clip, target

