"""Map MViT checkpoints from every upstream layout onto mvit-zoo models.

Layouts recognised by `detect_layout`:

    'mvit-zoo'     ours: timm's names plus the video tensors (`attn.rel_pos_t`, 5-D kernels,
                   `pos_embed_spatial` / `pos_embed_temporal` / `pos_embed_class`)
    'timm'         timm's `mvitv2_*` (`stages.i.blocks.j.*`, `head.fc`): loads without any renaming
    'torchvision'  `conv_proj`, `pos_encoding.*`, `attn.project.0`, `attn.pool_q.pool`,
                   `attn.pool_q.norm_act.0`, `mlp.0` / `mlp.3`, block-level `project`, `head.1`
    'pytorchvideo' `patch_embed.patch_model`, `cls_positional_encoding.*`, separate `attn.{q,k,v}`,
                   `norm_embed`, `head.proj`, wrapped in `{'model_state': ...}`
    'slowfast'     PySlowFast video and image models: `patch_embed.proj`, flat `blocks.N`, fused `attn.qkv`
                   (or separate `attn.{q,k,v}`), block-level `proj`, `head.projection`, `{'model_state': ...}`;
                   MaskFeat pre-training files (`MaskMViT`) leave out their pretext tensors and have no final norm
    'mvit'         facebookresearch/mvit (ImageNet MViTv2): as 'slowfast', 2-D, with relative positions
    'mmaction2'    open-mmlab/mmaction2 `MViT` + `MViTHead`: `backbone.patch_embed.projection`, flat
                   `backbone.blocks.N` (fused `attn.qkv`), last-stage `backbone.norm3`, `cls_head.fc_cls`,
                   wrapped in `{'state_dict': ...}`
    'detectron2'   detectron2's MViT backbone (`backbone.bottom_up.patch_embed.proj`, flat `blocks.N`, per-stage
                   `scale{2..5}_norm`), read out of a detector checkpoint (`{'model': ...}`; its `.pkl` model zoo
                   files with `weights.detectron2.read_detectron2_pkl`). The FPN and heads map onto torchvision's
                   detectors with `weights.detectron2.convert_detectron2_detector`; here they are left out

Conversion runs in two steps:

1. `to_native` renames a checkpoint into our names at the checkpoint's own shapes (q/k/v fused,
   flat blocks placed in stages, torchvision's flat position tensors given their batch axis, a
   one-frame temporal table folded into space for image models). This is what `mvit-zoo convert`
   and the URL fallback of `mvit_zoo.hub` store as safetensors.
2. `fit_state_dict` fits those tensors to a particular model: relative-position tables and
   absolute position embeddings are interpolated when the model's input size or frame count
   differs, 2-D kernels are inflated to 3-D for a video model (image -> video, the MViTv2 recipe),
   a stem for another channel count is adapted as timm does, and every key that is missing,
   unexpected or of the wrong shape is reported by name.

`convert_state_dict` runs both, and warns (`ArchitectureMismatchWarning`) when the source layout
implies architecture fields the target model was built without (`layout_architecture`): pytorchvideo's
pooling norms use eps 1e-5, PySlowFast's and torchvision's residual pooling skips the class token.
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LAYOUTS", "ArchitectureMismatchWarning", "CheckpointMismatchError", "ConversionReport", "ConvertedStateDict",
    "architecture_mismatches", "architecture_overrides", "checkpoint_img_size",
    "convert_state_dict", "detect_layout", "describe_checkpoint", "fit_state_dict", "inflate_image_to_video",
    "layout_architecture", "left_out_keys", "matching_architectures", "to_native", "unwrap_checkpoint",
]

LAYOUTS = ("mvit-zoo", "timm", "torchvision", "pytorchvideo", "slowfast", "mvit", "mmaction2", "detectron2")
HeadPolicy = Literal["auto", "strict", "drop"]
InflateMode = Literal["mean", "center"]


class CheckpointMismatchError(RuntimeError):
    """A checkpoint does not fit the model; the message names the keys and shapes that disagree
    and, where it can tell, the architectures the checkpoint does fit."""


class ArchitectureMismatchWarning(UserWarning):
    """The checkpoint loads, but its source layout implies an architecture field (e.g. the pooling-norm
    eps) that differs from the model's: the model will not compute what the source model computed."""


@dataclass
class ConversionReport:
    """What `convert_state_dict` did, key by key."""

    layout: str
    resized: list[str] = field(default_factory=list)  # interpolated position tables / embeddings
    inflated: list[str] = field(default_factory=list)  # 2-D kernels made 3-D
    adapted: list[str] = field(default_factory=list)  # stem adapted to another input-channel count
    initialized: list[str] = field(default_factory=list)  # tensors a 2-D checkpoint lacks, zero-initialised
    dropped: list[str] = field(default_factory=list)  # classifier tensors left out (other class count / no head)
    fresh: list[str] = field(default_factory=list)  # model keys left as initialised (a classifier the checkpoint lacks)
    missing: list[str] = field(default_factory=list)  # model keys the checkpoint does not provide
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys the model does not have
    architecture: list[str] = field(default_factory=list)  # architecture fields the source implies otherwise

    def summary(self) -> str:
        parts = [f"layout {self.layout}"]
        for name in ("resized", "inflated", "adapted", "initialized", "dropped", "fresh", "missing", "unexpected"):
            keys = getattr(self, name)
            if keys:
                parts.append(f"{name} ({len(keys)}): {_names(keys)}")
        if self.architecture:
            parts.append(f"architecture differs from the source: {'; '.join(self.architecture)}")
        return "; ".join(parts)


