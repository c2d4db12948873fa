"""Multiscale Vision Transformers: MViT v1 and MViTv2, for images and video, in one implementation.

Papers:
    Fan et al., "Multiscale Vision Transformers", ICCV 2021 (MViT v1).
    Li et al., "MViTv2: Improved Multiscale Vision Transformers for Classification and Detection",
    CVPR 2022 (MViTv2).

Every layer works on tokens laid out on a grid: (H, W) for images, (T, H, W) for video. The rank of
the grid comes from the config (the length of its patch kernel), so 2D and 3D models are the same code.
Tokens are (B, P + N, C): P prefix tokens (the class token, when used) and N = prod(grid) grid tokens.

The state-dict layout is timm's `mvitv2` layout (`patch_embed.proj`, `stages.i.blocks.j.attn.qkv`,
`attn.pool_q`, `attn.rel_pos_h`, `norm`, `head.fc`), extended for video with `attn.rel_pos_t` and, for
MViT v1, `pos_embed_spatial` / `pos_embed_temporal` / `pos_embed_class`.
"""
from __future__ import annotations

import functools
import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from timm.layers import DropPath, register_notrace_module, trunc_normal_tf_
from timm.models._features import feature_take_indices

from ..ops.attention import attention
from ..ops.dispatch import use_fused_attn
from ..ops.memory import (depthwise_conv, max_pool, merge_heads, norm_linears, norm_mlp, not_plain,
                          residual_linear, residual_pooling)
from .inputs import check_input, check_input_scripted

Grid = tuple[int, ...]  # a token grid in a config: (H, W) or (T, H, W); List[int] in forward

__all__ = ["MViTCfg", "MViT", "MODEL_CFGS", "make_cfg"]


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MViTCfg:
    """Architecture of one MViT variant. Per-axis sizes are (H, W) for images and (T, H, W) for video."""

    depths: tuple[int, ...] = (1, 2, 5, 2)
    embed_dim: tuple[int, ...] = (96, 192, 384, 768)  # channels of each stage
    num_heads: tuple[int, ...] = (1, 2, 4, 8)  # heads of each stage
    img_size: Grid = (224, 224)  # build size; other sizes work at run time
    patch_kernel: Grid = (7, 7)
    patch_stride: Grid = (4, 4)
    patch_padding: Grid = (3, 3)
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    pool_mode: str = "conv"  # how Q, K, V are pooled: conv | avg | max
    kernel_qkv: Optional[Grid] = (3, 3)  # None: stride + 1 on strided axes, 1 elsewhere (SlowFast default)
    stride_q: Grid = (2, 2)  # Q stride at every stage transition
    stride_kv_adaptive: Grid = (4, 4)  # KV stride in stage 0, divided by stride_q at each transition
    pool_q_all_blocks: bool = True  # v2: stride-1 Q pooling in every block; v1: at stage starts only
    expand_attn: bool = True  # channels grow in the attention of a stage's first block (v2), else in
    #                           the MLP of the previous stage's last block (v1, MViTv2-L)
    residual_pooling: bool = True  # v2: add the pooled Q to the attention output
    residual_pool_cls: bool = True  # residual pooling adds to the class token too (timm, mvit) or not (SlowFast)
    rel_pos: bool = True  # v2: decomposed relative position along H and W
    rel_pos_temporal: bool = False  # v2 video: decomposed relative position along T as well
    abs_pos: str = "none"  # none | joint (one table) | separable (space + time + class tables, v1)
    use_cls_token: bool = False
    norm_eps: float = 1e-6
    pool_norm_eps: Optional[float] = None  # eps of the Q/K/V pooling norms; None: norm_eps (pytorchvideo: 1e-5)
    drop_rate: float = 0.0  # dropout before the classifier
    # Hybrid window attention (MViTv2 sec. 4.2, Hwin; detectron2's MViT backbone; 2D, no class token)
    window_size: Optional[int] = None  # tokens per window side at stage 0, halved per stage; None: all global
    global_stages: tuple[int, ...] = ()  # window models: stages whose last block attends globally
    stride_kv_doubled: tuple[int, ...] = ()  # stages whose last block pools K/V by twice the stage's KV stride
    stage_norms: bool = False  # a LayerNorm on each stage's output map (detectron2's scale2..scale5 norms for
    #                            its FPN) instead of one final norm

    def __post_init__(self) -> None:
        nd = len(self.patch_kernel)
        for name in ("img_size", "patch_stride", "patch_padding", "stride_q", "stride_kv_adaptive"):
            if len(getattr(self, name)) != nd:
                raise ValueError(f"MViTCfg.{name} needs {nd} entries (one per grid axis), got {getattr(self, name)}")
        if self.kernel_qkv is not None and len(self.kernel_qkv) != nd:
            raise ValueError(f"MViTCfg.kernel_qkv needs {nd} entries, got {self.kernel_qkv}")
        if not len(self.depths) == len(self.embed_dim) == len(self.num_heads):
            raise ValueError("MViTCfg.depths, embed_dim and num_heads need one entry per stage")
        if self.pool_mode not in ("conv", "avg", "max"):
            raise ValueError(f"MViTCfg.pool_mode must be conv, avg or max, got {self.pool_mode!r}")
        if self.abs_pos not in ("none", "joint", "separable"):
            raise ValueError(f"MViTCfg.abs_pos must be none, joint or separable, got {self.abs_pos!r}")
        if self.rel_pos_temporal and nd != 3:
            raise ValueError("MViTCfg.rel_pos_temporal needs a video (3D) config")
        for d, h in zip(self.embed_dim, self.num_heads):
            if d % h:
                raise ValueError(f"MViTCfg: embed_dim {d} is not divisible by num_heads {h}")
        for name in ("global_stages", "stride_kv_doubled"):
            bad = [i for i in getattr(self, name) if not 0 <= i < len(self.depths)]
            if bad:
                raise ValueError(f"MViTCfg.{name} names stages {bad}; this config has stages 0..{len(self.depths) - 1}")
        if self.window_size is not None:
            if nd != 2:
                raise ValueError("MViTCfg.window_size: window attention is for 2D (image) models; set window_size=None "
                                 "for this video config")
            if self.use_cls_token:
                raise ValueError("MViTCfg.window_size: window attention has no place for a class token; set "
                                 "use_cls_token=False (detectron2's backbones have none)")
            if self.window_size < 1:
                raise ValueError(f"MViTCfg.window_size must be a positive token count, got {self.window_size}")

    @property
    def ndim(self) -> int:
        """Number of grid axes: 2 for images, 3 for video."""
        return len(self.patch_kernel)


