"""The feature pyramid: timm's feature contract (forward_intermediates, feature_info,
prune_intermediate_layers, features_only) for every registered family, at any input size and frame
count; parity with timm at the build size; gradient checkpointing."""
from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import Tensor, nn

import mvit_zoo
from mvit_zoo import MODEL_CFGS, MViT

SMALL = dict(depths=(1, 1, 1, 1), embed_dim=16, num_heads=1)  # every architecture switch kept
VIDEO = [n for n, c in MODEL_CFGS.items() if c.ndim == 3]
IMAGE = [n for n, c in MODEL_CFGS.items() if c.ndim == 2]
SPATIAL = [(256, 320), (160, 224)]  # larger/non-square and smaller than the 224 build size
SPATIAL_FRAMES = 4  # video spatial sizes are checked on short clips (frame counts have their own test)
SLOW_BUILD = ["mvit_v2_l_40x3"]  # 40 x 312 x 312: ~30 s on 2 CPU cores


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial values everywhere (norm scales and zero-initialised tables too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if (p.ndim == 1 and name.endswith("weight")) else 0.0
            p.copy_(base + 0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def _expected_shapes(feature_info: list[dict], size: tuple[int, ...]) -> list[tuple[int, ...]]:
    """(1, C_i, *ceil(size / stride_i)) per stage: NCHW for images, NCTHW for video."""
    shapes = []
    for info in feature_info:
        strides = info.get("stride", (info["reduction"],) * 2)
        shapes.append((1, info["num_chs"]) + tuple(math.ceil(n / s) for n, s in zip(size, strides)))
    return shapes


def _check_features(fm: nn.Module, size: tuple[int, ...]) -> None:
    with torch.no_grad():
        maps = fm(torch.randn((1, 3) + size))
    info = fm.feature_info.get_dicts()
    assert [tuple(m.shape) for m in maps] == _expected_shapes(info, size), size
    assert all(torch.isfinite(m).all() for m in maps)


@pytest.mark.parametrize("name", IMAGE)
def test_features_only_image_family(name: str) -> None:
    fm = timm.create_model(name, features_only=True, **SMALL).eval()
    assert fm.feature_info.reduction() == [4, 8, 16, 32]
    assert fm.feature_info.channels() == [s[-1].dim_out for s in mvit_zoo.model.mvit.block_specs(fm.model.cfg)]
    for size in [fm.model.img_size] + SPATIAL:
        _check_features(fm, tuple(size))


@pytest.mark.parametrize("name", VIDEO)
def test_features_only_video_family(name: str) -> None:
    fm = timm.create_model(name, features_only=True, **SMALL).eval()
    assert fm.feature_info.reduction() == [4, 8, 16, 32]
    assert [i["stride"] for i in fm.feature_info.get_dicts()] == [(2, 4, 4), (2, 8, 8), (2, 16, 16), (2, 32, 32)]
    sizes = [] if name in SLOW_BUILD else [fm.model.img_size]
    for size in sizes + [(SPATIAL_FRAMES,) + hw for hw in SPATIAL]:
        _check_features(fm, tuple(size))


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW_BUILD)
def test_features_only_video_long_clip_build_size(name: str) -> None:
    fm = timm.create_model(name, features_only=True, **SMALL).eval()
    _check_features(fm, fm.model.img_size)


@pytest.mark.parametrize("name", [n for n in VIDEO if MODEL_CFGS[n].img_size[0] == 16])
@pytest.mark.parametrize("frames", [8, 32])
def test_video_any_frame_count(name: str, frames: int) -> None:
    """A 16-frame model gives its pyramid (time ceil(T / 2)) for 8 and 32 frames."""
    fm = timm.create_model(name, features_only=True, **SMALL).eval()
    assert fm.model.img_size[0] == 16
    _check_features(fm, (frames, 224, 224))


def test_features_only_out_indices_prune_the_model() -> None:
    fm = timm.create_model("mvit_tiny", features_only=True, out_indices=(0, 2), **SMALL).eval()
    assert len(fm.model.stages) == 3 and isinstance(fm.model.norm, nn.Identity)
    assert fm.feature_info.channels() == [16, 64] and fm.feature_info.reduction() == [4, 16]
    _check_features(fm, (96, 160))
    fm = timm.create_model("mvit_v2_s_16x4", features_only=True, out_indices=(-1,), **SMALL).eval()
    assert fm.feature_info.channels() == [128]
    _check_features(fm, (6, 64, 96))


# --------------------------------------------------------------------------------------------------
# forward_intermediates semantics
# --------------------------------------------------------------------------------------------------

def test_forward_intermediates_formats_and_selection() -> None:
    model = _randomize(mvit_zoo.create_model("mvit_small_cls", **SMALL))
    x = torch.randn(2, 3, 96, 160)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        tokens = model.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)
        assert torch.equal(final, model.forward_features(x))
        for m, t in zip(maps, tokens):  # NLC keeps the class token, NCHW drops it
            B, C, H, W = m.shape
            assert t.shape == (B, 1 + H * W, C)
            assert torch.equal(t[:, 1:].reshape(B, H, W, C).permute(0, 3, 1, 2), m)
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert [torch.equal(a, b) for a, b in zip(last_two, maps[2:])] == [True, True]
        early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        assert torch.equal(early[0], maps[1])
        normed = model.forward_intermediates(x, indices=[3], norm=True, intermediates_only=True)[0]
        ref = model.norm(tokens[3])[:, 1:].reshape(2, 3, 5, -1).permute(0, 3, 1, 2)
        torch.testing.assert_close(normed, ref)


