"""Property-based tests (hypothesis) over input sizes, frame counts and batch sizes, on small configs.

The shape rule: every axis is padded, so stage i of the pyramid has ceil(size / stride_i) positions
per axis, where stride_i is the stage's `feature_info` stride (space: reduction 4, 8, 16, 32; time:
the patch stride, 2, at every stage). Tokens are (B, P + prod(grid), C) with P = 1 class token or 0;
maps drop the class token; logits are (B, num_classes). Anything at or above `min_input_size` works;
anything below it is one clear ValueError.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mvit_zoo
from mvit_zoo.model.mvit import MViT

SMALL: dict[str, Any] = dict(depths=(1, 1, 1, 1), embed_dim=16, num_heads=1)
IMAGE_MODELS = ["mvit_tiny", "mvit_small_cls"]  # without / with a class token
VIDEO_MODELS = ["mvit_v2_s_16x4", "mvit_b_16x4"]  # MViTv2 (relative positions), MViT v1 (absolute)
NUM_CLASSES = 7
PROPERTY = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# tiny models: one torch thread is many times faster than two on a busy 2-core machine (conftest.py)
pytestmark = pytest.mark.usefixtures("single_thread")


@functools.cache
def _model(name: str) -> MViT:
    torch.manual_seed(0)
    size = (4, 32, 32) if name in VIDEO_MODELS else 32
    return mvit_zoo.create_model(name, img_size=size, num_classes=NUM_CLASSES, **SMALL).eval()


@functools.cache
def _backbone(name: str) -> Any:  # timm's FeatureGetterNet
    torch.manual_seed(0)
    size = (4, 32, 32) if name in VIDEO_MODELS else 32
    return mvit_zoo.create_model(name, img_size=size, features_only=True, **SMALL).eval()


def _strides(info: dict, nd: int) -> tuple[int, ...]:
    """Per-axis stride of a feature_info entry: `stride` for video, `reduction` on both axes for images."""
    stride = tuple(info.get("stride", (info["reduction"],) * nd))
    assert len(stride) == nd and stride[-1] == info["reduction"]
    return stride


def _grid(size: tuple[int, ...], stride: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(-(-s // r) for s, r in zip(size, stride))


@st.composite
def _valid_input(draw: st.DrawFn, names: list[str], max_size: int, max_frames: int = 12) -> tuple[str, torch.Size]:
    name = draw(st.sampled_from(names))
    low = _model(name).min_input_size
    batch = draw(st.integers(1, 3))
    size = [draw(st.integers(low[0], max_frames))] if len(low) == 3 else []
    size += [draw(st.integers(low[-2], max_size)), draw(st.integers(low[-1], max_size))]
    return name, torch.Size([batch, 3, *size])


def _check_model(name: str, shape: torch.Size) -> None:
    model = _model(name)
    nd = len(shape) - 2
    x = torch.randn(shape)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        logits = model.forward_head(final)
        alone = model(x[-1:])
    assert logits.shape == (shape[0], NUM_CLASSES)
    torch.testing.assert_close(alone, logits[-1:], atol=1e-5, rtol=1e-4)  # samples do not mix

    assert len(maps) == len(model.feature_info) == 4
    for fmap, info in zip(maps, model.feature_info):
        assert fmap.shape == (shape[0], info["num_chs"]) + _grid(shape[2:], _strides(info, nd))
    last = _grid(shape[2:], _strides(model.feature_info[-1], nd))
    assert final.shape == (shape[0], model.num_prefix_tokens + math.prod(last), model.num_features)


def _check_backbone(name: str, shape: torch.Size) -> None:
    backbone = _backbone(name)
    nd = len(shape) - 2
    with torch.no_grad():
        maps = backbone(torch.randn(shape))
    infos = backbone.feature_info.get_dicts()
    assert [m.shape[1] for m in maps] == backbone.feature_info.channels()
    assert backbone.feature_info.reduction() == [4, 8, 16, 32]
    for fmap, info in zip(maps, infos):
        assert fmap.shape == (shape[0], info["num_chs"]) + _grid(shape[2:], _strides(info, nd))


@PROPERTY
@given(_valid_input(IMAGE_MODELS, max_size=100))
def test_image_shapes_follow_the_stride_rule(case: tuple[str, torch.Size]) -> None:
    _check_model(*case)


@PROPERTY
@given(_valid_input(VIDEO_MODELS, max_size=80))
def test_video_shapes_follow_the_stride_rule(case: tuple[str, torch.Size]) -> None:
    _check_model(*case)


@PROPERTY
@given(_valid_input(IMAGE_MODELS + VIDEO_MODELS, max_size=80))
def test_features_only_maps_match_feature_info(case: tuple[str, torch.Size]) -> None:
    _check_backbone(*case)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(IMAGE_MODELS + VIDEO_MODELS), st.data())
def test_below_the_minimum_is_one_clear_error(name: str, data: st.DataObject) -> None:
    model = _model(name)
    low = model.min_input_size
    size = [data.draw(st.integers(max(m - 8, 0), m + 8), label=f"axis {i}") for i, m in enumerate(low)]
    if all(s >= m for s, m in zip(size, low)):
        shrunk = data.draw(st.integers(0, len(low) - 1), label="shrunk axis")
        size[shrunk] = data.draw(st.integers(0, low[shrunk] - 1), label="shrunk size")
    too_small = [i for i, (s, m) in enumerate(zip(size, low)) if s < m]
    x = torch.zeros((1, 3, *size))
    with pytest.raises(ValueError, match="too small") as info:
        model(x)
    for i in too_small:
        axis = "THW"[-len(low):][i]
        assert f"{axis}={size[i]} (min {low[i]})" in str(info.value)