class ConvertedStateDict(dict):
    """A state dict (`dict[str, Tensor]`) with the `ConversionReport` of how it was made."""

    report: ConversionReport


def _names(keys: list[str], limit: int = 12) -> str:
    return ", ".join(keys[:limit]) + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


# --------------------------------------------------------------------------------------------------
# Unwrapping and layout detection
# --------------------------------------------------------------------------------------------------

_WRAPPERS = ("model_state", "state_dict", "model", "module", "model_ema")
# The prefix of the MViT's own tensors in a layout whose checkpoints hold a whole detector / recogniser
_PREFIXES = {"mmaction2": "backbone.", "detectron2": "backbone.bottom_up."}
# PySlowFast's MaskFeat pre-training model (`MaskMViT`, slowfast/models/masked.py): the mask token, the HOG
# prediction head and the MAE decoder are the pretext task's, not the backbone's (it also has no final norm)
_PRETEXT = re.compile(r"^(mask_token$|pred_head\.|hogs\.|decoder_|dec_pos_embed)")


def unwrap_checkpoint(checkpoint: Mapping[str, Any]) -> dict[str, Tensor]:
    """The tensors of a checkpoint.

    Unwraps `{'model_state': ...}` (SlowFast, pytorchvideo, facebookresearch/mvit), `{'state_dict': ...}`
    and `{'model': ...}`; drops a DistributedDataParallel `module.` prefix and fairscale's
    `_checkpoint_wrapped_module.` infix (activation-checkpointed SlowFast models).
    """
    sd: Any = checkpoint
    for _ in range(3):
        if isinstance(sd, Mapping) and not any(isinstance(v, Tensor) for v in sd.values()):
            inner = next((sd[k] for k in _WRAPPERS if isinstance(sd.get(k), Mapping)), None)
            if inner is not None:
                sd = inner
                continue
        break
    if not isinstance(sd, Mapping) or not any(isinstance(v, Tensor) for v in sd.values()):
        found = ", ".join(map(str, list(sd)[:8])) if isinstance(sd, Mapping) else type(sd).__name__
        raise CheckpointMismatchError(
            f"the checkpoint holds no tensors (found: {found}); expected a state dict, or one under "
            f"'model_state' / 'state_dict' / 'model'")
    out = {}
    for key, value in sd.items():
        if not isinstance(value, Tensor):
            continue
        key = key.replace("._checkpoint_wrapped_module", "").replace("_checkpoint_wrapped_module.", "")
        out[key] = value
    if all(k.startswith("module.") for k in out):
        out = {k[len("module."):]: v for k, v in out.items()}
    return out


def detect_layout(sd: Mapping[str, Tensor]) -> str:
    """Name the layout of an (unwrapped) state dict: one of `LAYOUTS`."""
    keys = set(sd)
    if "backbone.patch_embed.projection.weight" in keys:
        return "mmaction2"
    if any(k.startswith(_PREFIXES["detectron2"]) for k in keys):
        return "detectron2"
    if any(k.startswith("stages.") for k in keys):
        video = (
            any(k.endswith("rel_pos_t") or k.startswith("pos_embed_") for k in keys)
            or getattr(sd.get("patch_embed.proj.weight"), "ndim", 4) == 5
        )
        return "mvit-zoo" if video else "timm"
    if "conv_proj.weight" in keys or any(k.startswith("pos_encoding.") for k in keys):
        return "torchvision"
    if "patch_embed.patch_model.weight" in keys or any(k.startswith("cls_positional_encoding.") for k in keys):
        return "pytorchvideo"
    if "patch_embed.proj.weight" in keys and any(k.startswith("blocks.") for k in keys):
        image = sd["patch_embed.proj.weight"].ndim == 4
        rel_pos = any(k.endswith("rel_pos_h") for k in keys)
        return "mvit" if image and rel_pos else "slowfast"
    sample = ", ".join(sorted(keys)[:6])
    raise CheckpointMismatchError(
        f"unrecognised checkpoint layout (first keys: {sample}); expected an MViT checkpoint from mvit-zoo, "
        f"timm, torchvision, pytorchvideo, PySlowFast, facebookresearch/mvit, mmaction2 or detectron2")


# --------------------------------------------------------------------------------------------------
# Step 1: names (to_native)
# --------------------------------------------------------------------------------------------------

# (pattern, replacement) rules per layout, applied to block-local key suffixes and to top-level keys
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
    "mvit": [],
    "mmaction2": [],
    "detectron2": [],
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
    "slowfast": [(r"^head\.projection\.", "head.fc.")],
    "mvit": [(r"^head\.projection\.", "head.fc.")],
    # NOTE: mmaction2 numbers its stage norms from 0 and keeps only `out_scales` (default: the last, norm3)
    "mmaction2": [(r"^patch_embed\.projection\.", "patch_embed.proj."), (r"^norm3\.", "norm."),
                  (r"^cls_head\.fc_cls\.", "head.fc.")],
    "detectron2": [],  # its stage norms are placed by `_strip_prefix`, which knows the target
}
_POS_KEYS = ("cls_token", "pos_embed", "pos_embed_spatial", "pos_embed_temporal", "pos_embed_class")


