"""MViT's multiscale pyramid as a backbone for detection and segmentation heads.

Pyramid sizes (any input size). The model pads nothing and crops nothing: the patch embedding
(kernel 7, stride 4, padding 3) and every pooling (odd kernel k, padding k // 2) map an axis of n
positions to ceil(n / stride). Since ceil(ceil(n / a) / b) == ceil(n / (a * b)), level i of an
(H, W) image is

    (ceil(H / s_i), ceil(W / s_i)),  s_i = 4, 8, 16, 32,

for any H, W >= 32: non-square, not divisible by 32, larger or smaller than the build size. The last
row/column of a level covers the input's remainder. For video (T, H, W) the time axis is ceil(T / 2)
at every level (temporal stride 2), for any T >= 2. `output_size()` computes these sizes.

Heads that add upsampled levels by exactly 2x (detectron2's FPN) need inputs divisible by 32; their
data pipeline pads to `size_divisibility`. torchvision's GeneralizedRCNNTransform pads to 32 already,
and its FeaturePyramidNetwork interpolates to each level's size, so any size works there.

Away from the build size the model interpolates its position embeddings (absolute: bicubic in space,
linear in time; relative tables: linear); at the build size nothing is interpolated, so the pyramid is
the reference network's.

Adapters (no detection library is needed to import this module):
    MViTBackbone    torchvision style: input -> OrderedDict of maps, `out_channels`; video too.
    MViTFPN         MViTBackbone + torchvision FeaturePyramidNetwork, for FasterRCNN / MaskRCNN.
    MViTD2Backbone  detectron2 style: `output_shape()`, `size_divisibility`, features scale2..scale5.
                    A detectron2 `Backbone` (and registered in BACKBONE_REGISTRY as
                    `build_mvit_zoo_backbone` / `build_mvit_zoo_fpn_backbone`) when detectron2 is installed.
    detectron2_detector  a `mvit_*_det.<tag>` detector of detectron2's model zoo rebuilt on torchvision, with
                    its weights: a MaskRCNN (Mask R-CNN tags) or an MViTFPN (Cascade tags).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool

from .model.mvit import MViT

__all__ = [
    "PyramidLevel", "MViTBackbone", "MViTFPN", "mvit_fpn_backbone", "detectron2_detector", "MViTD2Backbone",
    "ShapeSpec", "HAS_DETECTRON2", "add_mvit_zoo_config", "build_mvit_zoo_backbone", "build_mvit_zoo_fpn_backbone",
]

try:  # detectron2 is optional: with it, MViTD2Backbone is a real detectron2 Backbone
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import BACKBONE_REGISTRY
    from detectron2.modeling import Backbone as _D2Base

    HAS_DETECTRON2 = True
except ImportError:
    HAS_DETECTRON2 = False
    BACKBONE_REGISTRY = None
    _D2Base = nn.Module  # type: ignore[assignment,misc]

    @dataclass
    class ShapeSpec:  # type: ignore[no-redef]
        """detectron2's ShapeSpec: what a head needs to know about one feature map."""

        channels: Optional[int] = None
        height: Optional[int] = None
        width: Optional[int] = None
        stride: Optional[int] = None


D2_FEATURES = ("scale2", "scale3", "scale4", "scale5")  # stride 2**k for scale k, as detectron2's MViT


@dataclass(frozen=True)
class PyramidLevel:
    """One output map: its name, channels, spatial stride and temporal stride (None: no time axis)."""

    name: str
    channels: int
    stride: int
    temporal_stride: Optional[int] = None


def output_size(input_size: Sequence[int], strides: Sequence[int]) -> tuple[int, ...]:
    """Map size of a level: ceil(n / stride) per axis, e.g. ((T,) H, W) with strides ((2,) 16, 16)."""
    return tuple(math.ceil(n / s) for n, s in zip(input_size, strides))


def _as_model(model: Union[MViT, str, nn.Module], pretrained: bool, **kwargs: Any) -> MViT:
    if isinstance(model, str):
        from .model.registry import create_model

        model = create_model(model, pretrained=pretrained, **kwargs)
    elif kwargs or pretrained:
        raise TypeError("pretrained and model kwargs only apply when `model` is a name")
    if not isinstance(model, MViT) and isinstance(getattr(model, "model", None), MViT):
        model = model.model  # a features_only FeatureGetterNet
    if not isinstance(model, MViT):
        raise TypeError(f"expected an MViT or a model name, got {type(model).__name__}")
    return model


