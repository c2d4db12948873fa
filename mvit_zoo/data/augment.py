"""Training clip augmentation as SlowFast trains MViTv2: one set of random parameters per clip.

The steps and their order are those of SlowFast's `Kinetics.__getitem__` / `utils.aug_frame`
training path:

1. RandAugment (timm's `rand_augment_transform`, e.g. `rand-m7-n4-mstd0.5-inc1`, translations
   relative to `0.45 x` the short side, `interpolation` for the geometric ops) on the uint8
   frames: the ops and magnitudes are drawn once and every frame gets the same ones;
2. scaling to [0, 1], the channel order (`BGR` reverses it, as SlowFast's
   `DATA.REVERSE_INPUT_CHANNEL`, after RandAugment) and normalisation by `mean`/`std`;
3. the spatial crop, the same box for every frame: an Inception-style random resized crop
   (`crop_mode='resized'`: area `scale` and log-uniform aspect `ratio` of the frame, 10 tries
   then a centre crop; `DATA.TRAIN_JITTER_SCALES_RELATIVE`/`_ASPECT_RELATIVE`) or SlowFast's
   short-side jitter (`crop_mode='jitter'`: short side drawn from `jitter_scales`, uniformly or,
   with `inverse_uniform`, uniformly in 1/size; then a random `size` crop), resized with bilinear
   interpolation and no antialiasing (`F.interpolate`, as SlowFast);
4. a horizontal flip of the whole clip with probability `hflip`;
5. random erasing with probability `re_prob`: one box (area 2-33 %, aspect 0.3-3.3) for every
   frame, filled in `re_mode` 'pixel' (per-pixel normal noise), 'rand' (a normal colour) or
   'const' (zero, the mean) — SlowFast's `RandomErasing(cube=True)`, which draws the fill of each
   frame anew.

Input: `(T, H, W, 3)` uint8 frames (numpy or tensor). Output: float `(C, T, h, w)` with `(h, w) = size`.
Every draw comes from one `random.Random` per clip (:class:`~mvit_zoo.data.video.VideoClips` makes
one for each augmented clip), so a clip is reproduced from its seed.
"""
from __future__ import annotations

import math
import random
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["ClipRandAugment", "TrainClipTransform", "erase_box", "jitter_crop_params", "resized_crop_params"]

Box = Tuple[int, int, int, int]  # top, left, height, width


class ClipRandAugment:
    """timm's RandAugment with one draw of ops and magnitudes per clip, applied to every frame.

    timm's RandAugment draws its ops from NumPy's global generator and their probabilities,
    magnitudes and signs from Python's; here both are seeded from `seed` before each frame (and
    restored after the clip), so each frame replays the same draws: the frames get the same ops
    with the same magnitudes, as SlowFast's video `AugmentOp` does for a list of frames.
    """

    def __init__(self, config: str, interpolation: str = "bicubic") -> None:
        if not config.startswith("rand"):
            raise ValueError(f"auto_augment {config!r}: only RandAugment policies ('rand-m7-n4-mstd0.5-inc1') "
                             "are defined for video clips")
        self.config = config
        self.interpolation = interpolation
        self._transforms: Dict[int, object] = {}  # by the short side, which sets the translation size

    def transform_for(self, height: int, width: int):
        """timm's RandAugment for `height x width` frames (translations up to 0.45 of the short side)."""
        from timm.data.auto_augment import rand_augment_transform
        from timm.data.transforms import str_to_pil_interp

        short = min(height, width)
        if short not in self._transforms:
            hparams = {"translate_const": int(short * 0.45), "interpolation": str_to_pil_interp(self.interpolation)}
            self._transforms[short] = rand_augment_transform(self.config, hparams)
        return self._transforms[short]

    def __call__(self, frames: np.ndarray, seed: int) -> np.ndarray:
        """`(T, H, W, 3)` uint8 -> `(T, H, W, 3)` uint8, every frame augmented with the draws of `seed`."""
        from PIL import Image

        transform = self.transform_for(*frames.shape[1:3])
        saved = random.getstate(), np.random.get_state()
        try:
            out = []
            for frame in frames:
                random.seed(seed)
                np.random.seed(seed)
                out.append(np.asarray(transform(Image.fromarray(frame))))
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
        return np.stack(out)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r}, interpolation={self.interpolation!r})"