def _apply(rules: list[tuple[str, str]], key: str) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def _target_cfg(target: Any) -> Any:
    """The MViTCfg of a model (or the cfg itself)."""
    cfg = getattr(target, "cfg", target)
    if not hasattr(cfg, "depths") or not hasattr(cfg, "expand_attn"):
        raise TypeError(f"expected an mvit_zoo MViT model or MViTCfg, got {type(target).__name__}")
    return cfg


def _rename_flat(sd: Mapping[str, Tensor], layout: str, cfg: Any) -> dict[str, Tensor]:
    """Flat `blocks.N.*` -> `stages.i.blocks.j.*`, other names -> ours; separate q/k/v fused."""
    where = [(i, j) for i, d in enumerate(cfg.depths) for j in range(d)]
    out: dict[str, Tensor] = {}
    qkv_parts: dict[str, dict[str, Tensor]] = {}
    for key, value in sd.items():
        m = re.match(r"^blocks\.(\d+)\.(.*)$", key)
        if m is None:
            out[_apply(_TOP_RULES[layout], key)] = value
            continue
        n, rest = int(m.group(1)), _apply(_BLOCK_RULES[layout], m.group(2))
        if n >= len(where):  # more blocks than the model: kept under its own name, reported as unexpected
            out[f"blocks.{n}.{rest}"] = value
            continue
        i, j = where[n]
        prefix = f"stages.{i}.blocks.{j}."
        if rest.startswith("proj."):  # the block-level channel projection of the shortcut
            rest = ("shortcut_proj_attn." if cfg.expand_attn else "shortcut_proj_mlp.") + rest[len("proj."):]
        sep = re.match(r"^attn\.([qkv])\.(weight|bias)$", rest)
        if sep is not None:
            qkv_parts.setdefault(f"{prefix}attn.qkv.{sep.group(2)}", {})[sep.group(1)] = value
            continue
        out[prefix + rest] = value
    for key, parts in qkv_parts.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointMismatchError(
                f"{key}: the checkpoint has separate attention projections but only {sorted(parts)} of q, k, v")
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)  # rows q | k | v, as fused qkv
    return out


def _native_shapes(sd: dict[str, Tensor], cfg: Any) -> dict[str, Tensor]:
    """Give position tensors their (1, N, C) shape and adapt trivially to the target's rank: for an
    image model, squeeze one-frame 3-D kernels and fold a one-frame temporal table into space; for a
    model with separate position tables, split a joint `pos_embed` into class and space parts."""
    for key in _POS_KEYS:
        if key in sd and sd[key].ndim != 3:
            sd[key] = sd[key].reshape(1, -1, sd[key].shape[-1])
    if cfg.ndim == 2:
        for key, value in list(sd.items()):
            if value.ndim == 5 and key.endswith("weight") and value.shape[2] == 1:
                sd[key] = value.squeeze(2)  # pytorchvideo's image model runs 3-D convs over T = 1
        temporal = sd.get("pos_embed_temporal")
        if temporal is not None and "pos_embed_spatial" in sd:
            if temporal.shape[1] != 1:
                raise CheckpointMismatchError(
                    f"pos_embed_temporal: {tuple(temporal.shape)} covers {temporal.shape[1]} frames; this is a video "
                    f"checkpoint, load it into a video architecture")
            sd["pos_embed_spatial"] = sd["pos_embed_spatial"] + sd.pop("pos_embed_temporal")
    if cfg.abs_pos == "separable" and "pos_embed" in sd and "pos_embed_spatial" not in sd:
        joint = sd.pop("pos_embed")
        prefix = 1 if "cls_token" in sd else 0
        if prefix:
            sd["pos_embed_class"] = joint[:, :1]
        sd["pos_embed_spatial"] = joint[:, prefix:]
    return sd


def _strip_prefix(sd: Mapping[str, Tensor], layout: str, cfg: Any = None) -> dict[str, Tensor]:
    """The backbone's tensors without their prefix; mmaction2's classifier (`cls_head.*`) kept as it is.
    detectron2 names its stage norms by log2 of their stride: `scale{k}_norm` is stage k - 2's norm of a
    target with `stage_norms` (`mvit_*_det`); for any other target `scale5_norm` is the final `norm` and the
    norms of stages 0-2 are left out, as are the FPN and heads (`left_out_keys` names them)."""
    prefix = _PREFIXES[layout]
    out = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    out.update({k: v for k, v in sd.items() if k.startswith("cls_head.")} if layout == "mmaction2" else {})
    if layout == "detectron2" and cfg is not None:
        if getattr(cfg, "stage_norms", False):
            out = {re.sub(r"^scale(\d)_norm\.", lambda m: f"stages.{int(m.group(1)) - 2}.norm.", k): v
                   for k, v in out.items()}
        else:
            out = {re.sub(r"^scale5_norm\.", "norm.", k): v for k, v in out.items()
                   if not re.match(r"^scale[234]_norm\.", k)}
    return out


