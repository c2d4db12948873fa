"""mvit_zoo.data.augment: one set of random parameters per clip, against timm's RandAugment and torchvision's
resized crop, on small generated frames."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from mvit_zoo.data.augment import (
    ClipRandAugment,
    TrainClipTransform,
    erase_box,
    jitter_crop_params,
    resized_crop_params,
)

MEAN, STD = (0.45, 0.45, 0.45), (0.225, 0.225, 0.225)
RA = "rand-m7-n4-mstd0.5-inc1"


def image(height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    """A smooth colour image (so that resampling and colour ops change it visibly)."""
    g = np.random.default_rng(seed)
    small = g.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.BILINEAR))


def repeated(num_frames: int = 4, **kw) -> np.ndarray:
    return np.stack([image(**kw)] * num_frames)


def transform(**kw) -> TrainClipTransform:
    base = dict(size=(32, 32), mean=MEAN, std=STD, auto_augment=None, hflip=0.0, re_prob=0.0)
    return TrainClipTransform(**(base | kw))


ALONE = {
    "rand_augment": dict(auto_augment=RA),
    "resized_crop": dict(crop_mode="resized"),
    "jitter_crop": dict(crop_mode="jitter", jitter_scales=(40, 56)),
    "jitter_inverse": dict(crop_mode="jitter", jitter_scales=(40, 56), inverse_uniform=True),
    "flip": dict(hflip=1.0),
    "erase_const": dict(re_prob=1.0, re_mode="const"),
    "all": dict(auto_augment=RA, hflip=0.5, re_prob=1.0, re_mode="const"),
    "all_bgr": dict(auto_augment=RA, hflip=0.5, re_prob=1.0, re_mode="const", channel_order="BGR"),
}


@pytest.mark.parametrize("name", list(ALONE))
def test_equal_frames_stay_equal(name: str) -> None:
    t = transform(**ALONE[name])
    for seed in range(6):
        out = t(repeated(), random.Random(seed))
        assert out.shape == (3, 4, 32, 32) and out.dtype == torch.float32
        for i in range(1, 4):
            assert torch.equal(out[:, i], out[:, 0]), (name, seed, i)


def test_pixel_erasing_is_one_box_on_every_frame() -> None:
    """SlowFast's cube erasing: the same box on every frame, its noise drawn per frame."""
    t, plain = transform(re_prob=1.0, re_mode="pixel"), transform()
    for seed in range(6):
        frames = repeated()
        changed = t(frames, random.Random(seed)) != plain(frames, random.Random(seed))
        masks = changed.any(0)  # T, H, W
        assert masks[0].any()
        for i in range(1, 4):
            assert torch.equal(masks[i], masks[0])
        ys, xs = masks[0].nonzero(as_tuple=True)
        box = torch.zeros_like(masks[0])
        box[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = True
        assert torch.equal(masks[0], box)  # a rectangle


def test_reproducible_from_the_seed() -> None:
    t = transform(auto_augment=RA, hflip=0.5, re_prob=0.25)
    frames = np.stack([image(seed=s) for s in range(4)])
    a = t(frames, random.Random(7))
    assert torch.equal(a, t(torch.from_numpy(frames), random.Random(7)))
    assert not torch.equal(a, t(frames, random.Random(8)))
    random.seed(3)
    b = t(frames)
    random.seed(3)
    assert torch.equal(b, t(frames))


def test_the_global_generators_are_left_as_they_were() -> None:
    random.seed(1)
    np.random.seed(1)
    expected = random.random(), np.random.rand()
    random.seed(1)
    np.random.seed(1)
    transform(auto_augment=RA)(repeated(), random.Random(0))
    assert (random.random(), np.random.rand()) == expected


def x_gradient(height: int = 48, width: int = 64) -> np.ndarray:
    frame = np.zeros((height, width, 3), np.uint8)
    frame[..., 1] = np.linspace(0, 255, width).astype(np.uint8)[None, :]
    return np.stack([frame] * 2)


@pytest.mark.parametrize("hflip,flipped", [(0.0, {False}), (1.0, {True}), (0.5, {False, True})])
def test_flip_probability(hflip: float, flipped: set) -> None:
    t = transform(hflip=hflip, scale=(0.5, 1.0))
    seen = set()
    for seed in range(40):
        green = t(x_gradient(), random.Random(seed))[1, 0, 16]
        seen.add(bool(green[-1] < green[0]))
    assert seen == flipped


def test_resized_crop_parameters_stay_in_range() -> None:
    rng = random.Random(0)
    height, width = 240, 320
    areas, aspects = [], []
    for _ in range(3000):
        top, left, h, w = resized_crop_params(height, width, (0.08, 1.0), (0.75, 1.3333), rng)
        assert 0 <= top <= height - h and 0 <= left <= width - w and h > 0 and w > 0
        areas.append(h * w / (height * width))
        aspects.append(w / h)
    # rounding h and w to pixels moves the area and aspect by a pixel's worth
    assert 0.08 - 0.01 <= min(areas) < 0.1 and 0.95 < max(areas) <= 1.0
    assert 0.75 - 0.02 <= min(aspects) < 0.78 and 1.3 < max(aspects) <= 1.3333 + 0.02


def test_resized_crop_distribution_matches_torchvision() -> None:
    """Same algorithm as torchvision's RandomResizedCrop.get_params (its own generator): same box statistics."""
    from torchvision.transforms import RandomResizedCrop

    height, width, n = 240, 320, 3000
    rng = random.Random(0)
    ours = np.array([resized_crop_params(height, width, (0.08, 1.0), (0.75, 4 / 3), rng) for _ in range(n)], float)
    torch.manual_seed(0)
    img = torch.zeros(3, height, width)
    theirs = np.array([RandomResizedCrop.get_params(img, [0.08, 1.0], [0.75, 4 / 3]) for _ in range(n)], float)
    for column in range(4):  # top, left, height, width
        assert abs(ours[:, column].mean() - theirs[:, column].mean()) < 0.05 * theirs[:, column].mean() + 2
        assert abs(np.median(ours[:, column]) - np.median(theirs[:, column])) < 0.06 * theirs[:, column].mean() + 2


def test_resized_crop_falls_back_to_the_centre() -> None:
    assert resized_crop_params(10, 100, (0.9, 1.0), (0.75, 1.3333), random.Random(0)) == (0, 43, 10, 13)
    assert resized_crop_params(100, 10, (0.9, 1.0), (0.75, 1.3333), random.Random(0)) == (43, 0, 13, 10)


def test_crop_resize_equals_torchvision_resized_crop() -> None:
    """Crop box resized bilinearly without antialiasing (SlowFast's F.interpolate) = torchvision's resized_crop."""
    frames = np.stack([image(seed=s) for s in range(3)])
    t = transform(crop_mode="resized")
    out = t(frames, random.Random(4))
    top, left, h, w = resized_crop_params(48, 64, (0.08, 1.0), (0.75, 1.3333), random.Random(4))
    clip = (torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255 - 0.45) / 0.225
    expected = TF.resized_crop(clip, top, left, h, w, [32, 32], interpolation=InterpolationMode.BILINEAR,
                               antialias=False)
    torch.testing.assert_close(out.permute(1, 0, 2, 3), expected, atol=1e-5, rtol=0)


def test_jitter_parameters() -> None:
    rng = random.Random(0)
    shorts, shorts_inv = [], []
    for _ in range(2000):
        (h, w), (top, left, ch, cw) = jitter_crop_params(240, 320, (256, 320), (224, 224), False, rng)
        assert 256 <= h <= 320 and w == math.floor(320 / 240 * h) and (ch, cw) == (224, 224)
        assert 0 <= top < max(h - 224, 1) and 0 <= left < w - 224
        shorts.append(h)
        (h, _), _ = jitter_crop_params(240, 320, (256, 320), (224, 224), True, rng)
        shorts_inv.append(h)
    assert min(shorts) == 256 and max(shorts) == 320 and min(shorts_inv) == 256 and max(shorts_inv) == 320
    assert np.mean(shorts_inv) < np.mean(shorts) - 1  # uniform in 1/size favours the small sizes
    with pytest.raises(ValueError, match="jitter_scales"):
        jitter_crop_params(240, 320, (100, 120), (224, 224), False, rng)


def test_erase_box_parameters() -> None:
    rng = random.Random(0)
    boxes = [erase_box(224, 224, 0.25, rng) for _ in range(4000)]
    erased = [b for b in boxes if b is not None]
    assert 0.22 < len(erased) / len(boxes) < 0.28
    for top, left, h, w in erased:
        assert 0 <= top <= 224 - h and 0 <= left <= 224 - w
        assert 0.02 - 0.005 <= h * w / 224 ** 2 <= 1 / 3 + 0.01
        assert 0.3 - 0.05 <= h / w <= 1 / 0.3 + 0.5


def timm_per_frame(frames: np.ndarray, seed: int) -> np.ndarray:
    """timm's own RandAugment on each frame, Python's and NumPy's generators seeded with `seed` before each."""
    from timm.data.auto_augment import rand_augment_transform
    from timm.data.transforms import str_to_pil_interp

    ra = rand_augment_transform(RA, {"translate_const": int(min(frames.shape[1:3]) * 0.45),
                                     "interpolation": str_to_pil_interp("bicubic")})
    out = []
    for frame in frames:
        random.seed(seed)
        np.random.seed(seed)
        out.append(np.asarray(ra(Image.fromarray(frame))))
    return np.stack(out)


def slowfast_list_rand_augment(frames: np.ndarray, seed: int) -> np.ndarray:
    """SlowFast's video RandAugment (slowfast/datasets/rand_augment.py, `RandAugment.__call__` and the list branch of
    `AugmentOp.__call__`): ops and magnitudes drawn once, each op applied to every frame; driving timm's op objects."""
    from timm.data.auto_augment import rand_augment_transform
    from timm.data.transforms import str_to_pil_interp

    ra = rand_augment_transform(RA, {"translate_const": int(min(frames.shape[1:3]) * 0.45),
                                     "interpolation": str_to_pil_interp("bicubic")})
    random.seed(seed)
    np.random.seed(seed)
    images = [Image.fromarray(frame) for frame in frames]
    for op in np.random.choice(ra.ops, ra.num_layers, replace=True):
        if op.prob < 1.0 and random.random() > op.prob:
            continue
        magnitude = random.gauss(op.magnitude, op.magnitude_std) if op.magnitude_std > 0 else op.magnitude
        magnitude = min(10, max(0, magnitude))
        level_args = op.level_fn(magnitude, op.hparams) if op.level_fn is not None else ()
        images = [op.aug_fn(img, *level_args, **op.kwargs) for img in images]
    return np.stack([np.asarray(img) for img in images])


def test_rand_augment_equals_timm_per_frame_and_slowfast_per_clip() -> None:
    frames = np.stack([image(seed=s) for s in range(3)])
    ra = ClipRandAugment(RA, "bicubic")
    changed = 0
    for seed in range(12):
        ours = ra(frames, seed)
        np.testing.assert_array_equal(ours, timm_per_frame(frames, seed))
        np.testing.assert_array_equal(ours, slowfast_list_rand_augment(frames, seed))
        changed += not np.array_equal(ours, frames)
    assert changed >= 10


def test_rand_augment_inside_the_transform() -> None:
    """The transform's RandAugment step is ClipRandAugment seeded by the clip generator's first 32 bits."""
    frames = np.stack([image(seed=s) for s in range(3)])
    out = transform(auto_augment=RA, crop_mode="jitter", jitter_scales=(48, 48), size=(48, 64))(frames,
                                                                                                  random.Random(5))
    augmented = timm_per_frame(frames, random.Random(5).getrandbits(32))
    expected = (torch.from_numpy(augmented).permute(3, 0, 1, 2).float() / 255 - 0.45) / 0.225
    torch.testing.assert_close(out, expected)


def test_bgr_reverses_the_channels_after_rand_augment() -> None:
    """As SlowFast: the colour ops (ColorIncreasing, ContrastIncreasing) weigh R, G and B differently."""
    frames = np.stack([image(seed=s) for s in range(2)])
    for seed in range(40):
        rgb = transform(auto_augment=RA, hflip=0.5)(frames, random.Random(seed))
        bgr = transform(auto_augment=RA, hflip=0.5, channel_order="BGR")(frames, random.Random(seed))
        torch.testing.assert_close(bgr, rgb.flip(0))


@pytest.mark.parametrize("kw,message", [(dict(crop_mode="centre"), "crop_mode"), (dict(re_mode="zero"), "re_mode"),
                                        (dict(channel_order="RBG"), "channel_order"),
                                        (dict(auto_augment="augmix-m5"), "RandAugment"),
                                        (dict(scale=(1.0, 0.08)), "low, high")])
def test_bad_options_are_named(kw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        transform(**kw)


def test_bad_frames_are_named() -> None:
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        transform()(repeated().astype(np.float32))
