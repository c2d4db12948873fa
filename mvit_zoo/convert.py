"""Map MViT checkpoints from every upstream layout to mvit-zoo's (timm's `mvitv2`) layout.

Layouts recognised (see `detect_layout`):
    'mvit-zoo'    ours, which is timm's: `stages.i.blocks.j.*`, `head.fc`
    'torchvision' `conv_proj`, `pos_encoding.*`, `blocks.N.attn.project.0`, `attn.pool_q.pool`, `head.1`
    'pytorchvideo' `patch_embed.patch_model`, `cls_positional_encoding.*`, `attn.{q,k,v}`, `norm_embed`, `head.proj`
    'slowfast'    SlowFast and facebookresearch/mvit: `patch_embed.proj`, flat `blocks.N`, fused `attn.qkv`
                  or separate `attn.{q,k,v}`, block-level `proj`, `head.projection`

Tensors are only renamed, fused (q/k/v -> qkv), reshaped (no data change) and, when the target's
build size differs, interpolated (relative-position tables, absolute position embeddings). A 2D
checkpoint can initialise a 3D model (`inflate`), as in the MViTv2 paper's Kinetics recipe.
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["convert_state_dict", "detect_layout", "unwrap_checkpoint", "CheckpointMismatchError"]


class CheckpointMismatchError(RuntimeError):
    """A checkpoint does not fit the model: names the keys and shapes that disagree."""


_WRAPPERS = ("model_state", "state_dict", "model", "module")


def unwrap_checkpoint(checkpoint: Mapping[str, Any]) -> dict[str, Tensor]:
    """The tensors of a checkpoint: unwraps `{'model_state': ...}` (SlowFast, pytorchvideo), `{'state_dict'}`,
    `{'model'}`, and a DistributedDataParallel `module.` prefix."""
    sd: Any = checkpoint
    for _ in range(3):
        if isinstance(sd, Mapping):
            inner = next((sd[k] for k in _WRAPPERS if isinstance(sd.get(k), Mapping)), None)
            if inner is not None and not any(isinstance(v, Tensor) for v in sd.values()):
                sd = inner
                continue
        break
    if not isinstance(sd, Mapping) or not any(isinstance(v, Tensor) for v in sd.values()):
        raise CheckpointMismatchError(
            "checkpoint holds no tensors (expected a state dict, or one under 'model_state' / 'state_dict')")
    sd = {k: v for k, v in sd.items() if isinstance(v, Tensor)}
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def detect_layout(sd: Mapping[str, Tensor]) -> str:
    """Name the layout of a state dict: 'mvit-zoo', 'torchvision', 'pytorchvideo' or 'slowfast'."""
    keys = set(sd)
    if any(k.startswith("stages.") for k in keys):
        return "mvit-zoo"
    if "conv_proj.weight" in keys or any(k.startswith("pos_encoding.") for k in keys):
        return "torchvision"
    if "patch_embed.patch_model.weight" in keys or any(k.startswith("cls_positional_encoding.") for k in keys):
        return "pytorchvideo"
    if "patch_embed.proj.weight" in keys and any(k.startswith("blocks.") for k in keys):
        return "slowfast"
    sample = ", ".join(sorted(keys)[:5])
    raise CheckpointMismatchError(
        f"unrecognised checkpoint layout (first keys: {sample}); expected an MViT checkpoint from timm, "
        f"torchvision, pytorchvideo, SlowFast or facebookresearch/mvit")


# per layout: (pattern, replacement) applied to block-local key suffixes and to top-level keys
_BLOCK_RULES: dict[str, list[tuple[str, str]]] = {
    "torchvision": [
        (r"^attn\.project\.0\.", "attn.proj."),
        (r"^attn\.pool_([qkv])\.pool\.", r"attn.pool_\1."),
        (r"^attn\.pool_([qkv])\.norm_act\.0\.", r"attn.norm_\1."),
        (r"^mlp\.0\.", "mlp.fc1."),
        (r"^mlp\.3\.", "mlp.fc2."),
        (r"^project\.", "proj."),
    ],
    "pytorchvideo": [],
    "slowfast": [],
}
_TOP_RULES: dict[str, list[tuple[str, str]]] = {
    "torchvision": [
        (r"^conv_proj\.", "patch_embed.proj."),
        (r"^pos_encoding\.class_token$", "cls_token"),
        (r"^pos_encoding\.spatial_pos$", "pos_embed_spatial"),
        (r"^pos_encoding\.temporal_pos$", "pos_embed_temporal"),
        (r"^pos_encoding\.class_pos$", "pos_embed_class"),
        (r"^head\.1\.", "head.fc."),
    ],
    "pytorchvideo": [
        (r"^patch_embed\.patch_model\.", "patch_embed.proj."),
        (r"^cls_positional_encoding\.", ""),
        (r"^norm_embed\.", "norm."),
        (r"^head\.proj\.", "head.fc."),
    ],
    "slowfast": [
        (r"^head\.projection\.", "head.fc."),
    ],
}


def _apply(rules: list[tuple[str, str]], key: str) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def _rename(sd: Mapping[str, Tensor], layout: str, model: nn.Module) -> dict[str, Tensor]:
    """Flat `blocks.N.*` keys -> `stages.i.blocks.j.*`, other names -> ours; q/k/v fused."""
    depths = [len(stage.blocks) for stage in model.stages]
    where = [(i, j) for i, d in enumerate(depths) for j in range(d)]
    expand_attn = model.cfg.expand_attn
    out: dict[str, Tensor] = {}
    qkv_parts: dict[str, dict[str, Tensor]] = {}
    for key, value in sd.items():
        m = re.match(r"^blocks\.(\d+)\.(.*)$", key)
        if m is None:
            out[_apply(_TOP_RULES[layout], key)] = value
            continue
        n, rest = int(m.group(1)), _apply(_BLOCK_RULES[layout], m.group(2))
        if n >= len(where):
            out[key] = value  # reported as unexpected
            continue
        i, j = where[n]
        prefix = f"stages.{i}.blocks.{j}."
        if rest.startswith("proj."):  # block-level channel projection
            rest = ("shortcut_proj_attn." if expand_attn else "shortcut_proj_mlp.") + rest[len("proj."):]
        sep = re.match(r"^attn\.([qkv])\.(weight|bias)$", rest)
        if sep is not None:
            qkv_parts.setdefault(f"{prefix}attn.qkv.{sep.group(2)}", {})[sep.group(1)] = value
            continue
        out[prefix + rest] = value
    for key, parts in qkv_parts.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointMismatchError(f"{key}: separate attention projections incomplete, found {sorted(parts)}")
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def _interp_1d(table: Tensor, length: int) -> Tensor:
    """(L, C) -> (length, C), linear."""
    return F.interpolate(table.t().unsqueeze(0).float(), size=length, mode="linear").squeeze(0).t().to(table.dtype)


def _fit(key: str, value: Tensor, target: Tensor, model: nn.Module, inflate: str) -> Tensor:
    """Reshape / interpolate / inflate one tensor to the target's shape, or raise naming both shapes."""
    if value.shape == target.shape:
        return value
    if value.numel() == target.numel() and key in ("cls_token", "pos_embed_class", "pos_embed_spatial",
                                                   "pos_embed_temporal"):
        return value.reshape(target.shape)
    name = key.rsplit(".", 1)[-1]
    if key == "patch_embed.proj.weight" and value.shape[1] != target.shape[1] and value.ndim == target.ndim:
        from timm.models._manipulate import adapt_input_conv  # other input channels: timm's rule

        flat = value.reshape(value.shape[:3] + (-1,))  # (O, I, k0, rest): adapt_input_conv takes 4-D kernels
        adapted = adapt_input_conv(target.shape[1], flat).reshape((value.shape[0], target.shape[1]) + value.shape[2:])
        return _fit(key, adapted, target, model, inflate)
    if name.startswith("rel_pos_") and value.ndim == 2 and value.shape[1] == target.shape[1]:
        return _interp_1d(value, target.shape[0])
    if key in ("pos_embed_spatial", "pos_embed_temporal", "pos_embed") and value.shape[-1] == target.shape[-1]:
        return _resize_pos(key, value, target, model)
    if name == "weight" and value.ndim + 1 == target.ndim and value.shape[:2] == target.shape[:2]:
        if value.shape[2:] == target.shape[3:]:  # 2D kernel -> 3D kernel (image -> video)
            return _inflate(value, target.shape[2], inflate if key.startswith("patch_embed") else "center")
    if name == "weight" and value.ndim == target.ndim + 1 and value.shape[2] == 1:
        if value.shape[:2] + value.shape[3:] == target.shape:  # 3D kernel with T=1 -> 2D kernel
            return value.squeeze(2)
    raise CheckpointMismatchError(
        f"{key}: checkpoint shape {tuple(value.shape)} does not fit the model's {tuple(target.shape)}; "
        f"the checkpoint is for another architecture or input size (check the model name)")