def left_out_keys(checkpoint: Mapping[str, Any], target: Any) -> list[str]:
    """Keys of a checkpoint that `to_native` does not carry into `target` (a model or MViTCfg): detectron2's
    FPN, RPN and RoI heads, and its stage 0-2 norms unless the target has `stage_norms`; a MaskFeat
    pre-training checkpoint's pretext-task tensors (empty for the other layouts, whose every key is placed)."""
    sd = unwrap_checkpoint(checkpoint)
    layout = detect_layout(sd)
    if layout == "slowfast" and "mask_token" in sd:
        return sorted(k for k in sd if _PRETEXT.match(k))
    if layout != "detectron2":
        return []
    prefix = _PREFIXES["detectron2"]
    stage_norms = getattr(_target_cfg(target), "stage_norms", False)
    return sorted(k for k in sd if not k.startswith(prefix)
                  or not stage_norms and re.match(r"^scale[234]_norm\.", k[len(prefix):]))


def to_native(checkpoint: Mapping[str, Any], target: Any) -> tuple[dict[str, Tensor], str]:
    """Rename a checkpoint of any supported layout into mvit-zoo names, keeping its shapes.

    `target` is the model (or its MViTCfg) whose block structure (depths, where channels grow)
    places flat `blocks.N` keys into stages. Returns the state dict and the detected layout.
    """
    cfg = _target_cfg(target)
    sd = unwrap_checkpoint(checkpoint)
    layout = detect_layout(sd)
    if layout in _PREFIXES:
        sd = _strip_prefix(sd, layout, cfg)
    if layout == "slowfast" and "mask_token" in sd:
        sd = {k: v for k, v in sd.items() if not _PRETEXT.match(k)}
    if layout not in ("mvit-zoo", "timm"):
        sd = _rename_flat(sd, layout, cfg)
    return _native_shapes(dict(sd), cfg), layout


# --------------------------------------------------------------------------------------------------
# What a layout implies about the architecture
# --------------------------------------------------------------------------------------------------

# Q/K/V pooling-norm eps of each upstream implementation. NOTE: PySlowFast changed its eps from 1e-5 to
# 1e-6 in mid-2022, so its layout alone does not tell; its tags state the eps of their files.
_POOL_NORM_EPS = {"pytorchvideo": 1e-5, "torchvision": 1e-6, "timm": 1e-6, "mvit": 1e-6, "mmaction2": 1e-6,
                  "detectron2": 1e-6}
# Whether residual pooling adds the pooled query to the class token too
_RESIDUAL_POOL_CLS = {"slowfast": False, "torchvision": False, "timm": True, "mvit": True, "mmaction2": False}


def layout_architecture(sd: Mapping[str, Tensor], layout: str) -> dict[str, Any]:
    """Architecture fields (`MViTCfg` names) that a state dict in mvit-zoo names (see `to_native`) from
    a `layout` checkpoint implies: `use_cls_token` from its tensors, `pool_norm_eps` and
    `residual_pool_cls` (with a class token) from the upstream implementation that wrote it.

    NOTE: the channel order is not a property of a layout (PySlowFast's SSv2 files were normalised in
    BGR order, its Kinetics files in RGB): the tag carries it (`channel_order`, reversed mean/std) and
    `mvit-zoo convert` writes it to config.json."""
    out: dict[str, Any] = {"use_cls_token": "cls_token" in sd}
    if layout in _POOL_NORM_EPS:
        out["pool_norm_eps"] = _POOL_NORM_EPS[layout]
    if "cls_token" in sd and layout in _RESIDUAL_POOL_CLS:
        out["residual_pool_cls"] = _RESIDUAL_POOL_CLS[layout]
    if layout == "mmaction2":  # `dim_mul_in_attention` is a config switch there (False for its MaskFeat fine-tune)
        for key, weight in sd.items():
            m = re.match(r"^(stages\.\d+\.blocks\.\d+\.)shortcut_proj_(attn|mlp)\.weight$", key)
            qkv = sd.get(f"{m.group(1)}attn.qkv.weight") if m else None
            if qkv is not None:  # channels grow in the attention iff its width is the block's output width
                out["expand_attn"] = qkv.shape[0] // 3 == weight.shape[0]
                break
    return out


def _effective(cfg: Any, name: str) -> Any:
    if name == "pool_norm_eps":
        return cfg.norm_eps if cfg.pool_norm_eps is None else cfg.pool_norm_eps
    return getattr(cfg, name)


def _tags_setting(arch: str, fields: Mapping[str, Any]) -> list[str]:
    """Registered tags of `arch` whose weights need exactly these field values."""
    import timm

    from ..model.mvit import MODEL_CFGS, make_cfg

    if arch not in MODEL_CFGS:
        return []
    out = []
    for name in timm.list_pretrained(f"{arch}.*"):
        cfg = make_cfg(MODEL_CFGS[arch], **(getattr(timm.models.get_pretrained_cfg(name), "arch", None) or {}))
        if all(_effective(cfg, k) == v for k, v in fields.items()):
            out.append(name)
    return out


def _relevant(implied: Mapping[str, Any], cfg: Any) -> dict[str, Any]:
    # residual pooling of the class token only matters where there are both
    return {k: v for k, v in implied.items()
            if k != "residual_pool_cls" or (cfg.residual_pooling and cfg.use_cls_token)}