class _ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, *grid) map."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


class MViTBackbone(nn.Module):
    """An MViT's pyramid, torchvision style (the `backbone` of torchvision's detection models).

    images (B, C, H, W) -> OrderedDict name_i: (B, C_i, ceil(H / s_i), ceil(W / s_i))
    video (B, C, T, H, W) -> OrderedDict name_i: (B, C_i, ceil(T / 2), ceil(H / s_i), ceil(W / s_i)),
        or (B, C_i, H_i, W_i) with `time_pool` ('avg' or 'max' over time, for per-frame heads).

    s_i = 4, 8, 16, 32 for out_indices 0..3; `names` go with `out_indices` and default to '0', '1', ...
    (torchvision's MultiScaleRoIAlign default); maps come out in stage order. The class token is
    dropped. The model's classifier and final norm are removed; `norm=True` adds a LayerNorm per level
    instead. `out_channels` is the channels of the last level (what a single-map head reads); `levels`
    describes every map.
    """

    def __init__(
            self,
            model: Union[MViT, str],
            out_indices: Sequence[int] = (0, 1, 2, 3),
            names: Optional[Sequence[str]] = None,
            norm: bool = False,
            time_pool: Optional[str] = None,
            pretrained: bool = False,
            **model_kwargs: Any,
    ) -> None:
        super().__init__()
        model = _as_model(model, pretrained, **model_kwargs)
        if time_pool not in (None, "avg", "max"):
            raise ValueError(f"time_pool must be None, 'avg' or 'max', got {time_pool!r}")
        if time_pool is not None and not model.is_video:
            raise ValueError("time_pool is for video models; this is an image model")
        info = model.feature_info
        take = model.prune_intermediate_layers(list(out_indices), prune_norm=True, prune_head=True)
        if len(set(take)) != len(take):
            raise ValueError(f"out_indices {list(out_indices)} name a stage twice")
        if names is None:
            names = [str(i) for i in range(len(take))]
        if len(names) != len(take):
            raise ValueError(f"need one name per out_index: out_indices {list(out_indices)}, names {list(names)}")
        take, names = zip(*sorted(zip(take, names)))  # maps come out in stage order
        self.out_indices = list(take)
        self.model = model
        self.time_pool = time_pool
        self.is_video = model.is_video
        self.levels = [
            PyramidLevel(
                name=name, channels=info[i]["num_chs"], stride=info[i]["reduction"],
                temporal_stride=info[i]["stride"][0] if self.is_video and time_pool is None else None,
            )
            for name, i in zip(names, self.out_indices)
        ]
        # full per-axis strides of each level, ((T,) H, W), for output_sizes
        self._grid_strides = [tuple(info[i].get("stride", (info[i]["reduction"],) * 2)) for i in self.out_indices]
        self.norms = nn.ModuleList(
            [_ChannelNorm(lvl.channels, eps=model.cfg.norm_eps) if norm else nn.Identity() for lvl in self.levels]
        )
        self.out_channels = self.levels[-1].channels

    @property
    def names(self) -> list[str]:
        return [lvl.name for lvl in self.levels]

    @property
    def channels(self) -> list[int]:
        return [lvl.channels for lvl in self.levels]

    @property
    def strides(self) -> list[int]:
        return [lvl.stride for lvl in self.levels]

    def output_sizes(self, input_size: Sequence[int]) -> dict[str, tuple[int, ...]]:
        """Map size per level for an input of size (H, W) or (T, H, W) (see the module docstring)."""
        if len(input_size) != self.model.cfg.ndim:
            raise ValueError(f"input_size needs {self.model.cfg.ndim} entries, got {tuple(input_size)}")
        sizes = {}
        for lvl, strides in zip(self.levels, self._grid_strides):
            size = output_size(input_size, strides)
            sizes[lvl.name] = size[-2:] if self.time_pool else size
        return sizes

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        maps = self.model.forward_intermediates(x, indices=self.out_indices, intermediates_only=True)
        out: OrderedDict[str, Tensor] = OrderedDict()
        for lvl, norm, m in zip(self.levels, self.norms, maps):
            m = norm(m)
            if self.time_pool == "avg":
                m = m.mean(dim=2)
            elif self.time_pool == "max":
                m = m.amax(dim=2)
            out[lvl.name] = m
        return out


