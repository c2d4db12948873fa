"""Checks of a model input that name the problem and the fix (`MViT.check_input`, run by every forward)."""
from __future__ import annotations

import torch
from torch import Tensor

Grid = tuple[int, ...]

__all__ = ["check_input", "check_input_scripted"]


def check_input(x: Tensor, weight: Tensor, in_chans: int, img_size: Grid, min_size: Grid, check_finite: bool) -> Tensor:
    """x itself, or a ValueError/TypeError that names the problem and the fix for a malformed model input.

    `weight` is the patch embedding's (its dtype is the model's). A leaf for torch.fx (`torch.fx.wrap`
    in the model file): symbolic tracing records the call (x flows through it, so it is not dropped as dead code),
    and the traced module checks real inputs.
    """
    nd = len(min_size)
    layout = "(B, C, T, H, W)" if nd == 3 else "(B, C, H, W)"
    if not isinstance(x, Tensor):
        raise TypeError(f"expected a torch.Tensor {layout}, got {type(x).__name__}")
    if x.ndim != nd + 2:
        if nd == 3 and x.ndim == 4:
            raise ValueError(
                f"this is a video model and expects {layout}; got a 4-D tensor {tuple(x.shape)}. For a "
                f"single image add a time axis (x.unsqueeze(2)); the model was built for {img_size[0]} frames")
        if nd == 2 and x.ndim == 5:
            raise ValueError(
                f"this is an image model and expects {layout}; got a 5-D video tensor {tuple(x.shape)}. "
                f"Use a video model (e.g. mvit_v2_s_16x4) or fold time into the batch")
        hint = "; for a single sample add a batch axis (x.unsqueeze(0))" if x.ndim == nd + 1 else ""
        raise ValueError(f"expected a {nd + 2}-D input {layout}, got {x.ndim}-D {tuple(x.shape)}{hint}")
    if not x.is_floating_point():
        raise TypeError(
            f"expected a floating-point input, got {x.dtype}; convert and normalise it first, e.g. "
            f"x.float() / 255 then (x - mean) / std with the model's pretrained_cfg mean/std")
    autocast = torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type)
    if x.dtype != weight.dtype and not autocast:
        raise TypeError(
            f"input dtype {x.dtype} does not match the model's {weight.dtype} weights; convert the input "
            f"(x.to({weight.dtype})) or the model (model.to({x.dtype})), or run under torch.autocast")
    if x.shape[0] == 0:
        raise ValueError("got an empty batch (batch size 0); pass at least one sample")
    if x.shape[1] != in_chans:
        if x.shape[-1] == in_chans:
            order = "(B, T, H, W, C)" if nd == 3 else "(B, H, W, C)"
            axes = "0, 4, 1, 2, 3" if nd == 3 else "0, 3, 1, 2"
            raise ValueError(
                f"the input {tuple(x.shape)} looks channels-last {order}: its last axis has the model's "
                f"{in_chans} channels; the model expects {layout}: permute it, x.permute({axes})")
        hint = " (video may be (B, T, C, H, W): permute to (B, C, T, H, W))" if nd == 3 else ""
        raise ValueError(
            f"expected {in_chans} input channels at dim 1 {layout}, got {x.shape[1]}{hint}; "
            f"create the model with in_chans={x.shape[1]} to use other channel counts")
    if check_finite and not torch.isfinite(x).all():
        raise ValueError("input contains NaN or Inf values; clean the input (the check is on because "
                         "model.check_finite = True)")
    small = [(name, size, low) for name, size, low in zip(("T", "H", "W")[-nd:], x.shape[2:], min_size) if size < low]
    if small:
        what = ", ".join(f"{n}={s} (min {m})" for n, s, m in small)
        raise ValueError(
            f"input too small for the pooling stack: {what}; each axis needs at least its total stride "
            f"{min_size} so every stage keeps one token. Resize or pad the input")
    return x


def check_input_scripted(x: Tensor, nd: int, in_chans: int) -> None:
    """The checks of `check_input` that TorchScript can compile (rank, dtype, channels)."""
    if x.dim() != nd + 2:
        raise ValueError("expected a {}-D input (batch, channels, *grid), got {}-D {}; see "
                         "MViT.check_input".format(nd + 2, x.dim(), x.shape))
    if not x.is_floating_point():
        raise TypeError("expected a floating-point input, got {}; convert and normalise it first".format(x.dtype))
    if x.shape[1] != in_chans:
        raise ValueError("expected {} input channels at dim 1, got {}; create the model with in_chans={}".format(
            in_chans, x.shape[1], x.shape[1]))