def architecture_overrides(implied: Mapping[str, Any], target: Any) -> dict[str, Any]:
    """The fields of `implied` (see `layout_architecture`) whose value `target` (a model or MViTCfg)
    lacks: the `create_model` overrides that make it compute what the source model computed."""
    cfg = _target_cfg(target)
    return {k: v for k, v in _relevant(implied, cfg).items() if _effective(cfg, k) != v}


def architecture_mismatches(implied: Mapping[str, Any], model: nn.Module, layout: str) -> list[str]:
    """One message per field of `implied` (see `layout_architecture`) that `model` was built without,
    naming both values and the fix (the plain architecture, a tag that sets it, or the `create_model` override)."""
    from ..model.mvit import MODEL_CFGS

    cfg = _target_cfg(model)
    relevant = _relevant(implied, cfg)
    wrong = architecture_overrides(implied, cfg)
    if not wrong:
        return []
    arch = _model_name(model)
    overrides = ", ".join(f"{k}={v!r}" for k, v in wrong.items())
    default = MODEL_CFGS.get(arch)
    if default is not None and not architecture_overrides(relevant, default):
        fix = f"create {arch!r} without overriding {', '.join(wrong)} (its default is what the checkpoint needs)"
    else:
        tags = _tags_setting(arch, relevant)
        fix = (f"create the model as {' or '.join(repr(t) for t in tags)} (its weights need these values) or with "
               if tags else "create the model with ") + f"mvit_zoo.create_model({arch!r}, {overrides})"
    return [f"{k}: the {layout} checkpoint implies {v!r}, the model has {_effective(cfg, k)!r}; {fix}"
            for k, v in wrong.items()]


def checkpoint_img_size(sd: Mapping[str, Tensor], target: Any) -> Optional[tuple[int, ...]]:
    """The input size (H, W) or (T, H, W) whose token grid the position tables of a state dict in
    mvit-zoo names were made for, under `target`'s (model or MViTCfg) patch stride; None without tables.
    Stage 0's first block sees the full patch grid, and its relative-position tables span
    `2 * grid - 1` offsets per axis."""
    cfg = _target_cfg(target)
    stride = tuple(cfg.patch_stride)
    grid: list[Optional[int]] = [None] * cfg.ndim
    for axis, name in zip(range(cfg.ndim - 2, cfg.ndim), ("h", "w")):
        table = sd.get(f"stages.0.blocks.0.attn.rel_pos_{name}")
        if table is not None:
            grid[axis] = (table.shape[0] + 1) // 2
    table_t = sd.get("stages.0.blocks.0.attn.rel_pos_t")
    if cfg.ndim == 3 and table_t is not None:
        grid[0] = (table_t.shape[0] + 1) // 2
    spatial = sd.get("pos_embed_spatial")
    if spatial is None and "pos_embed" in sd:
        spatial = sd["pos_embed"][:, 1 if "cls_token" in sd else 0:]
    if spatial is not None and math.isqrt(spatial.shape[1]) ** 2 == spatial.shape[1]:
        grid[-2] = grid[-1] = math.isqrt(spatial.shape[1])
    temporal = sd.get("pos_embed_temporal")
    if cfg.ndim == 3 and temporal is not None:
        grid[0] = temporal.shape[1]
    if cfg.ndim == 3 and grid[0] is None and all(g is not None for g in grid[1:]):
        grid[0] = cfg.img_size[0] // stride[0]  # no temporal table: any frame count fits; keep the default
    if any(g is None for g in grid):
        return None
    return tuple(int(g) * s for g, s in zip(grid, stride))


# --------------------------------------------------------------------------------------------------
# Step 2: shapes (fit_state_dict)
# --------------------------------------------------------------------------------------------------

def _interp_1d(table: Tensor, length: int) -> Tensor:
    """(L, C) -> (length, C), linear (the rule of SlowFast's and timm's rel-pos resizing)."""
    return F.interpolate(table.t().unsqueeze(0).float(), size=length, mode="linear").squeeze(0).t().to(table.dtype)