def _inflate(weight: Tensor, kt: int, mode: str) -> Tensor:
    """(O, I, kh, kw) -> (O, I, kt, kh, kw). 'center': the 2D kernel at the centre frame (a static clip
    gives exactly the 2D response); 'mean': repeated over time and divided by kt (I3D)."""
    if mode == "mean":
        return weight.unsqueeze(2).repeat(1, 1, kt, 1, 1) / kt
    if mode != "center":
        raise ValueError(f"inflate must be 'center' or 'mean', got {mode!r}")
    out = weight.new_zeros(weight.shape[:2] + (kt,) + weight.shape[2:])
    out[:, :, kt // 2] = weight
    return out


def _resize_pos(key: str, value: Tensor, target: Tensor, model: nn.Module) -> Tensor:
    """Absolute position embeddings to the model's build grid (bicubic in space, linear in time)."""
    from .mvit import _resize_grid  # local: conversion helpers share the model's resize rule

    C = value.shape[-1]
    grid = model.patch_grid
    if key == "pos_embed_temporal":
        return F.interpolate(value.reshape(1, -1, C).transpose(1, 2).float(), size=grid[0],
                             mode="linear").transpose(1, 2).to(value.dtype).reshape(target.shape)
    if key == "pos_embed_spatial":
        side = math.isqrt(value.numel() // C)
        if side * side * C != value.numel():
            raise CheckpointMismatchError(f"{key}: cannot infer the grid of a non-square {tuple(value.shape)}")
        return _resize_grid(value.reshape(1, -1, C).float(), (side, side), grid[-2:]).to(value.dtype)
    p = model.num_prefix_tokens
    prefix, tokens = value.reshape(1, -1, C)[:, :p], value.reshape(1, -1, C)[:, p:]
    if len(grid) == 3:
        raise CheckpointMismatchError(f"{key}: resizing a joint video position table is not supported")
    side = math.isqrt(tokens.shape[1])
    if side * side != tokens.shape[1]:
        raise CheckpointMismatchError(f"{key}: cannot infer the grid of a non-square {tuple(value.shape)}")
    tokens = _resize_grid(tokens.float(), (side, side), grid).to(value.dtype)
    return torch.cat((prefix, tokens), dim=1)


def convert_state_dict(
        state_dict: Mapping[str, Any],
        model: nn.Module,
        inflate: str = "center",
        strict: bool = True,
) -> dict[str, Tensor]:
    """Map a checkpoint of any supported layout onto `model` (an `mvit_zoo.MViT`).

    Returns a state dict that `model.load_state_dict(..., strict=True)` accepts. Tensors are fitted
    to the model's build size (relative-position tables and position embeddings interpolated; 2D
    kernels inflated to 3D for image -> video). With `strict`, missing or unexpected keys raise a
    `CheckpointMismatchError` that lists them by name; the classifier may be absent or of another size
    only when the model has no classifier (num_classes=0) or a different class count.
    """
    sd = unwrap_checkpoint(state_dict)
    layout = detect_layout(sd)
    if layout != "mvit-zoo":
        sd = _rename(sd, layout, model)
    target = model.state_dict()
    image_to_video = model.cfg.ndim == 3 and sd.get("patch_embed.proj.weight", torch.empty(0)).ndim == 4

    # SlowFast / pytorchvideo image models keep a 1-frame temporal table: fold it into space
    if model.cfg.ndim == 2 and "pos_embed_temporal" in sd and "pos_embed_temporal" not in target:
        temporal = sd.pop("pos_embed_temporal")
        if temporal.reshape(-1, temporal.shape[-1]).shape[0] != 1:
            raise CheckpointMismatchError(
                f"pos_embed_temporal: {tuple(temporal.shape)} has more than one frame; this is a video checkpoint, "
                f"load it into a video model")
        sd["pos_embed_spatial"] = sd["pos_embed_spatial"] + temporal.reshape(1, 1, -1)

    out: dict[str, Tensor] = {}
    unexpected = []
    for key, value in sd.items():
        if key.startswith("head.fc.") and (key not in target or value.shape != target[key].shape):
            continue  # a classifier for another label set, or none: left to the caller (timm drops it)
        if key not in target:
            unexpected.append(key)
            continue
        out[key] = _fit(key, value, target[key], model, inflate)

    missing = [k for k in target if k not in out and not k.startswith("head.fc.")]
    if image_to_video:  # a 2D checkpoint has no temporal tables: start them at zero (time-blind)
        for key in [k for k in missing if k.endswith("rel_pos_t") or k == "pos_embed_temporal"]:
            out[key] = torch.zeros_like(target[key])
            missing.remove(key)
    if strict and (missing or unexpected):
        msg = [f"checkpoint ({layout} layout) does not match {type(model).__name__}"]
        if missing:
            msg.append(f"missing keys ({len(missing)}): {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}")
        if unexpected:
            msg.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}"
                       f"{' ...' if len(unexpected) > 20 else ''}")
        raise CheckpointMismatchError("; ".join(msg))
    return out