def _per_stage(value: Union[int, Sequence[int]], num_stages: int) -> tuple[int, ...]:
    """An int means 'stage-0 value, doubled at every stage'."""
    if isinstance(value, int):
        return tuple(value * 2**i for i in range(num_stages))
    return tuple(int(v) for v in value)


def make_cfg(base: MViTCfg, **overrides: Any) -> MViTCfg:
    """`base` with fields replaced. Accepts the shorthands of the model constructors:
    `embed_dim=96` / `num_heads=1` (doubled per stage), `img_size=224` (square; for video the
    frame count of `base` is kept), `num_frames=T` (video).
    """
    if not overrides:
        return base
    overrides = dict(overrides)
    num_frames = overrides.pop("num_frames", None)
    unknown = set(overrides) - {f.name for f in fields(MViTCfg)}
    if unknown:
        raise TypeError(f"unknown MViT config field(s): {sorted(unknown)}")
    depths = tuple(overrides.get("depths", base.depths))
    for name in ("embed_dim", "num_heads"):
        if name in overrides:
            overrides[name] = _per_stage(overrides[name], len(depths))
    if "depths" in overrides:
        overrides["depths"] = depths
    img_size = overrides.get("img_size", base.img_size)
    if isinstance(img_size, int):
        img_size = (img_size, img_size)
    img_size = tuple(int(s) for s in img_size)
    if base.ndim == 3 and len(img_size) == 2:
        img_size = (base.img_size[0],) + img_size
    if num_frames is not None:
        if base.ndim != 3:
            raise TypeError("num_frames is only for video models")
        img_size = (int(num_frames),) + img_size[1:]
    overrides["img_size"] = img_size
    return replace(base, **overrides)


# --------------------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------------------

def _v2_image(depths: tuple[int, ...], dim: int, heads: int, **kw: Any) -> MViTCfg:
    """MViTv2 for ImageNet (timm `mvitv2_*`)."""
    return MViTCfg(depths=depths, embed_dim=_per_stage(dim, 4), num_heads=_per_stage(heads, 4), **kw)


_VIDEO = dict(
    patch_kernel=(3, 7, 7), patch_stride=(2, 4, 4), patch_padding=(1, 3, 3), kernel_qkv=(3, 3, 3),
    stride_q=(1, 2, 2), stride_kv_adaptive=(1, 8, 8), use_cls_token=True, drop_rate=0.5,
)
_V1 = dict(
    pool_q_all_blocks=False, expand_attn=False, residual_pooling=False, rel_pos=False,
    abs_pos="separable", use_cls_token=True,
)
_V2_VIDEO = dict(_VIDEO, rel_pos_temporal=True, residual_pool_cls=False)
# detectron2's COCO backbones (projects/MViTv2/configs): windows of 56/28/14/7 tokens (the 224 grid, so the
# relative-position tables keep their ImageNet sizes), global attention in the last block of stages 1-3,
# K/V stride doubled there in stages 1 and 2, a norm per stage output for the FPN, no head
_DET = dict(window_size=56, global_stages=(1, 2, 3), stride_kv_doubled=(1, 2), stage_norms=True)


def _video(depths: tuple[int, ...], dim: int, heads: int, size: Grid, **kw: Any) -> MViTCfg:
    return MViTCfg(depths=depths, embed_dim=_per_stage(dim, 4), num_heads=_per_stage(heads, 4), img_size=size, **kw)


MODEL_CFGS: dict[str, MViTCfg] = {
    # 2D MViTv2, ImageNet
    "mvit_tiny": _v2_image((1, 2, 5, 2), 96, 1),
    "mvit_small": _v2_image((1, 2, 11, 2), 96, 1),
    "mvit_base": _v2_image((2, 3, 16, 3), 96, 1),
    "mvit_large": _v2_image((2, 6, 36, 4), 144, 2, expand_attn=False),
    "mvit_small_cls": _v2_image((1, 2, 11, 2), 96, 1, use_cls_token=True),
    "mvit_base_cls": _v2_image((2, 3, 16, 3), 96, 1, use_cls_token=True),
    "mvit_large_cls": _v2_image((2, 6, 36, 4), 144, 2, use_cls_token=True),
    "mvit_huge_cls": _v2_image((4, 8, 60, 8), 192, 3, use_cls_token=True),
    # 2D MViTv2 with hybrid window attention, detection backbones (detectron2)
    "mvit_tiny_det": _v2_image((1, 2, 5, 2), 96, 1, **_DET),
    "mvit_small_det": _v2_image((1, 2, 11, 2), 96, 1, **_DET),
    "mvit_base_det": _v2_image((2, 3, 16, 3), 96, 1, **_DET),
    "mvit_large_det": _v2_image((2, 6, 36, 4), 144, 2, **_DET),
    "mvit_huge_det": _v2_image((4, 8, 60, 8), 192, 3, **_DET),
    # 2D MViT v1, ImageNet (SlowFast ImageNet/MVIT_B_16_CONV, pytorchvideo mvit_base_16)
    "mvit_v1_b_16": MViTCfg(depths=(1, 2, 11, 2), **_V1),
    # 3D MViT v1, Kinetics
    "mvit_b_16x4": _video((1, 2, 11, 2), 96, 1, (16, 224, 224), **{**_VIDEO, **_V1}),
    "mvit_b_32x3": _video((1, 2, 11, 2), 96, 1, (32, 224, 224), **{**_VIDEO, **_V1}),
    "mvit_b24_32x3": _video((2, 3, 16, 3), 96, 1, (32, 224, 224), **{**_VIDEO, **_V1, "kernel_qkv": None}),
    # 3D MViTv2, Kinetics / Something-Something v2
    "mvit_v2_s_16x4": _video((1, 2, 11, 2), 96, 1, (16, 224, 224), **_V2_VIDEO),
    "mvit_v2_b_32x3": _video((2, 3, 16, 3), 96, 1, (32, 224, 224), **_V2_VIDEO),
    "mvit_v2_l_40x3": _video((2, 6, 36, 4), 144, 2, (40, 312, 312), **_V2_VIDEO),
}