def _inflate(weight: Tensor, kt: int, mode: str) -> Tensor:
    """(O, I, kh, kw) -> (O, I, kt, kh, kw). 'mean': repeated over time and divided by kt (I3D, as
    PySlowFast's `inflate_weight`); 'center': the 2-D kernel at the centre frame, zeros elsewhere."""
    if mode == "mean":
        return weight.unsqueeze(2).repeat(1, 1, kt, 1, 1) / kt
    if mode != "center":
        raise ValueError(f"inflate must be 'mean' or 'center', got {mode!r}")
    out = weight.new_zeros(weight.shape[:2] + (kt,) + weight.shape[2:])
    out[:, :, kt // 2] = weight
    return out


def _resize_pos(key: str, value: Tensor, target: Tensor, model: nn.Module) -> Tensor:
    """Absolute position embeddings to the model's build grid (bicubic in space, linear in time)."""
    from ..model.mvit import _resize_grid  # the model's own resize rule, so load-time and run-time agree

    C = value.shape[-1]
    grid = tuple(model.patch_grid)
    if key == "pos_embed_temporal":
        return F.interpolate(value.reshape(1, -1, C).transpose(1, 2).float(), size=grid[0],
                             mode="linear").transpose(1, 2).to(value.dtype).reshape(target.shape)
    if key == "pos_embed_spatial":
        side = math.isqrt(value.shape[1])
        if side * side != value.shape[1]:
            raise CheckpointMismatchError(f"{key}: cannot infer the grid of non-square {tuple(value.shape)}")
        return _resize_grid(value.float(), [side, side], list(grid[-2:])).to(value.dtype)
    p = getattr(model, "num_prefix_tokens", 0)
    prefix, tokens = value[:, :p], value[:, p:]
    side = math.isqrt(tokens.shape[1])
    if len(grid) != 2 or side * side != tokens.shape[1]:
        raise CheckpointMismatchError(f"{key}: cannot resize {tuple(value.shape)} to {tuple(target.shape)}")
    return torch.cat((prefix, _resize_grid(tokens.float(), [side, side], list(grid)).to(value.dtype)), dim=1)


def _fit_one(key: str, value: Tensor, target: Tensor, model: nn.Module, inflate: str,
             report: ConversionReport) -> Optional[Tensor]:
    """`value` fitted to `target`'s shape, or None if it cannot be (the caller reports it)."""
    if value.shape == target.shape:
        return value
    name = key.rsplit(".", 1)[-1]
    if key == "patch_embed.proj.weight" and value.ndim == target.ndim and value.shape[1] != target.shape[1]:
        from timm.models._manipulate import adapt_input_conv  # timm's rule for other input channel counts

        flat = value.reshape(value.shape[:3] + (-1,))  # adapt_input_conv takes 4-D kernels
        value = adapt_input_conv(target.shape[1], flat).reshape(
            (value.shape[0], target.shape[1]) + value.shape[2:]).to(value.dtype)
        report.adapted.append(key)
        return _fit_one(key, value, target, model, inflate, report)
    if name.startswith("rel_pos_") and value.ndim == 2 and value.shape[1] == target.shape[1]:
        report.resized.append(key)
        return _interp_1d(value, target.shape[0])
    if key in ("pos_embed_spatial", "pos_embed_temporal", "pos_embed") and value.shape[-1] == target.shape[-1]:
        report.resized.append(key)
        return _resize_pos(key, value, target, model)
    if name == "weight" and value.ndim == 4 and target.ndim == 5 and value.shape[:2] == target.shape[:2] \
            and value.shape[2:] == target.shape[3:]:
        report.inflated.append(key)
        return _inflate(value, target.shape[2], inflate)
    return None


def fit_state_dict(
        sd: Mapping[str, Tensor],
        model: nn.Module,
        *,
        layout: str = "mvit-zoo",
        inflate: InflateMode = "mean",
        head: HeadPolicy = "auto",
        strict: bool = True,
) -> ConvertedStateDict:
    """Fit a state dict in mvit-zoo names (see `to_native`) to `model`.

    head: 'auto' leaves out a classifier the model lacks (num_classes=0) or that has another class
    count (the model keeps its freshly initialised head); 'strict' treats a classifier of another
    size as a shape mismatch; 'drop' always leaves the classifier out.
    With `strict`, any missing, unexpected or unfittable key raises `CheckpointMismatchError`.
    """
    target = model.state_dict()
    report = ConversionReport(layout=layout)
    out = ConvertedStateDict()
    out.report = report
    image_to_video = getattr(model.cfg, "ndim", 2) == 3 and getattr(sd.get("patch_embed.proj.weight"), "ndim", 5) == 4
    mismatched: list[str] = []
    for key, value in sd.items():
        if key.startswith("head.fc.") and (
                head == "drop" or key not in target or (head == "auto" and value.shape != target[key].shape)):
            report.dropped.append(key)
            continue
        if key not in target:
            report.unexpected.append(key)
            continue
        fitted = _fit_one(key, value, target[key], model, inflate, report)
        if fitted is None:
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(target[key].shape)}")
            continue
        out[key] = fitted.to(target[key].dtype) if fitted.is_floating_point() else fitted

    # NOTE: a classifier is loaded whole or not at all: half of one (a weight without its bias) is missing
    head_loaded = any(k.startswith("head.fc.") for k in out)
    # a backbone-only checkpoint (no classifier, no final norm: MaskFeat's pre-training) leaves both fresh
    backbone_only = not any(k.startswith(("head.fc.", "norm.")) for k in sd) and head != "strict"
    for key in target:
        if key in out or any(m.startswith(key + ":") for m in mismatched):
            continue
        if key.startswith("head.fc.") and not head_loaded and (report.dropped or head != "strict"):
            report.fresh.append(key)
            continue
        if backbone_only and key.startswith("norm."):
            report.fresh.append(key)
            continue
        if image_to_video and (key.endswith("rel_pos_t") or key == "pos_embed_temporal"):
            out[key] = torch.zeros_like(target[key])  # a 2-D checkpoint knows no time: start time-blind
            report.initialized.append(key)
            continue
        if image_to_video and key in ("cls_token", "pos_embed_class"):
            report.fresh.append(key)  # an image model without class token: the video model's own start
            continue
        report.missing.append(key)

    if mismatched or (strict and (report.missing or report.unexpected)):
        msg = [f"checkpoint ({layout} layout) does not fit {_model_name(model)}"]
        if mismatched:
            msg.append(f"shape mismatch ({len(mismatched)}): {'; '.join(mismatched[:8])}"
                       f"{' ...' if len(mismatched) > 8 else ''}")
            classes = sd.get("head.fc.weight")
            if any(m.startswith("head.fc.weight:") for m in mismatched):
                msg.append(f"the checkpoint's classifier has {classes.shape[0]} classes, the model's "
                           f"{target['head.fc.weight'].shape[0]}: create the model with num_classes="
                           f"{classes.shape[0]}, or pass head='auto' to start a new classifier")
            patch = sd.get("patch_embed.proj.weight")
            if patch is not None and patch.ndim == 5 and target["patch_embed.proj.weight"].ndim == 4:
                msg.append("this is a video checkpoint and the model is an image model")
        if report.missing:
            msg.append(f"missing keys ({len(report.missing)}): {_names(report.missing, 20)}")
        if report.unexpected:
            msg.append(f"unexpected keys ({len(report.unexpected)}): {_names(report.unexpected, 20)}")
        raise CheckpointMismatchError("; ".join(msg) + _candidates_hint(sd, model))
    return out


