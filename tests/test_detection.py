"""Detection adapters (mvit_zoo.detection): the pyramid-size rule, the torchvision backbone and FPN
(FasterRCNN / MaskRCNN train and eval on CPU), the detectron2-style backbone with and without
detectron2, and the video pyramid."""
from __future__ import annotations

import copy
import importlib.util
import math
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import mvit_zoo
from mvit_zoo import detection
from mvit_zoo.detection import MViTBackbone, MViTD2Backbone, MViTFPN, mvit_fpn_backbone, output_size

SMALL = dict(depths=(1, 1, 1, 1), embed_dim=16, num_heads=1)


def _small(name: str = "mvit_tiny", **kw: object) -> mvit_zoo.MViT:
    torch.manual_seed(0)
    return mvit_zoo.create_model(name, **SMALL, **kw).eval()


# --------------------------------------------------------------------------------------------------
# Pyramid sizes: ceil(n / stride), no padding (the rule in the module docstring)
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(32, 32), (33, 97), (100, 131), (250, 333)])
def test_image_pyramid_is_ceil_of_input_over_stride(size: tuple[int, int]) -> None:
    body = MViTBackbone(_small("mvit_small_cls"))
    with torch.no_grad():
        out = body(torch.randn((1, 3) + size))
    expected = {str(i): tuple(math.ceil(n / s) for n in size) for i, s in enumerate((4, 8, 16, 32))}
    assert {k: tuple(v.shape[2:]) for k, v in out.items()} == expected == body.output_sizes(size)


@pytest.mark.parametrize("size", [(2, 32, 32), (7, 45, 70), (5, 64, 33)])
def test_video_pyramid_is_ceil_of_input_over_stride(size: tuple[int, int, int]) -> None:
    body = MViTBackbone(_small("mvit_b_16x4"))
    with torch.no_grad():
        out = body(torch.randn((1, 3) + size))
    T, H, W = size
    expected = {str(i): (math.ceil(T / 2), math.ceil(H / s), math.ceil(W / s)) for i, s in enumerate((4, 8, 16, 32))}
    assert {k: tuple(v.shape[2:]) for k, v in out.items()} == expected == body.output_sizes(size)


def test_output_size_helper() -> None:
    assert output_size((100, 131), (16, 16)) == (7, 9)
    assert output_size((7, 45, 70), (2, 32, 32)) == (4, 2, 3)


def test_too_small_input_is_refused_with_a_hint() -> None:
    with pytest.raises(ValueError, match="too small"):
        MViTBackbone(_small())(torch.randn(1, 3, 31, 64))


# --------------------------------------------------------------------------------------------------
# torchvision-style backbone
# --------------------------------------------------------------------------------------------------

def test_backbone_is_the_models_pyramid() -> None:
    model = _small("mvit_small_cls")
    reference = copy.deepcopy(model)
    body = MViTBackbone(model)
    assert body.names == ["0", "1", "2", "3"] and body.channels == [16, 32, 64, 128]
    assert body.strides == [4, 8, 16, 32] and body.out_channels == 128
    assert [lvl.temporal_stride for lvl in body.levels] == [None] * 4
    assert isinstance(body.model.norm, nn.Identity) and isinstance(body.model.head.fc, nn.Identity)
    x = torch.randn(2, 3, 100, 150)
    with torch.no_grad():
        out = body(x)
        ref = reference.forward_intermediates(x, intermediates_only=True)
    assert list(out) == body.names
    for a, b in zip(out.values(), ref):
        assert torch.equal(a, b)


