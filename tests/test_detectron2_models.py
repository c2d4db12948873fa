"""`detectron2_detector`: detectron2's model zoo detectors rebuilt on torchvision with their whole files' weights.

The files are random checkpoints in detectron2's layout (tests/weights/test_convert_upstream.py transcribes its
module trees), served by the local fake Hub as the tags' official URLs, for backbones small enough for a CPU
(`depths=(1, 1, 1, 1)`). The reference for every tensor is `convert_detectron2_detector` on the same file."""
from __future__ import annotations

from pathlib import Path

import pytest
import safetensors
import timm
import torch
from torchvision.models.convnext import LayerNorm2d
from torchvision.models.detection import MaskRCNN, MaskRCNN_ResNet50_FPN_Weights
from weights.test_convert_upstream import (_random, d2_backbone_shapes, d2_conv_head_shapes, d2_fpn_shapes,
                                          d2_mask_rcnn_head_shapes, d2_pkl)

from hub_server import HubServer, hub_endpoint
from mvit_zoo.detection import MViTFPN, detectron2_detector
from mvit_zoo.weights.convert import CheckpointMismatchError
from mvit_zoo.weights.detectron2 import convert_detectron2_detector
from mvit_zoo.weights.hub import WeightsUnavailableError

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = dict(depths=(1, 1, 1, 1), embed_dim=(32, 64, 128, 256))  # mvit_tiny_det's design, one block per stage
TINY_FILE = "model_final_1a1c30.pkl"
# COCO's category ids 1..90 leave these out; detectron2 numbers the other 80 contiguously in id order
COCO_UNUSED_IDS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}


def _mask_rcnn_file() -> dict[str, torch.Tensor]:
    """configs/common/models/mask_rcnn_fpn.py around a one-block-per-stage MViTv2-T (`TINY`). NOTE: unit-variance
    random weights blow the features up and every box degenerates; 0.02 is a trained model's scale."""
    shapes = {**d2_backbone_shapes(32, 4, (0, 1, 2, 3)), **d2_fpn_shapes((32, 64, 128, 256)),
              **d2_mask_rcnn_head_shapes()}
    return {k: 0.02 * v for k, v in _random(shapes).items()}


def _cascade_file(embed: int = 32, fpn_norm: bool = False) -> dict[str, torch.Tensor]:
    """A Cascade Mask R-CNN: backbone, FPN, two-conv RPN and the three box heads (LN with the LN FPN, as ViTDet's;
    else BN, as projects/MViTv2's)."""
    shapes = {**d2_backbone_shapes(embed, 4, (0, 1, 2, 3)),
              **d2_fpn_shapes((embed, 2 * embed, 4 * embed, 8 * embed), norm=fpn_norm),
              **d2_conv_head_shapes(norm="LN" if fpn_norm else "BN", cascade=True)}
    return _random(shapes, seed=1)