def convert_state_dict(
        state_dict: Mapping[str, Any],
        model: nn.Module,
        *,
        inflate: InflateMode = "mean",
        head: HeadPolicy = "auto",
        strict: bool = True,
) -> ConvertedStateDict:
    """Map a checkpoint of any supported layout (see `LAYOUTS`) onto `model`, an mvit_zoo `MViT`.

    Returns a state dict that `model.load_state_dict(sd, strict=not sd.report.fresh)` accepts, with
    a `.report` (`ConversionReport`) of what was renamed, resized, inflated, dropped. Where the source
    layout implies architecture fields the model lacks (`layout_architecture`: a pytorchvideo file
    needs `pool_norm_eps=1e-5`), an `ArchitectureMismatchWarning` names the field, both values and the
    fix, and `.report.architecture` lists them. Relative-position
    tables and absolute position embeddings are interpolated to the model's build size; a 2-D
    (ImageNet) checkpoint initialises a 3-D model by inflating its kernels over time (`inflate`: 'mean'
    as PySlowFast/I3D, or 'center') and starting the temporal position tables at zero. See
    `fit_state_dict` for `head` and `strict`. `.report.dropped` also names what the target has no place
    for by design (`left_out_keys`: detectron2's FPN and heads, MaskFeat's pretext tensors).
    """
    sd, layout = to_native(state_dict, model)
    image_to_video = getattr(sd.get("patch_embed.proj.weight"), "ndim", 0) == 4 and _target_cfg(model).ndim == 3
    if layout == "detectron2" and image_to_video:
        fits = matching_architectures(state_dict)
        raise CheckpointMismatchError(
            f"this is a detectron2 detector checkpoint (a 2-D MViT backbone with FPN and COCO heads) and "
            f"{_model_name(model)} is a video model; load it into an image model"
            f"{' (' + ' or '.join(fits) + ')' if fits else ''}, or into a torchvision detector with "
            f"mvit_zoo.weights.detectron2.convert_detectron2_detector. To start a video model from image weights "
            f"on purpose, use inflate_image_to_video")
    # image -> video: the video model's own architecture is what trains next
    mismatches = [] if image_to_video else architecture_mismatches(layout_architecture(sd, layout), model, layout)
    try:
        out = fit_state_dict(sd, model, layout=layout, inflate=inflate, head=head, strict=strict)
    except CheckpointMismatchError as e:
        if not mismatches:
            raise
        raise CheckpointMismatchError(f"{e}; also {'; '.join(mismatches)}") from None
    out.report.architecture = mismatches
    out.report.dropped += left_out_keys(state_dict, model)
    for message in mismatches:
        warnings.warn(ArchitectureMismatchWarning(message), stacklevel=2)
    return out


def inflate_image_to_video(state_dict: Mapping[str, Any], model: nn.Module, *, inflate: InflateMode = "mean",
                           head: HeadPolicy = "auto") -> ConvertedStateDict:
    """Initialise a video model from an image (2-D) checkpoint, as the MViTv2 paper does for Kinetics
    from ImageNet: patch-embedding and pooling kernels inflated over time, relative-position tables
    interpolated to the video grid, temporal tables (`rel_pos_t`, `pos_embed_temporal`) zero."""
    if getattr(model.cfg, "ndim", 2) != 3:
        raise ValueError(f"inflate_image_to_video needs a video model; {_model_name(model)} is an image model")
    sd, layout = to_native(state_dict, model)
    if sd.get("patch_embed.proj.weight", torch.empty(0, 0, 0, 0, 0)).ndim != 4:
        raise CheckpointMismatchError("inflate_image_to_video needs an image (2-D) checkpoint; this one is 3-D")
    return fit_state_dict(sd, model, layout=layout, inflate=inflate, head=head)


# --------------------------------------------------------------------------------------------------
# What a checkpoint is (for error messages)
# --------------------------------------------------------------------------------------------------

def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("architecture") if isinstance(cfg, Mapping) else getattr(cfg, "architecture", None)
    return name or type(model).__name__


@dataclass(frozen=True)
class _Signature:
    ndim: int
    depths: tuple[int, ...]
    embed_dim: int
    num_heads: Optional[int]
    cls_token: bool
    rel_pos: bool
    abs_pos: bool
    stage_norms: bool  # a norm per stage output (detection backbones) instead of a final norm


