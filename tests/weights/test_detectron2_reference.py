"""The `mvit_*_det` backbones, `MViTFPN` and torchvision's Mask R-CNN heads against detectron2's own modules
(`modeling/backbone/mvit.py`, `modeling/backbone/fpn.py`, the RPN, box and mask heads), on the same random weights
carried over by `convert_detectron2_detector`.

detectron2 has no wheel on PyPI, so these tests skip unless it can be imported. Its MViT and FPN are plain
Python: a source checkout on PYTHONPATH with fvcore, iopath and omegaconf installed is enough
(`PYTHONPATH=/path/to/detectron2 pytest tests/weights/test_detectron2_reference.py`).
"""
from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn
from torchvision.models.convnext import LayerNorm2d

from mvit_zoo.detection import MViTBackbone, MViTFPN
from mvit_zoo.weights.detectron2 import convert_detectron2_detector

d2_mvit = pytest.importorskip("detectron2.modeling.backbone.mvit", reason="detectron2 is not importable")
d2_fpn = pytest.importorskip("detectron2.modeling.backbone.fpn", reason="detectron2 is not importable")

pytestmark = pytest.mark.usefixtures("single_thread")
FEATURES = ["scale2", "scale3", "scale4", "scale5"]
# the MViT arguments of each architecture's detectron2 configs (projects/MViTv2/configs, projects/ViTDet/configs)
CONFIGS = {
    "mvit_tiny_det": dict(embed_dim=96, depth=10, num_heads=1, last_block_indexes=(0, 2, 7, 9)),
    "mvit_small_det": dict(embed_dim=96, depth=16, num_heads=1, last_block_indexes=(0, 2, 13, 15)),
    "mvit_base_det": dict(embed_dim=96, depth=24, num_heads=1, last_block_indexes=(1, 4, 20, 23)),
    "mvit_large_det": dict(embed_dim=144, depth=48, num_heads=2, last_block_indexes=(1, 7, 43, 47)),
    "mvit_huge_det": dict(embed_dim=192, depth=80, num_heads=3, last_block_indexes=(3, 11, 71, 79)),
}


def d2_detector_backbone(arch: str, fpn_norm: str) -> nn.Module:
    """detectron2's FPN(MViT) as its configs build it (residual pooling, LayerNorm eps 1e-6, max-pool P6), with
    random weights: norm scales and biases away from 1 and 0, rel-pos tables non-zero."""
    torch.manual_seed(0)
    mvit = d2_mvit.MViT(**CONFIGS[arch], residual_pooling=True, drop_path_rate=0.0,
                        norm_layer=partial(nn.LayerNorm, eps=1e-6), out_features=tuple(FEATURES))
    fpn = d2_fpn.FPN(bottom_up=mvit, in_features=FEATURES, out_channels=256, norm=fpn_norm,
                     top_block=d2_fpn.LastLevelMaxPool())
    with torch.no_grad():
        for p in fpn.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.uniform_(-0.5, 1.5)
    return fpn.eval()


def as_file(fpn: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """The tensors of a detectron2 FPN(MViT) as a detector's model zoo file names them."""
    return {"model": {"backbone." + k: v for k, v in fpn.state_dict().items()}}


def ours_for(arch: str, fpn_norm: str) -> MViTFPN:
    """Ours, with detectron2's channel LayerNorm (eps 1e-6) in the FPN for 'LN'."""
    norm = partial(LayerNorm2d, eps=1e-6) if fpn_norm == "LN" else None
    return MViTFPN(MViTBackbone(arch), norm_layer=norm).eval()


@pytest.mark.parametrize("arch, fpn_norm, size", [
    ("mvit_tiny_det", "", (224, 224)),  # projects/MViTv2's FPN; windows cover the grid exactly
    ("mvit_tiny_det", "LN", (256, 320)),  # ViTDet's LN-FPN; padded windows, a non-square image
    ("mvit_base_det", "LN", (192, 288)),  # the doubled K/V stride of the last block of stages 2 and 3
])
def test_pyramid_equals_detectron2(arch: str, fpn_norm: str, size: tuple[int, int]) -> None:
    d2 = d2_detector_backbone(arch, fpn_norm)
    ours = ours_for(arch, fpn_norm)
    ours.load_state_dict(convert_detectron2_detector(as_file(d2), ours), strict=True)
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        ref, out = d2(x), ours(x)
        ref_maps = d2.bottom_up(x)
        maps = ours.body(x)
    for k, name in zip(FEATURES, maps):
        torch.testing.assert_close(maps[name], ref_maps[k], rtol=1e-4, atol=1e-4)
    for k, name in zip(["p2", "p3", "p4", "p5", "p6"], out):
        torch.testing.assert_close(out[name], ref[k], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.slow) if a in ("mvit_large_det", "mvit_huge_det")
                                  else a for a in CONFIGS])