# --------------------------------------------------------------------------------------------------
# Block specs (MViT tables 1-3: channels, heads and pooling per block)
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BlockSpec:
    """One block of the network, as derived from an MViTCfg."""

    dim: int
    dim_out: int
    num_heads: int
    grid: Grid  # input grid at the build size (floor division, as the reference implementations)
    kernel_q: Optional[Grid]  # None: no Q pooling
    stride_q: Grid
    kernel_kv: Optional[Grid]  # None: no K/V pooling
    stride_kv: Grid
    window: Optional[Grid] = None  # window attention: window size on the input grid; None: global attention


def block_specs(cfg: MViTCfg) -> list[list[BlockSpec]]:
    """The blocks of each stage: channels, heads, pooling kernels and strides (MViT tables 1-3), and the
    windows of hybrid window attention (MViTv2 sec. 4.2): a block attends within windows of `window` input
    tokens, except the last block of each `global_stages` stage, which attends globally; the last block of each
    `stride_kv_doubled` stage pools K/V by twice the stage's stride (detectron2's `MViT` builds the same)."""
    nd, n_stages = cfg.ndim, len(cfg.depths)
    ones = (1,) * nd

    def kernel_for(stride: Grid) -> Optional[Grid]:
        kernel = cfg.kernel_qkv or tuple(s + 1 if s > 1 else s for s in stride)
        return None if math.prod(kernel) == 1 and math.prod(stride) == 1 else tuple(kernel)

    grid = tuple(s // p for s, p in zip(cfg.img_size, cfg.patch_stride))
    window = None if cfg.window_size is None else (cfg.window_size,) * nd  # on the input grid of the block
    stride_kv = tuple(cfg.stride_kv_adaptive)
    dim = cfg.embed_dim[0]
    stages = []
    for i, depth in enumerate(cfg.depths):
        stage_stride_q = ones if i == 0 else tuple(cfg.stride_q)
        stride_kv = tuple(max(s // q, 1) for s, q in zip(stride_kv, stage_stride_q))
        stage_dim = cfg.embed_dim[i] if cfg.expand_attn else cfg.embed_dim[min(i + 1, n_stages - 1)]
        blocks = []
        for j in range(depth):
            dim_out = stage_dim if (cfg.expand_attn or j == depth - 1) else dim
            stride_q = stage_stride_q if j == 0 else ones
            kernel_q = kernel_for(stride_q) if (cfg.pool_q_all_blocks or math.prod(stride_q) > 1) else None
            last = j == depth - 1
            block_stride_kv = tuple(2 * s for s in stride_kv) if last and i in cfg.stride_kv_doubled else stride_kv
            block_window = None if last and i in cfg.global_stages else window
            if block_window is not None and any(w % s for w, s in zip(block_window * 2, stride_q + block_stride_kv)):
                raise ValueError(f"MViTCfg.window_size={cfg.window_size}: stage {i} block {j} has windows of "
                                 f"{block_window} tokens, not divisible by its Q stride {stride_q} and K/V stride "
                                 f"{block_stride_kv}; use a window_size whose stage windows divide by them "
                                 "(detectron2: 56)")
            blocks.append(BlockSpec(
                dim=dim, dim_out=dim_out, num_heads=cfg.num_heads[i], grid=grid,
                kernel_q=kernel_q, stride_q=stride_q, kernel_kv=kernel_for(block_stride_kv), stride_kv=block_stride_kv,
                window=block_window,
            ))
            dim = dim_out
            if j == 0:
                grid = tuple(g // s for g, s in zip(grid, stride_q))
                window = None if window is None else tuple(w // s for w, s in zip(window, stride_q))
        stages.append(blocks)
    return stages


# --------------------------------------------------------------------------------------------------
# Patch embedding (MViT sec. 3.2: a strided conv, "cube" for video)
# --------------------------------------------------------------------------------------------------

def token_grid(x: Tensor) -> List[int]:
    """The grid (H, W) or (T, H, W) of a map (B, C, *grid)."""
    return list(x.shape[2:])


class PatchEmbed(nn.Module):
    """Patchify with a strided conv: (B, C, *size) -> tokens (B, N, D) and their grid."""

    def __init__(self, in_chans: int, dim: int, kernel: Grid, stride: Grid, padding: Grid) -> None:
        super().__init__()
        self.proj = (nn.Conv2d, nn.Conv3d)[len(kernel) - 2](in_chans, dim, kernel, stride, padding)

    def forward(self, x: Tensor) -> Tuple[Tensor, List[int]]:
        x = self.proj(x)
        # NOTE contiguous: a residual sum takes its first operand's layout, so a transposed view here
        # would hand every block of the first stage channel-strided tokens (slow LayerNorms, copies, convs)
        return x.flatten(2).transpose(1, 2).contiguous(), token_grid(x)


# --------------------------------------------------------------------------------------------------
# Pooling (MViT sec. 3.1: pooling operator P on the token grid)
# --------------------------------------------------------------------------------------------------

class TokenPool(nn.Module):
    """Pool tokens (B, P + N, C) on their grid -> (B, P + N', C) and the pooled grid; the P prefix tokens
    pass through unchanged.

    'conv' is a depthwise conv over one head's channels (C / heads) shared by all heads (its `weight`
    is the reference's `pool_q.weight`): heads stay folded in the channels and the conv runs once,
    channels-last, with its kernel repeated per head. 'max' and 'avg' pool every channel.
    """

    def __init__(self, mode: str, nd: int, channels: int, kernel: Grid, stride: Grid, num_prefix: int,
                 heads: int = 1) -> None:
        super().__init__()
        self.mode = mode
        self.heads = heads
        self.num_prefix = num_prefix
        self.stride = list(stride)
        self.padding = [k // 2 for k in kernel]
        self.kernel = list(kernel)
        self.avg_pool = ((nn.AvgPool2d, nn.AvgPool3d)[nd - 2](kernel, stride, self.padding) if mode == "avg"
                         else nn.Identity())
        self.register_parameter("weight", None)
        if mode == "conv":
            self.weight = nn.Parameter(torch.empty((channels, 1) + tuple(kernel)))
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Conv's default init

    def forward(self, x: Tensor, grid: List[int]) -> Tuple[Tensor, List[int]]:
        p = self.num_prefix
        prefix, x = x[:, :p], x[:, p:]
        B, C = x.shape[0], x.shape[2]
        x = x.reshape([B] + grid + [C]).contiguous().movedim(-1, 1)  # (B, C, *grid), channels-last
        if self.weight is not None:
            weight = self.weight.repeat([self.heads] + [1] * (self.weight.dim() - 1))
            x = depthwise_conv(x, weight, self.stride, self.padding)
        elif self.mode == "max":
            x = max_pool(x, self.kernel, self.stride, self.padding)
        x = self.avg_pool(x)
        grid = token_grid(x)
        x = x.movedim(1, -1).reshape(B, -1, C)
        if p > 0:
            x = torch.cat((prefix, x), dim=1)
        return x, grid

    def extra_repr(self) -> str:
        return f"{self.mode}, stride={self.stride}, heads={self.heads}"


# --------------------------------------------------------------------------------------------------
# Decomposed relative positions (MViTv2 sec. 4.1, eq. 4; the bias itself: ops.attention.rel_pos_terms)
# --------------------------------------------------------------------------------------------------

def rel_pos_index(q_size: int, k_size: int, device: torch.device) -> Tensor:
    """Table row of each (query, key) position pair along one axis, (q_size, k_size) long: query and key
    positions scaled to the finer of the two grids."""
    q_ratio = max(k_size / q_size, 1.0)
    k_ratio = max(q_size / k_size, 1.0)
    dist = (torch.arange(q_size, device=device).unsqueeze(-1) * q_ratio
            - torch.arange(k_size, device=device).unsqueeze(0) * k_ratio)
    return (dist + (k_size - 1) * k_ratio).long()


def rel_pos_lookup(table: Tensor, q_size: int, k_size: int) -> Tensor:
    """R (q_size, k_size, C) for one axis from a (L, C) table, linearly interpolated to 2 * max(q_size,
    k_size) - 1 entries when it was built for another size."""
    length = 2 * max(q_size, k_size) - 1
    if table.shape[0] != length:
        table = F.interpolate(table.t().unsqueeze(0), size=length, mode="linear").squeeze(0).t()
    return F.embedding(rel_pos_index(q_size, k_size, table.device), table)


# --------------------------------------------------------------------------------------------------
# Windows (MViTv2 sec. 4.2, hybrid window attention)
# --------------------------------------------------------------------------------------------------

def window_partition(x: Tensor, grid: List[int], window: List[int]) -> Tensor:
    """Tokens (B, H * W, C) on `grid` (H, W) -> windows (B * nH * nW, wh * ww, C), nH = ceil(H / wh): the grid
    zero-padded at its bottom and right to whole windows, windows in row-major order."""
    B, C = x.shape[0], x.shape[2]
    H, W = grid[0], grid[1]
    wh, ww = window[0], window[1]
    nh, nw = -(-H // wh), -(-W // ww)
    x = x.reshape(B, H, W, C)
    if nh * wh != H or nw * ww != W:
        x = F.pad(x, (0, 0, 0, nw * ww - W, 0, nh * wh - H))
    return x.view(B, nh, wh, nw, ww, C).transpose(2, 3).reshape(B * nh * nw, wh * ww, C)


def window_unpartition(x: Tensor, grid: List[int], window: List[int]) -> Tensor:
    """Windows (B * nH * nW, wh * ww, C) -> tokens (B, H * W, C) on `grid` (H, W), the padding cropped."""
    C = x.shape[2]
    H, W = grid[0], grid[1]
    wh, ww = window[0], window[1]
    nh, nw = -(-H // wh), -(-W // ww)
    x = x.reshape(-1, nh, nw, wh, ww, C).transpose(2, 3).reshape(-1, nh * wh, nw * ww, C)
    if nh * wh != H or nw * ww != W:
        x = x[:, :H, :W]
    return x.reshape(x.shape[0], H * W, C)


# --------------------------------------------------------------------------------------------------
# Pooling attention (MViT sec. 3.1, MViTv2 sec. 4.1-4.2)
# --------------------------------------------------------------------------------------------------

class MultiScaleAttention(nn.Module):
    """Pooling attention: Q, K and V are pooled on the token grid, Q by the stage stride (the block
    downsamples), K and V by a larger one (cheaper attention). MViTv2 adds decomposed relative
    positions and residual pooling. `mvit_zoo.ops.attention` computes the attention itself; `fused_attn`
    False (or MVIT_FUSED_ATTN=0 at construction) takes the explicit softmax(QK^T + bias) V path.

    A window block (`spec.window`) pools Q, K and V on the whole grid, then attends within windows of
    window / stride_q queries and window / stride_kv keys (relative positions at those sizes), each window
    a batch entry of the same attention call; residual pooling adds the whole pooled Q afterwards.
    """

    def __init__(self, spec: BlockSpec, cfg: MViTCfg, dim_out: int, norm_layer: Callable[[int], nn.Module]) -> None:
        super().__init__()
        nd = cfg.ndim
        self.num_heads = spec.num_heads
        self.dim_out = dim_out
        self.head_dim = dim_out // spec.num_heads
        self.scale = self.head_dim ** -0.5
        self.num_prefix = 1 if cfg.use_cls_token else 0
        self.residual_pooling = cfg.residual_pooling
        self.residual_skip = 0 if cfg.residual_pool_cls else self.num_prefix  # rows without residual pooling
        self.fused_attn = use_fused_attn()
        self.window_q = None  # window attention: Q and K/V windows (pooled tokens per side); None: global
        self.window_kv = None
        if spec.window is not None:
            self.window_q = [w // s for w, s in zip(spec.window, spec.stride_q)]
            self.window_kv = [w // s for w, s in zip(spec.window, spec.stride_kv)]

        self.qkv = nn.Linear(spec.dim, 3 * dim_out, bias=cfg.qkv_bias)
        self.proj = nn.Linear(dim_out, dim_out)

        pool_norm = norm_layer if cfg.pool_norm_eps is None else _layer_norm(cfg.pool_norm_eps)

        def pool(kernel: Optional[Grid], stride: Grid) -> tuple[Optional[nn.Module], Optional[nn.Module]]:
            if kernel is None:
                return None, None
            module = TokenPool(cfg.pool_mode, nd, self.head_dim, kernel, stride, self.num_prefix, self.num_heads)
            return module, (pool_norm(self.head_dim) if cfg.pool_mode == "conv" else None)

        self.pool_q, self.norm_q = pool(spec.kernel_q, spec.stride_q)
        self.pool_k, self.norm_k = pool(spec.kernel_kv, spec.stride_kv)
        self.pool_v, self.norm_v = pool(spec.kernel_kv, spec.stride_kv)

        self.register_parameter("rel_pos_h", None)
        self.register_parameter("rel_pos_w", None)
        self.register_parameter("rel_pos_t", None)
        if cfg.rel_pos:
            # table lengths as in the reference code: from the build grid, by floor division
            def table(axis: int) -> nn.Parameter:
                size = spec.grid[axis]
                length = 2 * max(size // spec.stride_q[axis], size // spec.stride_kv[axis]) - 1
                return nn.Parameter(trunc_normal_tf_(torch.zeros(length, self.head_dim), std=0.02))

            self.rel_pos_h, self.rel_pos_w = table(nd - 2), table(nd - 1)
            if cfg.rel_pos_temporal:
                self.rel_pos_t = nn.Parameter(trunc_normal_tf_(torch.zeros(2 * spec.grid[0] - 1, self.head_dim),
                                                               std=0.02))

    def _heads(self, x: Tensor) -> Tensor:
        """(B, L, C) -> (B, heads, L, head_dim), a view."""
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, grid: List[int]) -> Tuple[Tensor, Tensor, List[int]]:
        """Projected q, k, v (B, P + N, C) on `grid` -> the attention output and the pooled q, each
        (B, heads, P + Nq, head_dim), and the Q grid."""
        B, h, d = q.shape[0], self.num_heads, self.head_dim
        q_grid, k_grid = grid, grid
        # pool, then normalise per head (heads are folded in the channels)
        if self.pool_q is not None:
            q, q_grid = self.pool_q(q, grid)
        if self.norm_q is not None:
            q = self.norm_q(q.view(B, -1, h, d)).view(B, -1, h * d)
        if self.pool_k is not None:
            k, k_grid = self.pool_k(k, grid)
        if self.norm_k is not None:
            k = self.norm_k(k.view(B, -1, h, d)).view(B, -1, h * d)
        if self.pool_v is not None:
            v, _ = self.pool_v(v, grid)
        if self.norm_v is not None:
            v = self.norm_v(v.view(B, -1, h, d)).view(B, -1, h * d)
        q_attn, q_attn_grid, k_attn_grid = q, q_grid, k_grid
        window_q, window_kv = self.window_q, self.window_kv
        if window_q is not None and window_kv is not None:
            # NOTE as detectron2: the pooled maps are zero-padded to whole windows and the padded keys are
            # attended to, unmasked (logit: the relative-position bias alone; value: zero)
            q_attn, q_attn_grid = window_partition(q, q_grid, window_q), window_q
            k, v = window_partition(k, k_grid, window_kv), window_partition(v, k_grid, window_kv)
            k_attn_grid = window_kv
        tables: List[Optional[Tensor]] = [self.rel_pos_t, self.rel_pos_h, self.rel_pos_w]
        tables = tables[3 - len(grid):]
        rel: List[Optional[Tensor]] = []
        for axis, table in enumerate(tables):
            rel.append(None if table is None else rel_pos_lookup(table, q_attn_grid[axis], k_attn_grid[axis]))
        out = attention(self._heads(q_attn), self._heads(k), self._heads(v), self.scale, q_attn_grid, k_attn_grid,
                        rel, self.num_prefix, self.fused_attn)
        if window_q is not None:
            # (B nW, h, wq_h * wq_w, d) -> (B, h, Nq, d), laid out (B, Nq, h, d) as SDPA's output is
            out = window_unpartition(merge_heads(out), q_grid, window_q).view(B, -1, h, d).transpose(1, 2)
        return out, self._heads(q), q_grid

    def forward(self, x: Tensor, grid: List[int]) -> Tuple[Tensor, List[int]]:
        """x: (B, P + N, C_in) on `grid` -> (B, P + N_q, C_out) on the Q-pooled grid."""
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        out, q, q_grid = self.attend(q, k, v, grid)
        if self.residual_pooling:
            out = residual_pooling(out, q, self.residual_skip)
        return self.proj(merge_heads(out)), q_grid


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 on the last axis: (..., C_in) -> (..., C_out)."""

    def __init__(self, dim: int, hidden: int, dim_out: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


# --------------------------------------------------------------------------------------------------
# Block and stage (MViT sec. 3.2-3.3, MViTv2 fig. 2)
# --------------------------------------------------------------------------------------------------

@register_notrace_module  # a leaf for timm's fx feature extraction (token grids are Python lists)
class MultiScaleBlock(nn.Module):
    """Pooling attention and MLP, each with a residual; the attention shortcut is max-pooled by the
    Q stride, and a linear projection on it changes channels where the block does."""

    def __init__(self, spec: BlockSpec, cfg: MViTCfg, drop_path: float, norm_layer: Callable[[int], nn.Module]) -> None:
        super().__init__()
        dim, dim_out = spec.dim, spec.dim_out
        attn_dim = dim_out if cfg.expand_attn else dim
        self.norm1 = norm_layer(dim)
        self.shortcut_proj_attn = nn.Linear(dim, dim_out) if cfg.expand_attn and dim != dim_out else None
        self.shortcut_pool_attn = None  # (no annotation: TorchScript warns on an Optional one in __init__)
        if math.prod(spec.stride_q) > 1:
            kernel = tuple(s + 1 if s > 1 else s for s in spec.stride_q)
            self.shortcut_pool_attn = TokenPool("max", cfg.ndim, dim, kernel, spec.stride_q,
                                                1 if cfg.use_cls_token else 0)
        self.attn = MultiScaleAttention(spec, cfg, attn_dim, norm_layer)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(attn_dim)
        self.shortcut_proj_mlp = nn.Linear(dim, dim_out) if not cfg.expand_attn and dim != dim_out else None
        self.mlp = Mlp(attn_dim, int(attn_dim * cfg.mlp_ratio), dim_out)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.memory_efficient = False  # set by MViT: run through forward_memory_efficient

    def _pool_shortcut(self, shortcut: Tensor, grid: List[int]) -> Tensor:
        if self.shortcut_pool_attn is None:
            return shortcut
        return self.shortcut_pool_attn(shortcut, grid)[0]

    def forward(self, x: Tensor, grid: List[int]) -> Tuple[Tensor, List[int]]:
        if not torch.jit.is_scripting():  # (TorchScript compiles no autograd function: it calls the modules)
            if self.memory_efficient:
                return self.forward_memory_efficient(x, grid)
        # as in the reference: the shortcut is the un-normalised input, unless it is projected
        x_norm = self.norm1(x)
        shortcut = x if self.shortcut_proj_attn is None else self.shortcut_proj_attn(x_norm)
        x_attn, q_grid = self.attn(x_norm, grid)
        x = self._pool_shortcut(shortcut, grid) + self.drop_path1(x_attn)
        x_norm = self.norm2(x)
        shortcut = x if self.shortcut_proj_mlp is None else self.shortcut_proj_mlp(x_norm)
        return shortcut + self.drop_path2(self.mlp(x_norm)), q_grid

    @torch.jit.unused
    def forward_memory_efficient(self, x: Tensor, grid: List[int]) -> Tuple[Tensor, List[int]]:
        """`forward` through `mvit_zoo.ops.memory`, with the same values and gradients. Training keeps less for
        backward: norm1 + q/k/v (+ shortcut projection) keep x only, residual pooling + projection keep no sum,
        norm2 + MLP keep x and fc1's output. Inference makes q, k and v as three GEMMs (contiguous for the
        pooling) and the MLP in row blocks (`ops.memory.norm_mlp`). It reads the modules' parameters instead
        of calling them, so `MViT` sets it only on blocks whose modules are plain (`ops.memory.not_plain`)."""
        attn, proj = self.attn, self.shortcut_proj_attn
        weights, biases = (list(attn.qkv.weight.chunk(3)),
                           [None] * 3 if attn.qkv.bias is None else list(attn.qkv.bias.chunk(3)))
        if proj is not None:
            weights, biases = weights + [proj.weight], biases + [proj.bias]
        norm1, norm2, mlp = self.norm1, self.norm2, self.mlp
        q, k, v, *shortcut = norm_linears(x, norm1.weight, norm1.bias, norm1.eps, weights, biases)
        out, q, q_grid = attn.attend(q, k, v, grid)
        x_attn = residual_linear(out, q if attn.residual_pooling else None, attn.residual_skip, attn.proj.weight,
                                 attn.proj.bias)
        x = self._pool_shortcut(shortcut[0] if proj is not None else x, grid) + self.drop_path1(x_attn)
        if self.shortcut_proj_mlp is not None:
            x_norm = self.norm2(x)
            return self.shortcut_proj_mlp(x_norm) + self.drop_path2(self.mlp(x_norm)), q_grid
        x_mlp = norm_mlp(x, norm2.weight, norm2.bias, norm2.eps, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight,
                         mlp.fc2.bias)
        return x + self.drop_path2(x_mlp), q_grid

    def blockers(self) -> List[str]:
        """What `forward_memory_efficient` would skip in this block (`ops.memory.not_plain`); [] if nothing."""
        modules = dict(attn=self.attn, mlp=self.mlp, norm1=self.norm1, norm2=self.norm2,
                       shortcut_proj_attn=self.shortcut_proj_attn)
        if isinstance(self.attn, MultiScaleAttention):
            modules.update({"attn.qkv": self.attn.qkv, "attn.proj": self.attn.proj})
        if isinstance(self.mlp, Mlp):
            modules.update({"mlp.fc1": self.mlp.fc1, "mlp.fc2": self.mlp.fc2})
        return not_plain(modules, dict(attn=MultiScaleAttention, mlp=Mlp, norm1=nn.LayerNorm, norm2=nn.LayerNorm))


class MultiScaleStage(nn.Module):
    """The blocks of one scale; the first block pools Q (halving H and W) except in stage 0. `norm` is the
    LayerNorm of the stage's output map with `MViTCfg.stage_norms` (applied by `MViT.forward_intermediates`
    only: the next stage takes the un-normalised tokens), else an identity."""

    def __init__(self, specs: list[BlockSpec], cfg: MViTCfg, drop_path: list[float],
                 norm_layer: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [MultiScaleBlock(spec, cfg, dp, norm_layer) for spec, dp in zip(specs, drop_path)]
        )
        self.norm = norm_layer(specs[-1].dim_out) if cfg.stage_norms else nn.Identity()
        self.grad_checkpointing = False

    def forward(self, x: Tensor, grid: List[int]) -> Tuple[Tensor, List[int]]:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return self._forward_checkpointed(x, grid)
        for block in self.blocks:
            x, grid = block(x, grid)
        return x, grid

    @torch.jit.unused
    def _forward_checkpointed(self, x: Tensor, grid: List[int]) -> Tuple[Tensor, List[int]]:
        """Each block's activations are recomputed in backward instead of kept."""
        for block in self.blocks:
            x, grid = checkpoint(block, x, grid, use_reentrant=False)
        return x, grid


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------

def add_abs_pos(x: Tensor, pos_embed: Optional[Tensor], spatial: Optional[Tensor], temporal: Optional[Tensor],
                cls: Optional[Tensor], build_grid: List[int], grid: List[int], num_prefix: int) -> Tensor:
    """Tokens x (B, P + N, C) on `grid` plus the absolute position embedding (1, P + N, C), interpolated from
    the build grid: one joint table (`pos_embed`), or MViT v1's separable space + time (+ class) tables."""
    if pos_embed is not None:
        if grid == build_grid:
            return x + pos_embed
        return x + torch.cat((pos_embed[:, :num_prefix], _resize_grid(pos_embed[:, num_prefix:], build_grid, grid)),
                             dim=1)
    if spatial is None:
        return x
    pos = _resize_grid(spatial, build_grid[-2:], grid[-2:])
    if temporal is not None:
        if temporal.shape[1] != grid[0]:
            temporal = F.interpolate(temporal.transpose(1, 2), size=grid[0], mode="linear").transpose(1, 2)
        pos = pos.repeat(1, grid[0], 1) + temporal.repeat_interleave(pos.shape[1], dim=1)
    if cls is not None:
        pos = torch.cat((cls, pos), dim=1)
    return x + pos


def tokens_to_map(x: Tensor, grid: List[int], num_prefix: int) -> Tensor:
    """Tokens (B, P + N, C) -> map (B, C, *grid), the P prefix tokens dropped."""
    B, _, C = x.shape
    return x[:, num_prefix:].reshape([B] + grid + [C]).movedim(-1, 1)


# torch.fx symbolic tracing: record these calls instead of tracing into them (they read shapes or
# check values, which a Proxy has not); MultiScaleBlock is a leaf module for timm's fx feature extraction
torch.fx.wrap("check_input")
torch.fx.wrap("add_abs_pos")
torch.fx.wrap("token_grid")
torch.fx.wrap("tokens_to_map")


class MViT(nn.Module):
    """Multiscale Vision Transformer for images (B, C, H, W) or video (B, C, T, H, W).

    A four-stage pyramid at strides 4, 8, 16, 32 (space; time keeps the patch stride), a final
    LayerNorm, and a linear classifier on the class token ('token') or the mean of the grid tokens
    ('avg').
    """

    __jit_unused_properties__ = ["min_input_size"]

    def __init__(
            self,
            cfg: MViTCfg,
            img_size: Optional[Union[int, Sequence[int]]] = None,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: Optional[str] = None,
            drop_rate: Optional[float] = None,
            drop_path_rate: float = 0.0,
            **cfg_overrides: Any,
    ) -> None:
        super().__init__()
        if img_size is not None:
            cfg_overrides["img_size"] = img_size
        cfg = make_cfg(cfg, **cfg_overrides)
        if global_pool is None:
            global_pool = "token" if cfg.use_cls_token else "avg"
        self._check_global_pool(global_pool, cfg.use_cls_token)
        self.cfg = cfg
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.drop_rate = cfg.drop_rate if drop_rate is None else drop_rate
        self.img_size = cfg.img_size
        self.is_video = cfg.ndim == 3
        self.num_prefix_tokens = 1 if cfg.use_cls_token else 0
        self.check_finite = False  # opt-in NaN/Inf input check (a full pass over the input)
        norm_layer = _layer_norm(cfg.norm_eps)
        dim0 = cfg.embed_dim[0]

        self.patch_embed = PatchEmbed(in_chans, dim0, cfg.patch_kernel, cfg.patch_stride, cfg.patch_padding)
        self.patch_grid = tuple(s // p for s, p in zip(cfg.img_size, cfg.patch_stride))
        self._patch_grid = list(self.patch_grid)  # (as a list, the type the forward's grids have)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim0)) if cfg.use_cls_token else None
        self.register_parameter("pos_embed", None)
        self.register_parameter("pos_embed_spatial", None)
        self.register_parameter("pos_embed_temporal", None)
        self.register_parameter("pos_embed_class", None)
        if cfg.abs_pos == "joint":
            self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + math.prod(self.patch_grid), dim0))
        elif cfg.abs_pos == "separable":
            self.pos_embed_spatial = nn.Parameter(torch.zeros(1, math.prod(self.patch_grid[-2:]), dim0))
            if self.is_video:
                self.pos_embed_temporal = nn.Parameter(torch.zeros(1, self.patch_grid[0], dim0))
            if cfg.use_cls_token:
                self.pos_embed_class = nn.Parameter(torch.zeros(1, 1, dim0))

        specs = block_specs(cfg)
        n_blocks = sum(cfg.depths)
        dpr = [drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)]
        self.stages = nn.ModuleList()
        self.feature_info = []
        stride = list(cfg.patch_stride)
        for i, stage_specs in enumerate(specs):
            start = sum(cfg.depths[:i])
            self.stages.append(MultiScaleStage(stage_specs, cfg, dpr[start:start + len(stage_specs)], norm_layer))
            stride = [s * q for s, q in zip(stride, stage_specs[0].stride_q)]
            info = dict(num_chs=stage_specs[-1].dim_out, reduction=stride[-1], module=f"stages.{i}")
            if self.is_video:
                info["stride"] = tuple(stride)
            self.feature_info.append(info)
        self.num_features = self.head_hidden_size = specs[-1][-1].dim_out
        # NOTE with stage norms (detectron2's backbones) there is no final norm: the last stage's own norm
        # (`stages.3.norm`, detectron2's scale5_norm) takes its place; the others normalise pyramid maps only
        self.norm = nn.Identity() if cfg.stage_norms else norm_layer(self.num_features)
        self.head = self._make_head(num_classes)
        self._init_weights()
        self.set_memory_efficient(True)

    # -- construction helpers ---------------------------------------------------------------------

    @staticmethod
    def _check_global_pool(global_pool: str, has_cls: bool) -> None:
        if global_pool not in ("", "avg", "token"):
            raise ValueError(f"global_pool must be 'avg', 'token' or '' (none), got {global_pool!r}")
        if global_pool == "token" and not has_cls:
            raise ValueError("global_pool='token' needs a class token; this model has none (use 'avg')")

    def _make_head(self, num_classes: int) -> nn.Sequential:
        return nn.Sequential(OrderedDict([
            ("drop", nn.Dropout(self.drop_rate)),
            ("fc", nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()),
        ]))

    def _init_weights(self) -> None:
        for p in (self.cls_token, self.pos_embed, self.pos_embed_spatial, self.pos_embed_temporal,
                  self.pos_embed_class):
            if p is not None:
                trunc_normal_tf_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_tf_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # -- timm model API ---------------------------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if any(k in n for k in ("pos_embed", "rel_pos", "cls_token"))}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise learning-rate decay: the stem, then each block (or stage)."""
        blocks = r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.blocks\.(\d+)"
        return dict(stem=r"^cls_token|^pos_embed|^patch_embed",
                    blocks=[(blocks, None), (r"^stages\.(\d+)\.norm", (99999,)), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def set_memory_efficient(self, enable: bool = True) -> None:
        """Run the blocks through `MultiScaleBlock.forward_memory_efficient` (default): the same values and
        gradients, less kept for backward in training, less peak memory and time in CPU inference
        (`mvit_zoo.ops.memory`). Decided here and at every `train()` / `eval()`, not per call: a block whose
        linears or norms are replaced (LoRA, quantisation), patched or hooked, or with global module hooks
        registered, calls its modules instead (in training with a warning that names why). Hooks or
        replacements made after that are seen at the next `train()`, `eval()` or `set_memory_efficient()`."""
        self.memory_efficient = enable
        blocks = [(n, m) for n, m in self.named_modules() if isinstance(m, MultiScaleBlock)]
        skipped = []
        for name, block in blocks:
            reasons = block.blockers() if enable else []
            block.memory_efficient = enable and not reasons
            if reasons:
                skipped.append(f"{name}: {', '.join(reasons)}")
        if skipped and self.training:
            warnings.warn(
                f"memory-efficient training is off for {len(skipped)} of {len(blocks)} blocks, which call their "
                f"modules (hooks and replaced modules need that; it keeps more for backward): {'; '.join(skipped[:3])}"
                f"{'; ...' if len(skipped) > 3 else ''}. model.set_memory_efficient(False) turns it off everywhere",
                stacklevel=2)

    def train(self, mode: bool = True) -> MViT:
        super().train(mode)
        self.set_memory_efficient(self.memory_efficient)
        return self

    def set_fused_attn(self, enable: bool = True) -> None:
        """Use `scaled_dot_product_attention` (default) or the explicit softmax(QK^T + bias) V path."""
        for m in self.modules():
            if isinstance(m, MultiScaleAttention):
                m.fused_attn = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            self._check_global_pool(global_pool, self.cls_token is not None)
            self.global_pool = global_pool
        self.num_classes = num_classes
        ref = self.patch_embed.proj.weight
        self.head = self._make_head(num_classes).to(device=ref.device, dtype=ref.dtype)
        if isinstance(self.head.fc, nn.Linear):
            trunc_normal_tf_(self.head.fc.weight, std=0.02)
            nn.init.zeros_(self.head.fc.bias)
        self.head.train(self.training)

    # -- input checks ------------------------------------------------------------------------------

    @property
    def min_input_size(self) -> Grid:
        """Smallest accepted input per axis. Space: the total stride (32), so the last stage still sees a
        whole cell. Time: 1 frame (a single image is a 1-frame clip, x.unsqueeze(2)). Every axis is padded,
        so stage i has ceil(size / stride_i) positions per axis."""
        total = list(self.cfg.patch_stride)
        for _ in self.cfg.depths[1:]:
            total = [t * q for t, q in zip(total, self.cfg.stride_q)]
        if self.cfg.ndim == 3:
            total[0] = 1  # the padded patch conv makes one token of one frame; time is not pooled after it
        return tuple(total)

    @torch.jit.unused
    def check_input(self, x: Tensor) -> Tensor:
        """x, or a ValueError/TypeError that names the problem and the fix for a malformed input."""
        return check_input(x, self.patch_embed.proj.weight, self.in_chans, self.img_size, self.min_input_size,
                           self.check_finite)

    # -- forward -----------------------------------------------------------------------------------

    def embed(self, x: Tensor) -> Tuple[Tensor, List[int]]:
        """Input -> tokens (B, P + N, C) with class token and absolute positions, and their grid."""
        if torch.jit.is_scripting():
            check_input_scripted(x, len(self._patch_grid), self.in_chans)
        else:
            x = self.check_input(x)
        x, grid = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = add_abs_pos(x, self.pos_embed, self.pos_embed_spatial, self.pos_embed_temporal, self.pos_embed_class,
                        self._patch_grid, grid, self.num_prefix_tokens)
        return x, grid

    def forward_features(self, x: Tensor) -> Tensor:
        """Input -> normalised tokens (B, P + N, C) of the last stage."""
        x, grid = self.embed(x)
        last = len(self.stages) - 1
        for i, stage in enumerate(self.stages):
            x, grid = stage(x, grid)
            if i == last:
                x = stage.norm(x)  # the last stage's own norm (stage norms), else an identity
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Tokens (B, P + N, C) -> logits (B, num_classes), or pooled features if pre_logits."""
        if self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        elif self.global_pool == "token":
            x = x[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
            self,
            x: Tensor,
            indices: Optional[Union[int, list[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[list[Tensor], tuple[Tensor, list[Tensor]]]:
        """The output of each selected stage (default: all four).

        output_fmt 'NCHW' gives maps (B, C, H, W) for images and (B, C, T, H, W) for video ('NCTHW' is
        accepted too), class token dropped; 'NLC' gives the tokens (B, P + N, C) as they are.
        `norm` applies the final norm to the last stage's output. With `MViTCfg.stage_norms` every output
        is normalised by its stage's norm (detectron2's scale2..scale5 maps), whatever `norm` says.
        """
        if output_fmt not in ("NCHW", "NCTHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' (maps) or 'NLC' (tokens), got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last = len(self.stages) - 1
        stages = self.stages[:max_index + 1] if stop_early else self.stages
        intermediates = []
        x, grid = self.embed(x)
        feat_idx = -1
        for feat_idx, stage in enumerate(stages):
            x, grid = stage(x, grid)
            if feat_idx == last:
                x = stage.norm(x)  # the last stage's own norm (stage norms), else an identity
            if feat_idx in take_indices:
                x_inter = x if feat_idx == last else stage.norm(x)
                if norm and feat_idx == last:
                    x_inter = self.norm(x_inter)
                x_out = x_inter if output_fmt == "NLC" else tokens_to_map(x_inter, grid, self.num_prefix_tokens)
                intermediates.append(x_out)
        if intermediates_only:
            return intermediates
        if feat_idx == last:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, list[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> list[int]:
        """Drop the stages (and norm/head) that the selected intermediates do not need."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices


def _layer_norm(eps: float) -> Callable[[int], nn.Module]:
    """nn.LayerNorm with this eps; a partial (not a local class), so built models pickle."""
    return functools.partial(nn.LayerNorm, eps=eps)


def _resize_grid(tokens: Tensor, src: List[int], dst: List[int]) -> Tensor:
    """Interpolate (1, prod(src), C) grid embeddings to (1, prod(dst), C): bicubic in 2D, trilinear in 3D."""
    if src == dst:
        return tokens
    C = tokens.shape[-1]
    x = tokens.reshape([1] + src + [C]).movedim(-1, 1)
    mode = "bicubic" if len(src) == 2 else "trilinear"
    x = F.interpolate(x, size=dst, mode=mode, align_corners=False)
    return x.movedim(1, -1).reshape(1, -1, C)