def test_video_intermediates_are_ncthw_without_class_token() -> None:
    model = _randomize(mvit_zoo.create_model("mvit_v2_s_16x4", **SMALL))
    x = torch.randn(1, 3, 6, 64, 96)
    with torch.no_grad():
        maps = model.forward_intermediates(x, intermediates_only=True)
        fmt = model.forward_intermediates(x, output_fmt="NCTHW", intermediates_only=True)
        tokens = model.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)
    assert [tuple(m.shape) for m in maps] == [
        (1, 16, 3, 16, 24), (1, 32, 3, 8, 12), (1, 64, 3, 4, 6), (1, 128, 3, 2, 3)]
    assert all(torch.equal(a, b) for a, b in zip(maps, fmt))
    assert [t.shape[1] for t in tokens] == [1 + m[0, 0].numel() for m in maps]


# --------------------------------------------------------------------------------------------------
# Parity with timm at the build size
# --------------------------------------------------------------------------------------------------

def _timm_parity(ref: nn.Module, ours: MViT) -> None:
    """Load timm's (randomly initialised) weights strictly; the pyramid and the final tokens agree."""
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.eval(), ours.eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_final, ref_maps = ref.forward_intermediates(x)
        our_final, our_maps = ours.forward_intermediates(x)
    assert [m.shape for m in our_maps] == [m.shape for m in ref_maps]
    for a, b in zip(our_maps + [our_final], ref_maps + [ref_final]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_timm_parity_mvitv2_tiny() -> None:
    """Full-size mvit_tiny equals timm's mvitv2_tiny at the build size."""
    torch.manual_seed(0)
    _timm_parity(timm.create_model("mvitv2_tiny"), mvit_zoo.create_model("mvit_tiny"))


def _timm_small(cls_token: bool) -> nn.Module:
    """timm's MViTv2 at reduced depth and width (SMALL)."""
    from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg

    torch.manual_seed(0)
    cfg = MultiScaleVitCfg(depths=(1, 1, 1, 1), embed_dim=16, num_heads=1, use_cls_token=cls_token)
    return MultiScaleVit(cfg, img_size=224, num_classes=10)


def test_timm_parity_class_token_small() -> None:
    """mvitv2_small_cls's architecture (class token) at reduced depth and width."""
    _timm_parity(_timm_small(cls_token=True), mvit_zoo.create_model("mvit_small_cls", num_classes=10, **SMALL))


def test_timm_parity_features_only() -> None:
    """features_only wrappers agree too: same feature_info, same out_indices pruning, same maps."""
    from timm.models._features import FeatureGetterNet

    ref = FeatureGetterNet(_timm_small(cls_token=False), out_indices=(1, 2)).eval()
    ours = mvit_zoo.create_model("mvit_tiny", features_only=True, out_indices=(1, 2), num_classes=10, **SMALL)
    ours.model.load_state_dict(ref.model.state_dict(), strict=True)
    assert len(ours.model.stages) == len(ref.model.stages) == 3
    assert ours.feature_info.channels() == ref.feature_info.channels() == [32, 64]
    assert ours.feature_info.reduction() == ref.feature_info.reduction() == [8, 16]
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        for a, b in zip(ours.eval()(x), ref(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_timm_fails_where_we_do_not() -> None:
    """Why this exists: timm's MViTv2 fails at 256x320 (and any size but its build size); ours, with
    the same weights, gives the pyramid."""
    ref = _timm_small(cls_token=True).eval()
    ours = mvit_zoo.create_model("mvit_small_cls", num_classes=10, **SMALL).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 3, 256, 320)
    with torch.no_grad():
        with pytest.raises(Exception):  # noqa: B017
            ref.forward_intermediates(x)
        maps = ours.forward_intermediates(x, intermediates_only=True)
    assert [tuple(m.shape) for m in maps] == _expected_shapes(ours.feature_info, (256, 320))


@pytest.mark.slow
def test_timm_parity_mvitv2_small_cls() -> None:
    torch.manual_seed(0)
    _timm_parity(timm.create_model("mvitv2_small_cls"), mvit_zoo.create_model("mvit_small_cls"))


# --------------------------------------------------------------------------------------------------
# Gradient checkpointing
# --------------------------------------------------------------------------------------------------

def _pyramid_and_grads(model: MViT, x: Tensor, checkpointing: bool) -> tuple[list[Tensor], dict[str, Tensor]]:
    model.set_grad_checkpointing(checkpointing)
    model.zero_grad()
    maps = model.forward_intermediates(x, intermediates_only=True)
    g = torch.Generator().manual_seed(3)
    loss = sum((m * torch.randn(m.shape, generator=g)).sum() for m in maps)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return [m.detach() for m in maps], grads


@pytest.mark.parametrize("name,size", [("mvit_v2_s_16x4", (4, 32, 64))])  # 2D: tests/test_detection.py
def test_grad_checkpointing_same_pyramid_and_grads(name: str, size: tuple[int, ...]) -> None:
    model = _randomize(mvit_zoo.create_model(name, **SMALL)).train()
    x = torch.randn((1, 3) + size)
    maps, grads = _pyramid_and_grads(model, x, checkpointing=False)
    maps_ckpt, grads_ckpt = _pyramid_and_grads(model, x, checkpointing=True)
    assert all(stage.grad_checkpointing for stage in model.stages)
    for a, b in zip(maps, maps_ckpt):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    unused = {"norm.weight", "norm.bias", "head.fc.weight", "head.fc.bias"}  # not on the pyramid's path
    assert grads.keys() == grads_ckpt.keys() == {n for n, _ in model.named_parameters()} - unused
    for n in grads:
        torch.testing.assert_close(grads[n], grads_ckpt[n], rtol=1e-5, atol=1e-6, msg=n)


# --------------------------------------------------------------------------------------------------
# Relative-position tables away from the build size
# --------------------------------------------------------------------------------------------------

def test_resized_rel_pos_tables_follow_weight_updates() -> None:
    """At a non-build size the tables are interpolated (and may be cached per size): repeated calls
    agree, with and without autograd, and an in-place weight update is seen at once."""
    model = _randomize(mvit_zoo.create_model("mvit_v2_s_16x4", **SMALL))
    x = torch.randn(1, 3, 6, 64, 96)

    def pyramid(grad: bool) -> list[Tensor]:
        with torch.set_grad_enabled(grad):
            return [m.detach() for m in model.forward_intermediates(x, intermediates_only=True)]

    first, again, with_grad = pyramid(False), pyramid(False), pyramid(True)
    for a, b, c in zip(first, again, with_grad):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)
    table = model.stages[1].blocks[0].attn.rel_pos_t
    assert table.shape[0] != 2 * 3 - 1  # built for 8 time steps, run at 3: interpolated
    with torch.no_grad():
        table.add_(0.5)
    updated, updated_grad = pyramid(False), pyramid(True)
    assert not torch.allclose(updated[1], first[1])
    for a, b in zip(updated, updated_grad):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# -- torch.fx symbolic tracing ---------------------------------------------------------------------

FX_CASES = [  # every family: v2 image, v2 image with class token, v1 image, v2 video, v1 video
    ("mvit_tiny", (2, 3, 64, 64)),
    ("mvit_small_cls", (2, 3, 64, 64)),
    ("mvit_v1_b_16", (2, 3, 64, 64)),
    ("mvit_v2_s_16x4", (1, 3, 4, 64, 64)),
    ("mvit_b_16x4", (1, 3, 4, 64, 64)),
]


@pytest.mark.parametrize("name,shape", FX_CASES, ids=[c[0] for c in FX_CASES])
def test_fx_feature_extractor_equals_eager_forward_and_backward(name: str, shape: tuple[int, ...]) -> None:
    """timm's fx feature extraction traces the model; the traced module gives the eager logits and
    gradients, and still checks its input (an eager error, not a Proxy TypeError at trace time)."""
    from timm.models._features_fx import create_feature_extractor

    torch.manual_seed(0)
    model = mvit_zoo.create_model(name, img_size=shape[2:], **SMALL).eval()
    traced = create_feature_extractor(model, return_nodes={"head": "out"})
    x = torch.randn(shape)
    x_ref = x.clone().requires_grad_(True)
    x_fx = x.clone().requires_grad_(True)
    ref = model(x_ref)
    out = traced(x_fx)["out"]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    ref.square().sum().backward()
    out.square().sum().backward()
    torch.testing.assert_close(x_fx.grad, x_ref.grad, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="input channels|channels-last|video model"):
        traced(torch.randn(shape[:1] + (5,) + shape[2:]))