def _signature(sd: Mapping[str, Tensor]) -> Optional[_Signature]:
    """Architecture facts readable from an mvit-zoo-named state dict (None if it is not one)."""
    patch = sd.get("patch_embed.proj.weight")
    if patch is None:
        return None
    blocks: dict[tuple[int, int], int] = {}  # (stage, block) -> attention width
    heads0 = None
    for key, value in sd.items():
        m = re.match(r"^stages\.(\d+)\.blocks\.(\d+)\.attn\.qkv\.weight$", key)
        if m:
            blocks[int(m.group(1)), int(m.group(2))] = value.shape[0] // 3
    stages = {i for i, _ in blocks}
    if not blocks or stages != set(range(1 + max(stages))):  # a whole stage without attention: cannot tell
        return None
    depths = tuple(1 + max(j for (i, j) in blocks if i == s) for s in range(len(stages)))
    pool = sd.get("stages.0.blocks.0.attn.pool_k.weight")
    if pool is not None and pool.shape[0] and (0, 0) in blocks:
        heads0 = blocks[0, 0] // pool.shape[0]
    return _Signature(
        ndim=patch.ndim - 2, depths=depths, embed_dim=patch.shape[0], num_heads=heads0,
        cls_token="cls_token" in sd, rel_pos=any(k.endswith("rel_pos_h") for k in sd),
        abs_pos=any(k.startswith("pos_embed") for k in sd),
        stage_norms=any(re.match(r"^stages\.\d+\.norm\.weight$", k) for k in sd),
    )


def _flat_signature(sd: Mapping[str, Tensor]) -> Optional[_Signature]:
    """As `_signature`, for a flat upstream layout: stages are runs of blocks with one attention width."""
    patch = next((sd[k] for k in ("patch_embed.proj.weight", "patch_embed.patch_model.weight", "conv_proj.weight",
                                  "patch_embed.projection.weight") if k in sd), None)
    widths: dict[int, int] = {}
    for key, value in sd.items():
        m = re.match(r"^blocks\.(\d+)\.attn\.(qkv|q)\.weight$", key)
        if m:
            widths[int(m.group(1))] = value.shape[0] // (3 if m.group(2) == "qkv" else 1)
    if patch is None or not widths:
        return None
    depths: list[int] = []
    last = None
    for n in sorted(widths):
        if widths[n] != last:
            depths.append(0)
            last = widths[n]
        depths[-1] += 1
    ndim = patch.ndim - 2
    if ndim == 3 and patch.shape[2] == 1:
        ndim = 2
    return _Signature(
        ndim=ndim, depths=tuple(depths), embed_dim=patch.shape[0], num_heads=None,
        cls_token=any(k.endswith("cls_token") or k.endswith("class_token") for k in sd),
        rel_pos=any(k.endswith("rel_pos_h") for k in sd),
        abs_pos=any("pos_embed" in k or k.startswith("pos_encoding.spatial") for k in sd),
        stage_norms=any(re.match(r"^scale\d_norm\.weight$", k) for k in sd),
    )


def matching_architectures(state_dict: Mapping[str, Any]) -> list[str]:
    """Registered architectures whose structure (rank, depths, width, heads, class token, position
    encoding) matches a checkpoint of any supported layout. Empty if it cannot tell."""
    from ..model.mvit import MODEL_CFGS

    try:
        sd = unwrap_checkpoint(state_dict)
        layout = detect_layout(sd)
    except CheckpointMismatchError:
        return []
    if layout in _PREFIXES:
        sd = _strip_prefix(sd, layout)
    sig = _signature(sd) or _flat_signature(sd)
    if sig is None:
        return []
    return [
        name for name, cfg in MODEL_CFGS.items()
        if cfg.ndim == sig.ndim and tuple(cfg.depths) == sig.depths and cfg.embed_dim[0] == sig.embed_dim
        and cfg.use_cls_token == sig.cls_token and cfg.rel_pos == sig.rel_pos
        and (cfg.abs_pos != "none") == sig.abs_pos and sig.num_heads in (None, cfg.num_heads[0])
        and getattr(cfg, "stage_norms", False) == sig.stage_norms
    ]


def describe_checkpoint(state_dict: Mapping[str, Any]) -> str:
    """One line on what a checkpoint is: layout, rank, depths, width, class count, matching architectures."""
    sd = unwrap_checkpoint(state_dict)
    layout = detect_layout(sd)
    sig = _signature(sd) or _flat_signature(_strip_prefix(sd, layout) if layout in _PREFIXES else sd)
    head = next((v for k, v in sd.items() if re.match(r"^(head\.(fc|proj|projection|1)|cls_head\.fc_cls)\.weight$",
                                                      k)), None)
    parts = [f"{layout} layout"]
    if sig is not None:
        parts.append(f"{'video' if sig.ndim == 3 else 'image'}, depths {sig.depths}, width {sig.embed_dim}")
    if head is not None:
        parts.append(f"{head.shape[0]} classes")
    names = matching_architectures(sd)
    parts.append(f"fits {', '.join(names)}" if names else "fits no registered architecture")
    return "; ".join(parts)


def _candidates_hint(sd: Mapping[str, Tensor], model: nn.Module) -> str:
    names = matching_architectures(sd)
    if not names:
        return ""
    if _model_name(model) in names:
        return f" (the checkpoint's structure matches {_model_name(model)}: check the input size / overrides)"
    return f". The checkpoint is for {' or '.join(names)}; create that architecture instead"