def _same(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> bool:
    state = model.state_dict()
    return state.keys() == expected.keys() and all(torch.equal(state[k], v) for k, v in expected.items())


def test_mask_rcnn_tag_loads_the_whole_file_once(hub: HubServer, hub_cache: Path) -> None:
    """A bare mvit_tiny_det is its Mask R-CNN tag: the official .pkl is downloaded once, every tensor of the
    torchvision MaskRCNN is the converter's (background score row moved first), the converted copy is cached apart
    from the backbone-only one, and the next call reads it without a request."""
    src = _mask_rcnn_file()
    url = hub.add_static(TINY_FILE, d2_pkl(src))
    small = dict(min_size=160, max_size=160, box_score_thresh=0.0, box_detections_per_img=10)
    detector = detectron2_detector("mvit_tiny_det", pretrained=True, pretrained_cfg_overlay=dict(url=url),
                                   backbone_kwargs=TINY, **small)
    assert isinstance(detector, MaskRCNN) and detector.pretrained_cfg["tag"] == "d2_coco_mask_rcnn"
    expected = convert_detectron2_detector({"model": src}, detectron2_detector("mvit_tiny_det", backbone_kwargs=TINY))
    assert _same(detector, expected)
    cls = detector.roi_heads.box_predictor.cls_score.weight
    assert torch.equal(cls[0], src["roi_heads.box_predictor.cls_score.weight"][-1])
    assert torch.equal(cls[1:], src["roi_heads.box_predictor.cls_score.weight"][:-1])
    assert hub.count("GET", f"/files/{TINY_FILE}") == 1
    converted = sorted((hub_cache / "mvit-zoo").rglob("*.safetensors"))
    assert [p.name.endswith("-detector.safetensors") for p in converted] == [True]
    meta = safetensors.safe_open(str(converted[0]), "pt").metadata()
    assert meta["source_layout"] == "detectron2" and meta["variant"] == "detector" and meta["source_url"] == url

    image = 0.1 * torch.rand(3, 150, 170)
    image[:, 30:100, 40:120] += 0.8
    detector.eval()
    with torch.no_grad():
        found = detector([image])[0]
    assert set(found) == {"boxes", "labels", "scores", "masks"} and len(found["boxes"]) == 10
    assert found["masks"].shape == (10, 1, 150, 170) and found["labels"].shape == found["scores"].shape == (10,)

    hub.reset_requests()
    again = detectron2_detector("mvit_tiny_det.d2_coco_mask_rcnn", pretrained=True,
                                pretrained_cfg_overlay=dict(url=url), backbone_kwargs=TINY)
    assert hub.requests == [] and _same(again, expected)
    # the backbone-only conversion of the same file keeps its own cache file
    backbone = timm.create_model("mvit_tiny_det", pretrained=True, pretrained_cfg_overlay=dict(url=url), **TINY)
    assert torch.equal(backbone.patch_embed.proj.weight, again.backbone.body.model.patch_embed.proj.weight)
    assert len(sorted((hub_cache / "mvit-zoo").rglob("*.safetensors"))) == 2


def test_mask_rcnn_is_set_up_as_detectron2s_config() -> None:
    """configs/common/models/mask_rcnn_fpn.py and projects/MViTv2's coco_loader, in torchvision's knobs; `**kwargs`
    override them."""
    detector = detectron2_detector("mvit_tiny_det", backbone_kwargs=TINY)
    transform, rpn, heads = detector.transform, detector.rpn, detector.roi_heads
    assert transform.min_size[-1] == 800 and transform.max_size == 1333 and transform.min_size[0] == 480
    # detectron2's configs/common/data/constants.py: imagenet_rgb256_mean / _std, for pixels in 0..255
    torch.testing.assert_close(255 * torch.tensor(transform.image_mean), torch.tensor([123.675, 116.28, 103.53]))
    torch.testing.assert_close(255 * torch.tensor(transform.image_std), torch.tensor([58.395, 57.12, 57.375]))
    assert rpn._pre_nms_top_n == dict(training=2000, testing=1000)
    assert rpn._post_nms_top_n == dict(training=1000, testing=1000) and rpn.nms_thresh == 0.7
    assert heads.score_thresh == 0.05 and heads.nms_thresh == 0.5 and heads.detections_per_img == 100
    assert heads.box_coder.weights == (10.0, 10.0, 5.0, 5.0) and heads.fg_bg_sampler.batch_size_per_image == 512
    assert heads.box_roi_pool.sampling_ratio == 0 and heads.mask_roi_pool.sampling_ratio == 0
    assert heads.box_predictor.cls_score.out_features == 81 and len(heads.mask_head) == 4
    assert detectron2_detector("mvit_tiny_det", backbone_kwargs=TINY, min_size=512).transform.min_size == (512,)


def test_categories_are_cocos_80_in_detectron2s_order() -> None:
    """labels 1..80 are COCO's category ids in ascending order (torchvision's meta lists the 91 id slots)."""
    categories = detectron2_detector("mvit_tiny_det", backbone_kwargs=TINY).categories
    slots = MaskRCNN_ResNet50_FPN_Weights.DEFAULT.meta["categories"]
    ids = [i for i in range(1, 91) if i not in COCO_UNUSED_IDS]
    assert len(categories) == 81 and categories[0] == "__background__"
    assert categories[1:] == [slots[i] for i in ids]
    assert categories[1] == "person" and categories[80] == "toothbrush" and "N/A" not in categories


def test_vitdet_cascade_tag_is_an_ln_fpn(hub: HubServer, hub_cache: Path) -> None:
    """projects/ViTDet's tags: backbone + FPN with a channel LayerNorm (eps 1e-6) after bias-free convolutions,
    every tensor from the file; the cascade heads are not mapped."""
    src = _cascade_file(embed=96, fpn_norm=True)
    url = hub.add_static("model_final_8c3da3.pkl", d2_pkl(src))
    fpn = detectron2_detector("mvit_base_det.d2_vitdet_in21k_coco_cascade", pretrained=True,
                              pretrained_cfg_overlay=dict(url=url), backbone_kwargs=dict(depths=(1, 1, 1, 1)))
    assert isinstance(fpn, MViTFPN) and not hasattr(fpn, "categories")
    assert _same(fpn, convert_detectron2_detector({"model": src}, detectron2_detector(
        "mvit_base_det.d2_vitdet_in21k_coco_cascade", backbone_kwargs=dict(depths=(1, 1, 1, 1)))))
    conv, norm = fpn.fpn.layer_blocks[2]
    assert conv.bias is None and torch.equal(norm.weight, src["backbone.fpn_output4.norm.weight"])
    reference = LayerNorm2d(256, eps=1e-6)  # detectron2's channel-first LayerNorm computes the same function
    reference.load_state_dict(norm.state_dict())
    x = torch.randn(2, 256, 5, 7)
    torch.testing.assert_close(norm(x), reference(x))
    with torch.no_grad():
        maps = fpn(torch.rand(1, 3, 64, 96))
    assert list(maps) == ["0", "1", "2", "3", "pool"] and maps["0"].shape == (1, 256, 16, 24)


def test_cascade_tag_without_ln_and_local_file(tmp_path: Path, hub: HubServer, hub_cache: Path) -> None:
    """projects/MViTv2's cascade FPN has no norm; `file=` a local copy of the .pkl is read without a request."""
    src = _cascade_file()
    path = tmp_path / "model_final_305c4e.pkl"
    path.write_bytes(d2_pkl(src))
    fpn = detectron2_detector("mvit_tiny_det.d2_coco_cascade", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path)), backbone_kwargs=TINY)
    assert fpn.fpn.inner_blocks[0][0].bias is not None and len(fpn.fpn.inner_blocks[0]) == 1
    assert torch.equal(fpn.fpn.inner_blocks[1][0].weight, src["backbone.fpn_lateral3.weight"])
    assert hub.requests == [] and not list((hub_cache / "mvit-zoo").rglob("*.safetensors"))
    with pytest.raises(TypeError, match=r"MViTFPN.*no Cascade R-CNN.*min_size"):
        detectron2_detector("mvit_tiny_det.d2_coco_cascade", backbone_kwargs=TINY, min_size=512)