def resized_crop_params(height: int, width: int, scale: Tuple[float, float], ratio: Tuple[float, float],
                        rng: random.Random) -> Box:
    """Box of an Inception-style random resized crop (SlowFast's `_get_param_spatial_crop`).

    Area `scale` of the frame and aspect (w/h) log-uniform in `ratio`; 10 tries, then the
    centre crop of the frame clamped to `ratio`.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = rng.uniform(*scale) * area
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def jitter_crop_params(height: int, width: int, jitter_scales: Tuple[int, int], size: Tuple[int, int],
                       inverse_uniform: bool, rng: random.Random) -> Tuple[Tuple[int, int], Box]:
    """Resized `(H, W)` and crop box of SlowFast's `random_short_side_scale_jitter` + `random_crop`.

    The short side is drawn uniformly in `jitter_scales` (or its reciprocal uniformly in
    `[1 / max, 1 / min]`) and rounded; the long side keeps the aspect, rounded down. The crop
    offset is drawn in `[0, resized - size)` (SlowFast's `np.random.randint`: the last offset is
    never drawn).
    """
    low, high = jitter_scales
    if inverse_uniform:
        short = int(round(1.0 / rng.uniform(1.0 / high, 1.0 / low)))
    else:
        short = int(round(rng.uniform(low, high)))
    if width <= height:
        resized = (height if width == short else int(math.floor(height / width * short)), short)
    else:
        resized = (short, width if height == short else int(math.floor(width / height * short)))
    if resized[0] < size[0] or resized[1] < size[1]:
        raise ValueError(f"jitter_scales {jitter_scales} resize a {height}x{width} frame to {resized[0]}x{resized[1]}, "
                         f"smaller than the {size[0]}x{size[1]} crop: raise jitter_scales to at least the crop size")
    top = rng.randrange(0, resized[0] - size[0]) if resized[0] > size[0] else 0
    left = rng.randrange(0, resized[1] - size[1]) if resized[1] > size[1] else 0
    return resized, (top, left, size[0], size[1])


def erase_box(height: int, width: int, probability: float, rng: random.Random, min_area: float = 0.02,
              max_area: float = 1 / 3, min_aspect: float = 0.3) -> Optional[Box]:
    """Box of random erasing (SlowFast's / timm's `RandomErasing`, one box), or None (not erased).

    Erases with `probability`; area uniform in `[min_area, max_area]` of the frame, aspect (h/w)
    log-uniform in `[min_aspect, 1 / min_aspect]`; 100 tries as SlowFast's `_erase_cube`.
    """
    if rng.random() > probability:
        return None
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    for _ in range(100):
        target_area = rng.uniform(min_area, max_area) * height * width
        aspect = math.exp(rng.uniform(*log_aspect))
        h = int(round(math.sqrt(target_area * aspect)))
        w = int(round(math.sqrt(target_area / aspect)))
        if w < width and h < height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    return None


class TrainClipTransform:
    """SlowFast's MViTv2 training augmentation of one clip (see the module's docstring for the steps).

    `size` is the output `(H, W)` (or a model input size ending in them). `auto_augment=None`,
    `hflip=0` and `re_prob=0` turn those steps off. `mean`/`std` are in the model's channel order.
    """

    def __init__(
            self,
            size: Sequence[int],
            mean: Sequence[float],
            std: Sequence[float],
            crop_mode: str = "resized",
            scale: Tuple[float, float] = (0.08, 1.0),
            ratio: Tuple[float, float] = (0.75, 1.3333),
            jitter_scales: Tuple[int, int] = (256, 320),
            inverse_uniform: bool = False,
            hflip: float = 0.5,
            auto_augment: Optional[str] = "rand-m7-n4-mstd0.5-inc1",
            interpolation: str = "bicubic",
            re_prob: float = 0.25,
            re_mode: str = "pixel",
            channel_order: str = "RGB",
    ) -> None:
        self.size = (int(size[-2]), int(size[-1]))
        if crop_mode not in ("resized", "jitter"):
            raise ValueError(f"crop_mode must be 'resized' (random resized crop) or 'jitter' (short-side jitter + "
                             f"random crop), got {crop_mode!r}")
        if re_mode not in ("pixel", "rand", "const"):
            raise ValueError(f"re_mode must be 'pixel', 'rand' or 'const', got {re_mode!r}")
        self.channel_order = channel_order.upper()
        if self.channel_order not in ("RGB", "BGR"):
            raise ValueError(f"channel_order must be RGB or BGR, got {channel_order}")
        if not (scale[0] <= scale[1] and ratio[0] <= ratio[1] and jitter_scales[0] <= jitter_scales[1]):
            raise ValueError(f"scale {scale}, ratio {ratio} and jitter_scales {jitter_scales} must be (low, high)")
        self.crop_mode = crop_mode
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.jitter_scales = tuple(jitter_scales)
        self.inverse_uniform = inverse_uniform
        self.hflip = hflip
        self.rand_augment = ClipRandAugment(auto_augment, interpolation) if auto_augment else None
        self.re_prob = re_prob
        self.re_mode = re_mode
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, frames: Union[np.ndarray, torch.Tensor], rng: Optional[random.Random] = None) -> torch.Tensor:
        """`(T, H, W, 3)` uint8 -> `(C, T, h, w)` float; `rng=None` draws a generator from Python's global one."""
        frames = frames.numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"expected uint8 frames of shape (T, H, W, 3), got {frames.dtype} {frames.shape}")
        rng = rng if rng is not None else random.Random(random.getrandbits(64))
        if self.rand_augment is not None:
            frames = self.rand_augment(frames, seed=rng.getrandbits(32))
        clip = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # T, C, H, W uint8
        clip = self._crop(clip, rng)
        if self.hflip > 0 and rng.random() < self.hflip:
            clip = clip.flip(-1)
        if self.re_prob > 0:
            clip = self._erase(clip, rng)
        return clip.permute(1, 0, 2, 3).contiguous()  # C, T, H, W

    def _normalize(self, clip: torch.Tensor) -> torch.Tensor:
        """uint8 `(T, C, H, W)` -> float, in the model's channel order, normalised."""
        clip = clip.float().div_(255)
        if self.channel_order == "BGR":
            clip = clip.flip(1)
        return (clip - self.mean) / self.std

    def _crop(self, clip: torch.Tensor, rng: random.Random) -> torch.Tensor:
        """Normalise and crop uint8 `(T, C, H, W)` frames to float `(T, C, h, w)`.

        NOTE: SlowFast normalises, then crops. A bilinear resize is an average with weights that sum to
        one, so normalising the cut box instead gives the same values (to float rounding) without a
        float copy of the whole frames (177 MB for 16 frames of 720p)
        """
        height, width = clip.shape[-2:]
        if self.crop_mode == "resized":
            top, left, h, w = resized_crop_params(height, width, self.scale, self.ratio, rng)
            return _resize(self._normalize(clip[..., top:top + h, left:left + w]), self.size)
        resized, (top, left, h, w) = jitter_crop_params(height, width, self.jitter_scales, self.size,
                                                        self.inverse_uniform, rng)
        return _resize(self._normalize(clip), resized)[..., top:top + h, left:left + w]

    def _erase(self, clip: torch.Tensor, rng: random.Random) -> torch.Tensor:
        box = erase_box(*clip.shape[-2:], self.re_prob, rng)
        if box is None:
            return clip
        top, left, h, w = box
        frames, channels = clip.shape[:2]
        if self.re_mode == "const":
            fill = torch.zeros(frames, channels, 1, 1)
        else:
            generator = torch.Generator().manual_seed(rng.getrandbits(63))
            shape = (frames, channels, h, w) if self.re_mode == "pixel" else (frames, channels, 1, 1)
            fill = torch.randn(shape, generator=generator)
        clip[..., top:top + h, left:left + w] = fill
        return clip

    def __repr__(self) -> str:
        crop = (f"resized(scale={self.scale}, ratio={self.ratio})" if self.crop_mode == "resized" else
                f"jitter({self.jitter_scales}, inverse_uniform={self.inverse_uniform})")
        return (f"{type(self).__name__}(size={self.size}, {self.rand_augment}, {self.channel_order}, crop={crop}, "
                f"hflip={self.hflip}, re_prob={self.re_prob}, re_mode={self.re_mode!r})")


def _resize(clip: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of `(T, C, H, W)` without antialiasing (SlowFast's `F.interpolate`)."""
    if tuple(clip.shape[-2:]) == tuple(size):
        return clip
    return F.interpolate(clip, size=size, mode="bilinear", align_corners=False)