def test_backbone_out_indices_names_and_level_norm() -> None:
    body = MViTBackbone(_small(), out_indices=(3, 1), names=("c5", "c3"), norm=True)
    assert body.out_indices == [1, 3] and len(body.model.stages) == 4
    assert body.names == ["c3", "c5"] and body.channels == [32, 128] and body.strides == [8, 32]
    assert [type(n).__name__ for n in body.norms] == ["_ChannelNorm", "_ChannelNorm"]
    with torch.no_grad():
        out = body(torch.randn(1, 3, 64, 96))
    assert [tuple(v.shape) for v in out.values()] == [(1, 32, 8, 12), (1, 128, 2, 3)]
    per_pixel = out["c5"].movedim(1, -1)  # LayerNorm over channels: zero mean, unit variance
    torch.testing.assert_close(per_pixel.mean(-1), torch.zeros(1, 2, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(per_pixel.var(-1, unbiased=False), torch.ones(1, 2, 3), atol=1e-3, rtol=0)
    body = MViTBackbone(_small(), out_indices=(0, 1))
    assert len(body.model.stages) == 2  # stages after the last output are dropped
    with pytest.raises(ValueError, match="twice"):
        MViTBackbone(_small(), out_indices=(1, -3))
    with pytest.raises(ValueError, match="one name per"):
        MViTBackbone(_small(), names=("a", "b"))


def test_backbone_from_name_and_from_features_only() -> None:
    body = MViTBackbone("mvit_tiny", out_indices=(2,), drop_path_rate=0.1, **SMALL)
    assert body.channels == [64] and body.model.stages[2].blocks[0].drop_path1.drop_prob > 0
    fm = mvit_zoo.create_model("mvit_tiny", features_only=True, **SMALL)
    assert MViTBackbone(fm).channels == [16, 32, 64, 128]
    with pytest.raises(TypeError):
        MViTBackbone(_small(), pretrained=True)
    with pytest.raises(TypeError):
        MViTBackbone(nn.Linear(2, 2))


# --------------------------------------------------------------------------------------------------
# Video pyramid
# --------------------------------------------------------------------------------------------------

def test_video_pyramid_levels_and_time_pooling() -> None:
    model = _small("mvit_v2_s_16x4")
    body = MViTBackbone(copy.deepcopy(model))
    assert [(lvl.channels, lvl.temporal_stride, lvl.stride) for lvl in body.levels] == [
        (16, 2, 4), (32, 2, 8), (64, 2, 16), (128, 2, 32)]
    x = torch.randn(1, 3, 6, 64, 96)
    with torch.no_grad():
        maps = body(x)
        avg = MViTBackbone(copy.deepcopy(model), time_pool="avg")
        mx = MViTBackbone(copy.deepcopy(model), time_pool="max")
        avg_out, max_out = avg(x), mx(x)
    assert [tuple(m.shape) for m in maps.values()] == [(1, 16, 3, 16, 24), (1, 32, 3, 8, 12), (1, 64, 3, 4, 6),
                                                        (1, 128, 3, 2, 3)]
    assert [lvl.temporal_stride for lvl in avg.levels] == [None] * 4
    assert avg.output_sizes((6, 64, 96))["3"] == (2, 3)
    for k in maps:
        torch.testing.assert_close(avg_out[k], maps[k].mean(2))
        torch.testing.assert_close(max_out[k], maps[k].amax(2))
    with pytest.raises(ValueError, match="video"):
        MViTBackbone(_small(), time_pool="avg")
    with pytest.raises(ValueError, match="time_pool"):
        MViTFPN(body)


def test_video_time_pooled_pyramid_feeds_a_2d_fpn() -> None:
    fpn = MViTFPN(MViTBackbone(_small("mvit_b_16x4"), time_pool="avg"), out_channels=24)
    with torch.no_grad():
        out = fpn(torch.randn(1, 3, 4, 64, 64))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "0": (1, 24, 16, 16), "1": (1, 24, 8, 8), "2": (1, 24, 4, 4), "3": (1, 24, 2, 2), "pool": (1, 24, 1, 1)}


# --------------------------------------------------------------------------------------------------
# torchvision detection models
# --------------------------------------------------------------------------------------------------

_FAST = dict(  # no resizing of the 96x160 images, small proposal/sample counts: a short CPU step
    min_size=96, max_size=160, rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
    rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50, rpn_batch_size_per_image=64,
    box_batch_size_per_image=64, box_detections_per_img=20,
)


def _synthetic_set(masks: bool = False) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Two non-square images (96x160) with boxes around bright rectangles."""
    g = torch.Generator().manual_seed(0)
    images, targets = [], []
    for boxes, labels in [([[10, 20, 60, 80]], [1]), ([[50, 10, 150, 50], [5, 5, 40, 40]], [2, 1])]:
        img = 0.1 * torch.rand(3, 96, 160, generator=g)
        mask = torch.zeros(len(boxes), 96, 160, dtype=torch.uint8)
        for i, (x0, y0, x1, y1) in enumerate(boxes):
            img[:, y0:y1, x0:x1] += 0.8
            mask[i, y0:y1, x0:x1] = 1
        target = dict(boxes=torch.tensor(boxes, dtype=torch.float32), labels=torch.tensor(labels))
        if masks:
            target["masks"] = mask
        images.append(img)
        targets.append(target)
    return images, targets


def _small_box_head(channels: int, num_classes: int = 3) -> dict[str, nn.Module]:
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

    return dict(box_head=TwoMLPHead(channels * 7 * 7, 128), box_predictor=FastRCNNPredictor(128, num_classes))


def test_faster_rcnn_trains_and_evaluates_on_cpu() -> None:
    from torchvision.models.detection import FasterRCNN

    torch.manual_seed(0)
    backbone = mvit_fpn_backbone("mvit_tiny", out_channels=32, **SMALL)
    assert backbone.out_channels == 32
    model = FasterRCNN(backbone, **_small_box_head(32), **_FAST)
    images, targets = _synthetic_set()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    losses = []
    for _ in range(5):
        loss_dict = model(images, targets)
        loss = sum(loss_dict.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0], losses
    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2
    for det in detections:
        assert det["boxes"].shape[1] == 4 and det["boxes"].shape[0] == det["scores"].shape[0] == det["labels"].shape[0]


def test_mask_rcnn_runs_a_training_step_and_eval() -> None:
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

    torch.manual_seed(0)
    model = MaskRCNN(mvit_fpn_backbone(_small(), out_channels=32), **_small_box_head(32),
                     mask_head=MaskRCNNHeads(32, (32, 32), 1), mask_predictor=MaskRCNNPredictor(32, 32, 3), **_FAST)
    images, targets = _synthetic_set(masks=True)
    model.train()
    loss_dict = model(images, targets)
    assert "loss_mask" in loss_dict and all(torch.isfinite(v) for v in loss_dict.values())
    sum(loss_dict.values()).backward()
    assert model.backbone.body.model.patch_embed.proj.weight.grad is not None
    model.eval()
    with torch.no_grad():
        det = model(images[:1])[0]
    assert det["masks"].shape[1:] == (1, 96, 160)


def test_single_level_backbone_works_without_fpn() -> None:
    """`out_channels` lets torchvision's heads read one pyramid level directly."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    body = MViTBackbone(_small(), out_indices=(2,))
    model = FasterRCNN(body, rpn_anchor_generator=AnchorGenerator(((32, 64),), ((0.5, 1.0, 2.0),)),
                       box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2), **_small_box_head(body.out_channels),
                       **_FAST).eval()
    with torch.no_grad():
        assert len(model(_synthetic_set()[0])) == 2