class MViTFPN(nn.Module):
    """MViTBackbone + torchvision FeaturePyramidNetwork: the `backbone` for torchvision's FasterRCNN,
    MaskRCNN, KeypointRCNN.

    (B, C, H, W) -> OrderedDict '0'..'3': (B, out_channels, ceil(H / s_i), ceil(W / s_i)), s_i = 4..32,
    plus 'pool' (stride 64) from the default extra block, the five maps torchvision's default anchor
    generator and RoI pooler expect.
    """

    def __init__(
            self,
            body: MViTBackbone,
            out_channels: int = 256,
            extra_blocks: Optional[ExtraFPNBlock] = None,
            norm_layer: Optional[Callable[..., nn.Module]] = None,
    ) -> None:
        super().__init__()
        if body.time_pool is None and body.is_video:
            raise ValueError("torchvision's FPN is 2D: give a video body a time_pool")
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            body.channels, out_channels,
            extra_blocks=LastLevelMaxPool() if extra_blocks is None else extra_blocks, norm_layer=norm_layer,
        )
        self.out_channels = out_channels

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.body.set_grad_checkpointing(enable)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return self.fpn(self.body(x))


def mvit_fpn_backbone(
        model: Union[MViT, str],
        out_channels: int = 256,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        extra_blocks: Optional[ExtraFPNBlock] = None,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
        pretrained: bool = False,
        **model_kwargs: Any,
) -> MViTFPN:
    """An MViT with an FPN, ready for `torchvision.models.detection.FasterRCNN(backbone, num_classes)`.

    `model` is an MViT or a model name (created with `pretrained` and `model_kwargs`, e.g.
    drop_path_rate). torchvision's default transform normalises with ImageNet mean/std, as the image
    models were trained.
    """
    body = MViTBackbone(model, out_indices=out_indices, pretrained=pretrained, **model_kwargs)
    return MViTFPN(body, out_channels=out_channels, extra_blocks=extra_blocks, norm_layer=norm_layer)


# --------------------------------------------------------------------------------------------------
# detectron2's model zoo detectors on torchvision
# --------------------------------------------------------------------------------------------------

# detectron2's configs/common/models/mask_rcnn_fpn.py (with projects/MViTv2's RGB ImageNet pixel statistics and
# its coco_loader's resize) in torchvision's terms. NOTE: torchvision picks a training short side from a
# `min_size` tuple and tests at its last entry: detectron2's ResizeShortestEdge(480..800, max 1333) and (800, 1333)
_D2_MASK_RCNN: dict[str, Any] = dict(
    min_size=tuple(range(480, 801, 32)), max_size=1333,
    image_mean=(0.485, 0.456, 0.406), image_std=(0.229, 0.224, 0.225),
    rpn_pre_nms_top_n_train=2000, rpn_pre_nms_top_n_test=1000,
    rpn_post_nms_top_n_train=1000, rpn_post_nms_top_n_test=1000, rpn_nms_thresh=0.7,
    rpn_fg_iou_thresh=0.7, rpn_bg_iou_thresh=0.3, rpn_batch_size_per_image=256, rpn_positive_fraction=0.5,
    box_score_thresh=0.05, box_nms_thresh=0.5, box_detections_per_img=100,
    box_fg_iou_thresh=0.5, box_bg_iou_thresh=0.5, box_batch_size_per_image=512, box_positive_fraction=0.25,
    bbox_reg_weights=(10.0, 10.0, 5.0, 5.0),
)
_D2_CASCADE = "torchvision has no Cascade R-CNN: the heads are not mapped"


