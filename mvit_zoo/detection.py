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
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool

from .model.mvit import MViT

__all__ = [
    "PyramidLevel", "MViTBackbone", "MViTFPN", "mvit_fpn_backbone", "MViTD2Backbone", "ShapeSpec",
    "HAS_DETECTRON2", "add_mvit_zoo_config", "build_mvit_zoo_backbone", "build_mvit_zoo_fpn_backbone",
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