def test_fpn_grad_checkpointing_same_outputs_and_grads() -> None:
    fpn = mvit_fpn_backbone(_small(), out_channels=16).train()
    x = torch.randn(1, 3, 64, 96)

    def run(enable: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        fpn.set_grad_checkpointing(enable)
        fpn.zero_grad()
        out = fpn(x)
        sum(v.square().mean() for v in out.values()).backward()
        return [v.detach() for v in out.values()], [p.grad.clone() for p in fpn.parameters() if p.grad is not None]

    out, grads = run(False)
    out_ckpt, grads_ckpt = run(True)
    assert all(stage.grad_checkpointing for stage in fpn.body.model.stages)
    for a, b in zip(out + grads, out_ckpt + grads_ckpt):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# detectron2-style backbone
# --------------------------------------------------------------------------------------------------

def test_d2_backbone_without_detectron2() -> None:
    assert not detection.HAS_DETECTRON2 and "detectron2" not in sys.modules
    backbone = MViTD2Backbone(_small("mvit_small_cls"), norm=True)
    assert backbone.output_shape() == {
        "scale2": detection.ShapeSpec(channels=16, stride=4), "scale3": detection.ShapeSpec(channels=32, stride=8),
        "scale4": detection.ShapeSpec(channels=64, stride=16), "scale5": detection.ShapeSpec(channels=128, stride=32)}
    assert backbone.size_divisibility == 32
    assert backbone.padding_constraints == {"size_divisibility": 32, "square_size": 0}
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 96, 160))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "scale2": (1, 16, 24, 40), "scale3": (1, 32, 12, 20), "scale4": (1, 64, 6, 10), "scale5": (1, 128, 3, 5)}
    sub = MViTD2Backbone(_small(), out_features=("scale5", "scale3"), size_divisibility=0)
    assert list(sub.output_shape()) == ["scale3", "scale5"] and sub.size_divisibility == 0
    with pytest.raises(ValueError, match="out_features"):
        MViTD2Backbone(_small(), out_features=("res4",))
    with pytest.raises(ValueError, match="image models"):
        MViTD2Backbone(_small("mvit_v2_s_16x4"))