def _detectron2_tag(name: str) -> tuple[str, str]:
    """(architecture, tag) of `mvit_*_det.<tag>` or of a bare `mvit_*_det` (its first tag, timm's default)."""
    from .model.registry import default_cfgs

    arch, _, tag = name.partition(".")
    valid = {a: list(d.tags) for a, d in default_cfgs.items() if a.endswith("_det")}
    every = ", ".join(f"{a}.{t}" for a, tags in valid.items() for t in tags)
    if arch not in valid:
        raise ValueError(f"{name!r} is not one of detectron2's detectors; pass one of: {every} (a bare "
                         f"architecture name means its first tag)")
    if tag and tag not in valid[arch]:
        raise ValueError(f"{arch} has no tag {tag!r}; its tags: {', '.join(valid[arch])} (all detectors: {every})")
    return arch, tag or valid[arch][0]


def _coco_categories() -> list[str]:
    """'__background__' and the 80 COCO names in detectron2's contiguous order (COCO category ids ascending), so
    that `categories[label]` names a torchvision label. torchvision lists the 91 id slots with 'N/A' for unused."""
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

    return [c for c in MaskRCNN_ResNet50_FPN_Weights.DEFAULT.meta["categories"] if c != "N/A"]


def _convert_detectron2(checkpoint: Mapping[str, Tensor], model: nn.Module) -> tuple[dict[str, Tensor], str]:
    from .weights.detectron2 import convert_detectron2_detector

    return convert_detectron2_detector(checkpoint, model), "detectron2"


def _load_detectron2(model: nn.Module, pcfg: Mapping[str, Any]) -> None:
    """Load a detector tag's weights into `model`: a `file` (the official .pkl) is converted here; the official URL
    is downloaded and converted once, then read from its `-detector` copy in mvit-zoo's cache."""
    from .weights import hub
    from .weights.convert import CheckpointMismatchError

    tag = f"{pcfg['architecture']}.{pcfg['tag']}"
    origin = pcfg.get("file") or pcfg.get("url")
    try:
        source = hub.resolve_weights(pcfg, model, convert=_convert_detectron2, variant="detector")
        sd = hub.read_weights(source.path)
        if source.kind == "file":
            sd, _ = _convert_detectron2(sd, model)
    except CheckpointMismatchError as e:
        raise CheckpointMismatchError(f"{tag} weights from {origin}: {e}") from None
    target = model.state_dict()
    wrong = sorted(set(target) ^ set(sd)) + [k for k in sd if k in target and sd[k].shape != target[k].shape]
    if wrong:  # a cached copy converted for other backbone_kwargs
        raise CheckpointMismatchError(
            f"{tag}: {source.path} does not fit this model ({len(wrong)} keys differ: {', '.join(wrong[:6])}); "
            f"build it without backbone_kwargs, or delete that file to convert the official checkpoint again")
    model.load_state_dict(sd)