def test_offline_without_cache(hub: HubServer, hub_cache: Path) -> None:
    url = hub.add_static(TINY_FILE, d2_pkl(_mask_rcnn_file()))
    with hub_endpoint(hub.url, offline=True), pytest.raises(WeightsUnavailableError) as info:
        detectron2_detector("mvit_tiny_det", pretrained=True, pretrained_cfg_overlay=dict(url=url),
                            backbone_kwargs=TINY)
    message = str(info.value)
    assert info.value.reason == "offline" and "HF_HUB_OFFLINE is set" in message
    assert "pretrained_cfg_overlay=dict(file=" in message and hub.requests == []


def test_wrong_file_is_refused_and_not_cached(hub: HubServer, hub_cache: Path) -> None:
    """A Cascade file served as the Mask R-CNN tag's: the converter's error, with the tag; no converted copy."""
    url = hub.add_static(TINY_FILE, d2_pkl(_cascade_file()))
    with pytest.raises(CheckpointMismatchError, match=r"mvit_tiny_det\.d2_coco_mask_rcnn weights from .*Cascade R-CNN"):
        detectron2_detector("mvit_tiny_det", pretrained=True, pretrained_cfg_overlay=dict(url=url),
                            backbone_kwargs=TINY)
    assert not list((hub_cache / "mvit-zoo").rglob("*.safetensors"))


@pytest.mark.parametrize("name, match", [
    ("mvit_tiny", r"'mvit_tiny' is not one of detectron2's detectors; pass one of: mvit_tiny_det\.d2_coco_mask_rcnn, "
                  r".*mvit_base_det\.d2_vitdet_in21k_coco_cascade"),
    ("mvit_tiny_det.fb_in1k", r"mvit_tiny_det has no tag 'fb_in1k'; its tags: d2_coco_mask_rcnn, d2_coco_cascade"),
])
def test_unknown_names_list_the_valid_tags(name: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        detectron2_detector(name)