class _Registry:
    def __init__(self) -> None:
        self.fns: dict[str, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.fns

    def register(self, fn: object) -> object:
        assert fn.__name__ not in self.fns
        self.fns[fn.__name__] = fn
        return fn


def _fake_detectron2(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    """The detectron2 names this module uses: Backbone, ShapeSpec, BACKBONE_REGISTRY, CfgNode, FPN."""

    class Backbone(nn.Module):
        pass

    class FPN(nn.Module):
        def __init__(self, bottom_up: nn.Module, in_features: list[str], out_channels: int, **kw: object) -> None:
            super().__init__()
            self.bottom_up, self.in_features, self.out_channels, self.kw = bottom_up, in_features, out_channels, kw

    class LastLevelMaxPool(nn.Module):
        pass

    fake = types.SimpleNamespace(Backbone=Backbone, FPN=FPN, registry=_Registry(), ShapeSpec=detection.ShapeSpec)
    modules = {
        "detectron2": {},
        "detectron2.layers": dict(ShapeSpec=fake.ShapeSpec),
        "detectron2.modeling": dict(Backbone=Backbone, BACKBONE_REGISTRY=fake.registry),
        "detectron2.modeling.backbone": {},
        "detectron2.modeling.backbone.fpn": dict(FPN=FPN, LastLevelMaxPool=LastLevelMaxPool),
        "detectron2.config": dict(CfgNode=types.SimpleNamespace),
    }
    for name, attrs in modules.items():
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, module)
    return fake


def test_d2_backbone_registers_with_detectron2(monkeypatch: pytest.MonkeyPatch) -> None:
    """With detectron2 importable, the backbone is a detectron2 Backbone and both builders are registered."""
    fake = _fake_detectron2(monkeypatch)
    create = mvit_zoo.model.registry.create_model  # the builders create cfg.MODEL.MVIT_ZOO.NAME; keep it small here
    monkeypatch.setattr(mvit_zoo.model.registry, "create_model", lambda name, **kw: create(name, **SMALL, **kw))
    spec = importlib.util.spec_from_file_location("mvit_zoo._detection_with_d2", Path(detection.__file__))
    assert spec is not None and spec.loader is not None
    d2_detection = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, d2_detection)
    spec.loader.exec_module(d2_detection)

    assert d2_detection.HAS_DETECTRON2
    assert set(fake.registry.fns) == {"build_mvit_zoo_backbone", "build_mvit_zoo_fpn_backbone"}
    assert issubclass(d2_detection.MViTD2Backbone, fake.Backbone)

    ns = types.SimpleNamespace
    cfg = ns(MODEL=ns(FPN=ns(IN_FEATURES=["scale2", "scale3", "scale4", "scale5"], OUT_CHANNELS=64, NORM="",
                             FUSE_TYPE="sum")), INPUT=ns())
    d2_detection.add_mvit_zoo_config(cfg)
    assert cfg.MODEL.MVIT_ZOO.NAME == "mvit_tiny" and cfg.INPUT.FORMAT == "RGB"
    cfg.MODEL.MVIT_ZOO.PRETRAINED = False
    cfg.MODEL.MVIT_ZOO.OUT_FEATURES = ["scale3", "scale4", "scale5"]
    backbone = fake.registry.fns["build_mvit_zoo_backbone"](cfg, fake.ShapeSpec(channels=3))
    assert isinstance(backbone, fake.Backbone)
    assert {k: (v.channels, v.stride) for k, v in backbone.output_shape().items()} == {
        "scale3": (32, 8), "scale4": (64, 16), "scale5": (128, 32)}
    assert isinstance(backbone.body.norms[0], nn.LayerNorm)  # NORM defaults to True, as detectron2's MViTv2
    fpn = fake.registry.fns["build_mvit_zoo_fpn_backbone"](cfg, fake.ShapeSpec(channels=3))
    assert isinstance(fpn.bottom_up, d2_detection.MViTD2Backbone) and fpn.out_channels == 64