def detectron2_detector(
        name: str,
        pretrained: bool = False,
        *,
        pretrained_cfg_overlay: Optional[Mapping[str, Any]] = None,
        backbone_kwargs: Optional[Mapping[str, Any]] = None,
        **kwargs: Any,
) -> nn.Module:
    """The detector of a detectron2 model zoo tag, `mvit_*_det.<tag>` (a bare `mvit_*_det`: its first tag), rebuilt
    on torchvision, with the whole file's weights when `pretrained`.

    `*_mask_rcnn` tags -> torchvision `MaskRCNN(MViTFPN(MViTBackbone(arch)), num_classes=81)` set up as
    detectron2's configs/common/models/mask_rcnn_fpn.py and projects/MViTv2's config: RGB input in [0, 1]
    normalised with ImageNet mean / std; test resize short side 800, long side at most 1333 (training: a short
    side of 480..800 in steps of 32); RPN pre / post-NMS top-k 2000 / 1000 in training and 1000 / 1000 at test,
    NMS 0.7; box score threshold 0.05, NMS 0.5, 100 detections; box coder weights (10, 10, 5, 5); RoIAlign with
    adaptive sampling (`sampling_ratio=0`, as ROIAlignV2). `categories` names its labels (when it has 81 classes):
    '__background__' and COCO's 80, `categories[label]`. `**kwargs` go to `MaskRCNN` and override these (e.g.
    `min_size`).

    Still computed differently from detectron2 (the weights are the same):
      - RoIAlign: torchvision's MultiScaleRoIAlign samples with `aligned=False`, detectron2's ROIAlignV2 with
        `aligned=True` (a half-pixel shift of every RoI);
      - anchors: torchvision rounds its cell anchors to whole pixels (e.g. 45 x 23 for size 32, ratio 0.5;
        detectron2 45.25 x 22.63);
      - resize: torchvision interpolates the float tensor (bilinear, no antialiasing, size rounded down), detectron2
        resizes the uint8 image with PIL (antialiased, size rounded to nearest);
      - masks: torchvision returns probabilities pasted into the image (threshold at 0.5 for detectron2's binary
        masks), with its own paste interpolation;
      - training: torchvision's smooth-L1 box losses (beta 1/9) where detectron2 uses L1; no random crop or flip
        in torchvision's transform; detectron2 trained with drop path (`backbone_kwargs=dict(drop_path_rate=0.2)`).

    `*_cascade` tags -> an `MViTFPN` (backbone + FPN; the `*_vitdet_*` tags with projects/ViTDet's LayerNorm over
    channels, eps 1e-6, in the FPN): torchvision has no Cascade R-CNN: the heads are not mapped. Pass it as the
    `backbone` of a torchvision detector. It takes no `**kwargs`.

    `pretrained_cfg_overlay` changes the tag's pretrained cfg (`file=` a local copy of the official .pkl, or
    `url=`); `backbone_kwargs` go to the MViT (`drop_path_rate`, or architecture fields, which the official file
    does not fit). The official .pkl is downloaded once, converted (`convert_detectron2_detector`) and cached as
    safetensors apart from the backbone-only copy that `timm.create_model(arch, pretrained=True)` keeps; see
    `mvit_zoo.weights.hub` for the cache, hashes and HF_HUB_OFFLINE. `pretrained_cfg` (a dict) is set on the result.
    """
    from torchvision.models.detection import MaskRCNN

    from .model.registry import create_model

    arch, tag = _detectron2_tag(name)
    mask_rcnn = tag.endswith("_mask_rcnn")
    if not mask_rcnn and kwargs:
        raise TypeError(f"{arch}.{tag} builds an MViTFPN ({_D2_CASCADE}), which takes no detector arguments "
                        f"({', '.join(kwargs)}); pass them to the torchvision detector you build on it")
    mvit = create_model(f"{arch}.{tag}", pretrained_cfg_overlay=dict(pretrained_cfg_overlay or {}),
                        **dict(backbone_kwargs or {}))
    pcfg = dict(mvit.pretrained_cfg)
    # NOTE: projects/ViTDet's FPN convolutions have no bias and a channel LayerNorm (detectron2's "LN", eps 1e-6)
    norm_layer = partial(_ChannelNorm, eps=1e-6) if "_vitdet_" in tag else None
    model: nn.Module = MViTFPN(MViTBackbone(mvit), norm_layer=norm_layer)
    if mask_rcnn:
        levels = ["0", "1", "2", "3"]
        settings = dict(_D2_MASK_RCNN, box_roi_pool=MultiScaleRoIAlign(levels, 7, sampling_ratio=0),
                        mask_roi_pool=MultiScaleRoIAlign(levels, 14, sampling_ratio=0))
        model = MaskRCNN(model, **{"num_classes": 81, **settings, **kwargs})
        if model.roi_heads.box_predictor.cls_score.out_features == 81:
            model.categories = _coco_categories()
    if pretrained:
        _load_detectron2(model, pcfg)
    model.pretrained_cfg = pcfg
    return model