def test_every_tensor_of_detectron2s_backbone_has_its_place(arch: str) -> None:
    """detectron2's own state dict of each size (and its LN-FPN) converts onto ours, strict: same names, same
    shapes, nothing resized (its rel-pos tables are at the 224 pretraining window, as ours)."""
    d2 = d2_detector_backbone(arch, "LN")
    with torch.device("meta"):
        ours = ours_for(arch, "LN")
    sd = convert_detectron2_detector(as_file(d2), ours)
    target = ours.state_dict()
    assert sd.keys() == target.keys() and all(v.shape == target[k].shape for k, v in sd.items())
    assert not sd.report.resized and not sd.report.dropped


@pytest.mark.parametrize("vitdet", [False, True], ids=["mask_rcnn_fpn", "vitdet_ln"])
def test_mask_rcnn_heads_equal_detectron2(vitdet: bool) -> None:
    """RPN, box and mask heads of a detectron2 Mask R-CNN (configs/common/models/mask_rcnn_fpn.py: 1-conv RPN, 2fc
    box head, plain mask head; or ViTDet's: 2-conv RPN, 4conv1fc box head and mask head with LN) give torchvision's
    heads, after conversion, the same outputs on the same inputs, detectron2's last (background) score being
    torchvision's first."""
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.box_regression import Box2BoxTransform
    from detectron2.modeling.proposal_generator.rpn import StandardRPNHead
    from detectron2.modeling.roi_heads.box_head import FastRCNNConvFCHead
    from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
    from detectron2.modeling.roi_heads.mask_head import MaskRCNNConvUpsampleHead
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead as TVConvFCHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
    from torchvision.models.detection.rpn import RPNHead

    norm = "LN" if vitdet else ""
    d2 = d2_detector_backbone("mvit_tiny_det", norm)
    heads = nn.ModuleDict({
        "rpn": StandardRPNHead(in_channels=256, num_anchors=3, conv_dims=[-1, -1] if vitdet else [-1]),
        "box_head": FastRCNNConvFCHead(ShapeSpec(channels=256, height=7, width=7), conv_dims=[256] * 4 if vitdet
                                       else [], fc_dims=[1024] if vitdet else [1024, 1024], conv_norm=norm),
        "box_predictor": FastRCNNOutputLayers(ShapeSpec(channels=1024), box2box_transform=Box2BoxTransform(
            (10.0, 10.0, 5.0, 5.0)), num_classes=80),
        "mask_head": MaskRCNNConvUpsampleHead(ShapeSpec(channels=256, height=14, width=14), num_classes=80,
                                              conv_dims=[256] * 5, conv_norm=norm),
    })
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.uniform_(-0.5, 1.5)
    heads.eval()
    prefix = {"rpn": "proposal_generator.rpn_head.", "box_head": "roi_heads.box_head.",
              "box_predictor": "roi_heads.box_predictor.", "mask_head": "roi_heads.mask_head."}
    file = as_file(d2)
    file["model"].update({prefix[name] + k: v for name, m in heads.items() for k, v in m.state_dict().items()})

    ln = partial(LayerNorm2d, eps=1e-6)
    extra = dict(rpn_head=RPNHead(256, 3, conv_depth=2),
                 box_head=TVConvFCHead((256, 7, 7), [256] * 4, [1024], norm_layer=ln),
                 mask_head=MaskRCNNHeads(256, [256] * 4, 1, norm_layer=ln)) if vitdet else {}
    ours = MaskRCNN(ours_for("mvit_tiny_det", norm), num_classes=81, **extra).eval()
    ours.load_state_dict(convert_detectron2_detector(file, ours), strict=True)

    torch.manual_seed(1)
    maps = [torch.randn(2, 256, 16, 20), torch.randn(2, 256, 8, 10)]
    pooled, mask_pooled = torch.randn(5, 256, 7, 7), torch.randn(5, 256, 14, 14)
    with torch.no_grad():
        (d2_logits, d2_deltas), (logits, deltas) = heads["rpn"](maps), ours.rpn.head(maps)
        d2_scores, d2_boxes = heads["box_predictor"](heads["box_head"](pooled))
        scores, boxes = ours.roi_heads.box_predictor(ours.roi_heads.box_head(pooled))
        d2_masks = heads["mask_head"].layers(mask_pooled)
        masks = ours.roi_heads.mask_predictor(ours.roi_heads.mask_head(mask_pooled))
    for a, b in zip(d2_logits + d2_deltas, logits + deltas):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(scores, torch.cat((d2_scores[:, -1:], d2_scores[:, :-1]), 1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(boxes[:, 4:], d2_boxes, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(masks[:, 1:], d2_masks, rtol=1e-4, atol=1e-5)
