"""`mvit_zoo.data.transforms`: the data config read from a model, and the transforms built from it."""
from __future__ import annotations

import pytest
import torch
from PIL import Image, ImageOps
from timm.data.auto_augment import AugmentOp

import mvit_zoo
from mvit_zoo.data.transforms import DataConfig, build_transform, posterize, resolve_data_config

SMALL = {"depths": (1, 1, 1, 1), "embed_dim": 16, "num_heads": 1}


def test_data_config_follows_the_pretrained_config() -> None:
    """T from the model as built, tau / mean / std / crop from the tag's pretrained config."""
    video = mvit_zoo.create_model("mvit_b_32x3.pv_k400", img_size=(8, 32, 32), **SMALL)
    cfg = resolve_data_config(video)
    assert cfg.is_video and cfg.input_size == (3, 8, 32, 32) and cfg.num_frames == 8
    assert cfg.sampling_rate == 3 and cfg.mean == (0.45, 0.45, 0.45) and cfg.interpolation == "bilinear"
    assert resolve_data_config(video, sampling_rate=2).sampling_rate == 2
    assert cfg.to_dict()["input_size"] == [3, 32, 32]  # timm convention; T is num_frames
    image = resolve_data_config(mvit_zoo.create_model("mvit_tiny.fb_in1k", img_size=48, **SMALL))
    assert not image.is_video and image.input_size == (3, 48, 48) and image.crop_pct == 0.9


def _ops(transform: object) -> list[AugmentOp]:
    rand_augment = next(t for t in transform.transforms if type(t).__name__ == "RandAugment")
    return list(rand_augment.ops)


def test_rand_augment_example_keeps_zero_bits_without_crashing() -> None:
    """The `--aa` example of `finetune --help` ('inc1': posterize keeps 4 down to 0 bits) at full
    magnitude keeps 0 bits: a black image, as Pillow < 13 and the TF reference give (Pillow 13 refuses)."""
    transform = build_transform(DataConfig((3, 32, 32)), True, auto_augment="rand-m9-mstd0.5-inc1")
    op = next(o for o in _ops(transform) if o.name == "PosterizeIncreasing")
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0  # the draw that keeps 0 bits
    img = Image.new("RGB", (8, 8), (200, 120, 40))
    assert op(img).getextrema() == ((0, 0),) * 3
    torch.manual_seed(0)
    assert transform(img).shape == (3, 32, 32)


@pytest.mark.parametrize("bits", range(1, 9))
def test_posterize_matches_pillow_where_pillow_accepts_the_bits(bits: int) -> None:
    img = Image.frombytes("RGB", (16, 16), bytes(range(256)) * 3)
    assert posterize(img, bits).tobytes() == ImageOps.posterize(img, bits).tobytes()