class MViTD2Backbone(_D2Base):
    """An MViT's pyramid, detectron2 style: (B, C, H, W) -> {'scale2': (B, C_2, ceil(H/4), ceil(W/4)),
    ..., 'scale5': (B, C_5, ceil(H/32), ceil(W/32))}; feature 'scalek' has stride 2**k.

    `output_shape()` gives channels and stride per feature; `size_divisibility` (default 32) is what
    detectron2's FPN needs (the backbone itself takes any size >= 32). `norm=True` adds a LayerNorm per
    output level, as detectron2's MViTv2 configs do. A detectron2 `Backbone` when detectron2 is
    installed, a plain nn.Module otherwise.
    """

    def __init__(
            self,
            model: Union[MViT, str],
            out_features: Sequence[str] = D2_FEATURES,
            norm: bool = False,
            size_divisibility: int = 32,
            square_pad: int = 0,
            pretrained: bool = False,
            **model_kwargs: Any,
    ) -> None:
        super().__init__()
        unknown = [f for f in out_features if f not in D2_FEATURES]
        if unknown or not out_features:
            raise ValueError(f"out_features must be a non-empty subset of {D2_FEATURES}, got {list(out_features)}")
        out_features = [f for f in D2_FEATURES if f in out_features]
        self.body = MViTBackbone(
            model, out_indices=[D2_FEATURES.index(f) for f in out_features], names=out_features, norm=norm,
            pretrained=pretrained, **model_kwargs,
        )
        if self.body.is_video:
            raise ValueError("MViTD2Backbone is for image models; use MViTBackbone for video")
        self._out_features = list(out_features)
        self._out_feature_channels = dict(zip(out_features, self.body.channels))
        self._out_feature_strides = dict(zip(out_features, self.body.strides))
        self._size_divisibility = size_divisibility
        self._square_pad = square_pad

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility

    @property
    def padding_constraints(self) -> dict[str, int]:
        return {"size_divisibility": self._size_divisibility, "square_size": self._square_pad}

    def output_shape(self) -> dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
            for name in self._out_features
        }

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.body.set_grad_checkpointing(enable)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return dict(self.body(x))


# --------------------------------------------------------------------------------------------------
# detectron2 config and registry (used only when detectron2 is installed)
# --------------------------------------------------------------------------------------------------

def add_mvit_zoo_config(cfg: Any) -> None:
    """Add `cfg.MODEL.MVIT_ZOO` (NAME, PRETRAINED, OUT_FEATURES, NORM, DROP_PATH_RATE) to a detectron2
    config, and set RGB input with ImageNet mean/std in 0-255 units, as the image models were trained."""
    from detectron2.config import CfgNode

    cfg.MODEL.MVIT_ZOO = CfgNode()
    cfg.MODEL.MVIT_ZOO.NAME = "mvit_tiny"
    cfg.MODEL.MVIT_ZOO.PRETRAINED = True
    cfg.MODEL.MVIT_ZOO.OUT_FEATURES = list(D2_FEATURES)
    cfg.MODEL.MVIT_ZOO.NORM = True
    cfg.MODEL.MVIT_ZOO.DROP_PATH_RATE = 0.1
    cfg.MODEL.PIXEL_MEAN = [123.675, 116.28, 103.53]
    cfg.MODEL.PIXEL_STD = [58.395, 57.12, 57.375]
    cfg.INPUT.FORMAT = "RGB"


def build_mvit_zoo_backbone(cfg: Any, input_shape: ShapeSpec) -> MViTD2Backbone:
    """detectron2 builder: MViTD2Backbone from `cfg.MODEL.MVIT_ZOO` (see add_mvit_zoo_config)."""
    c = cfg.MODEL.MVIT_ZOO
    return MViTD2Backbone(
        c.NAME, out_features=tuple(c.OUT_FEATURES), norm=c.NORM, pretrained=c.PRETRAINED,
        drop_path_rate=c.DROP_PATH_RATE, in_chans=input_shape.channels or 3,
    )


def build_mvit_zoo_fpn_backbone(cfg: Any, input_shape: ShapeSpec) -> nn.Module:
    """detectron2 builder: MViTD2Backbone with detectron2's FPN (cfg.MODEL.FPN) and a max-pool P6."""
    from detectron2.modeling.backbone.fpn import FPN
    from detectron2.modeling.backbone.fpn import LastLevelMaxPool as D2LastLevelMaxPool

    return FPN(
        bottom_up=build_mvit_zoo_backbone(cfg, input_shape), in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS, norm=cfg.MODEL.FPN.NORM, top_block=D2LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


if HAS_DETECTRON2:
    for _builder in (build_mvit_zoo_backbone, build_mvit_zoo_fpn_backbone):
        if _builder.__name__ not in BACKBONE_REGISTRY:
            BACKBONE_REGISTRY.register(_builder)
