"""detectron2's MViTv2 checkpoints: read their `.pkl` files safely, map them onto torchvision's detectors.

detectron2's model zoo files are pickles of `{'model': {name: numpy array}, '__author__': str}` (read by
detectron2's `DetectionCheckpointer._load_file` with `pickle.load(f, encoding='latin1')`). A plain pickle can
run any code while it loads, so `read_detectron2_pkl` uses an unpickler that builds numpy arrays, numpy dtypes
and plain containers only, and refuses every other global with an `UnsafeCheckpointError` naming it.

`convert_detectron2_detector` maps such a checkpoint onto an `MViTFPN` (backbone + FPN) or onto a torchvision
`MaskRCNN` / `FasterRCNN` built on one. Names (detectron2 -> torchvision):

    backbone.bottom_up.*              body.model.* (the MViT, as `convert_state_dict`'s 'detectron2' layout)
    backbone.bottom_up.scale{k}_norm  body.model.stages.{k-2}.norm on mvit_*_det; else body.norms.{k-2}
                                      (then build MViTBackbone(norm=True))
    backbone.fpn_lateral{k}[.norm]    fpn.inner_blocks.{k-2}.0 [.1]
    backbone.fpn_output{k}[.norm]     fpn.layer_blocks.{k-2}.0 [.1] (ViTDet's LN-in-FPN: norm_layer=LayerNorm2d)
    proposal_generator.rpn_head.conv[.conv{i}]  rpn.head.conv.{i}.0
      .objectness_logits / .anchor_deltas       rpn.head.cls_logits / .bbox_pred
    roi_heads.box_head.fc1, fc2       roi_heads.box_head.fc6, fc7 (TwoMLPHead), or for a FastRCNNConvFCHead
    roi_heads.box_head.conv{i}[.norm], fc1      roi_heads.box_head.{i-1}.0 [.1], .{convs + 1}
    roi_heads.box_predictor.cls_score           .cls_score, background row moved from last to first
    roi_heads.box_predictor.bbox_pred           .bbox_pred, zero rows for the background class in front
    roi_heads.mask_head.mask_fcn{i}[.norm]      roi_heads.mask_head.{i-1}.0 [.1]
    roi_heads.mask_head.deconv / .predictor     roi_heads.mask_predictor.conv5_mask / .mask_fcn_logits (+ a
                                                zero background map in front)

The torchvision detector needs detectron2's class count + 1 (`num_classes=81` for COCO, in detectron2's
contiguous order of the COCO category ids), its anchors (sizes 32..512, one per level, ratios 0.5, 1, 2: the
default of both libraries) and, for ViTDet files, `rpn_conv_depth=2` and LayerNorm(eps=1e-6) in FPN and heads.

Not mapped (a `CheckpointMismatchError` says so): Cascade R-CNN heads (`roi_heads.box_head.{0,1,2}`,
`box_predictor.{0,1,2}`; torchvision has no cascade: pass an `MViTFPN` to load backbone and FPN and leave the
heads out) and class-agnostic box regression. Mapped but computed differently by torchvision: RoIAlign
(detectron2's ROIAlignV2 samples with `aligned=True`, torchvision's MultiScaleRoIAlign with `aligned=False`, a
half-pixel shift) and the proposal counts (set `rpn_pre_nms_top_n_test` / `rpn_post_nms_top_n_test` to
detectron2's 1000 / 1000). The backbone computes detectron2's function on `mvit_*_det` (hybrid window
attention, detectron2's window sizes and K/V strides); a plain MViT takes the same tensors but attends globally.
"""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .convert import (CheckpointMismatchError, ConversionReport, ConvertedStateDict, _rename_flat, _strip_prefix,
                      fit_state_dict)
from .hub import CorruptCheckpointError, UnsafeCheckpointError

__all__ = ["read_detectron2_pkl", "convert_detectron2_detector"]

# The globals a pickle of numpy arrays needs (numpy 1.x and 2.x module names) and plain containers.
# NOTE: protocol-2 pickles written by Python 3 store an array's bytes as `_codecs.encode(text, 'latin1')`
# (torch's weights_only unpickler allows it too: it only turns a str into bytes); protocol 5 builds arrays
# with `numeric._frombuffer(bytes, dtype, shape, order)`.
_ALLOWED_GLOBALS = {
    (f"numpy.{core}.{module}", name) for core in ("core", "_core")
    for module, name in (("multiarray", "_reconstruct"), ("numeric", "_frombuffer"))
} | {("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"), ("_codecs", "encode")}
_BACKBONE = "backbone.bottom_up."


class _NumpyUnpickler(pickle.Unpickler):
    """Builds numpy arrays, dtypes and containers; any other class or function is refused before it is
    imported, so nothing a malicious file names is ever called."""

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file, encoding="latin1")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise UnsafeCheckpointError(
                f"refused to load {self.path}: its pickle asks for {module}.{name}, and only numpy arrays and plain "
                f"containers are read from a detectron2 .pkl file (building anything else could run code). Re-save "
                f"the weights alone with a trusted tool, as {{'model': {{name: numpy array}}}}")
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(
            f"refused to load {self.path}: its pickle refers to external objects (persistent id {str(pid)[:60]!r}); "
            f"a detectron2 .pkl file holds numpy arrays only")


def read_detectron2_pkl(path: str | os.PathLike) -> dict[str, Any]:
    """A detectron2 model zoo `.pkl` file as `{'model': {name: Tensor}, '__author__': str}`.

    Only numpy arrays, dtypes and plain containers are unpickled (`UnsafeCheckpointError` names anything
    else); bytes that are no such pickle are a `CorruptCheckpointError`. Arrays become CPU tensors that own
    their memory; an array of Python objects is refused."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file not found: {path}")
    try:
        with open(path, "rb") as f:
            data = _NumpyUnpickler(f, path).load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever the unpickler cannot parse is not a readable checkpoint
        raise CorruptCheckpointError(
            f"cannot read detectron2 weight file {path}: it is truncated or not a pickle "
            f"({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(data, Mapping) or not isinstance(data.get("model"), Mapping):
        found = ", ".join(map(str, list(data)[:8])) if isinstance(data, Mapping) else type(data).__name__
        raise CorruptCheckpointError(
            f"{path} is not a detectron2 model zoo file: expected {{'model': {{name: array}}, '__author__': ...}}, "
            f"found {found} (Caffe2 / Detectron1 'blobs' files are not read)")
    model: dict[str, Tensor] = {}
    for key, value in data["model"].items():
        if not isinstance(value, np.ndarray) or value.dtype.hasobject:
            raise UnsafeCheckpointError(
                f"refused to load {path}: model[{key!r}] is a {type(value).__name__}"
                f"{' of Python objects' if isinstance(value, np.ndarray) else ''}, not a numeric numpy array")
        model[str(key)] = torch.from_numpy(np.array(value, copy=True, order="C"))
    return {"model": model, "__author__": str(data.get("__author__", ""))}


# --------------------------------------------------------------------------------------------------
# Detector names
# --------------------------------------------------------------------------------------------------

def _fpn_of(model: nn.Module) -> tuple[nn.Module, str]:
    """The MViTFPN inside `model` and the prefix of its keys."""
    from ..detection import MViTFPN

    if isinstance(model, MViTFPN):
        return model, ""
    if isinstance(getattr(model, "backbone", None), MViTFPN):
        return model.backbone, "backbone."
    raise TypeError(f"expected an MViTFPN or a torchvision detector whose backbone is one, got {type(model).__name__}")


def _conv_norm(rest: str, index: int) -> str:
    """detectron2's `Conv2d` (`weight`, `bias`, `norm.*`) -> torchvision's Conv2dNormActivation (`0.*`, `1.*`)."""
    return f"{index}.1.{rest[len('norm.'):]}" if rest.startswith("norm.") else f"{index}.0.{rest}"


def _head_names(sd: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> dict[str, str]:
    """detectron2 RPN / RoI-head key -> torchvision key (see the module docstring)."""
    if any(re.match(r"^roi_heads\.box_(head|predictor)\.\d+\.", k) for k in sd):
        raise CheckpointMismatchError(
            "this detectron2 checkpoint has Cascade R-CNN heads (roi_heads.box_head.0..2), which torchvision has no "
            "counterpart for; pass an MViTFPN to convert_detectron2_detector to load the backbone and FPN alone")
    two_mlp = "roi_heads.box_head.fc6.weight" in target
    convs = sum(1 for k in sd if re.match(r"^roi_heads\.box_head\.conv\d+\.weight$", k))
    names = {}
    for key in sd:
        m = re.match(r"^proposal_generator\.rpn_head\.(.*)$", key)
        if m:
            rest = m.group(1)
            c = re.match(r"^conv\.conv(\d+)\.(.*)$", rest) or re.match(r"^conv\.()(.*)$", rest)
            if c:
                names[key] = f"rpn.head.conv.{int(c.group(1) or 0)}.0.{c.group(2)}"
            else:
                names[key] = "rpn.head." + rest.replace("objectness_logits.", "cls_logits.").replace(
                    "anchor_deltas.", "bbox_pred.")
            continue
        m = re.match(r"^roi_heads\.box_head\.(conv|fc)(\d+)\.(.*)$", key)
        if m:
            kind, i, rest = m.group(1), int(m.group(2)), m.group(3)
            if two_mlp:
                names[key] = f"roi_heads.box_head.fc{i + 5}.{rest}" if kind == "fc" else key
            elif kind == "conv":
                names[key] = "roi_heads.box_head." + _conv_norm(rest, i - 1)
            else:  # torchvision: convs, Flatten, then Linear + ReLU pairs
                names[key] = f"roi_heads.box_head.{convs + 1 + 2 * (i - 1)}.{rest}"
            continue
        m = re.match(r"^roi_heads\.mask_head\.(mask_fcn(\d+)|deconv|predictor)\.(.*)$", key)
        if m:
            rest = m.group(3)
            if m.group(2):
                names[key] = "roi_heads.mask_head." + _conv_norm(rest, int(m.group(2)) - 1)
            else:
                part = "conv5_mask" if m.group(1) == "deconv" else "mask_fcn_logits"
                names[key] = f"roi_heads.mask_predictor.{part}.{rest}"
            continue
        if key.startswith("roi_heads.box_predictor."):
            names[key] = key
    return names


def _with_background(key: str, value: Tensor, num_classes: int) -> Tensor:
    """detectron2's class layout -> torchvision's: background is class 0 in torchvision, the last score in
    detectron2, and detectron2 predicts no box or mask for it (zeros here: torchvision ignores them)."""
    if key.startswith("roi_heads.box_predictor.cls_score."):
        return torch.cat((value[-1:], value[:-1]))
    if key.startswith("roi_heads.box_predictor.bbox_pred."):
        if value.shape[0] == 4 and num_classes > 2:
            raise CheckpointMismatchError(
                "this detectron2 checkpoint regresses class-agnostic boxes (bbox_pred has 4 rows); torchvision's "
                "FastRCNNPredictor is class-specific: this head is not mapped")
        return torch.cat((value.new_zeros((4,) + value.shape[1:]), value))
    if key.startswith("roi_heads.mask_predictor.mask_fcn_logits."):
        return torch.cat((value.new_zeros((1,) + value.shape[1:]), value))
    return value


def convert_detectron2_detector(checkpoint: Mapping[str, Any], model: nn.Module) -> ConvertedStateDict:
    """Map a detectron2 MViTv2 detector checkpoint (`read_detectron2_pkl`'s dict, or its `'model'` dict) onto
    `model`: an `MViTFPN` (backbone + FPN; the heads are reported in `.report.dropped`) or a torchvision
    `MaskRCNN` / `FasterRCNN` whose backbone is one (everything mapped). Returns a state dict that
    `model.load_state_dict(sd)` accepts (strict). Every key that is missing, left over or of another shape
    raises `CheckpointMismatchError` naming it."""
    sd = checkpoint.get("model", checkpoint) if isinstance(checkpoint.get("model"), Mapping) else checkpoint
    if not any(k.startswith(_BACKBONE) for k in sd):
        raise CheckpointMismatchError(
            f"not a detectron2 MViT detector checkpoint: no '{_BACKBONE}*' keys (first keys: "
            f"{', '.join(sorted(sd)[:6])})")
    fpn, prefix = _fpn_of(model)
    body = fpn.body
    target = model.state_dict()
    report = ConversionReport(layout="detectron2")
    out = ConvertedStateDict()
    out.report = report

    # the MViT: renamed and fitted as convert_state_dict does (rel-pos tables resized to the build size); its
    # stage norms are the model's own with `stage_norms` (mvit_*_det), else MViTBackbone's level norms
    cfg = body.model.cfg
    own_norms = getattr(cfg, "stage_norms", False)
    levels = {stage + 2: j for j, stage in enumerate(body.out_indices)}  # scale{k} / fpn_*{k} -> level j
    trunk = {k: v for k, v in _strip_prefix(sd, "detectron2").items()
             if own_norms or not re.match(r"^scale\d_norm\.", k)}
    if own_norms:
        trunk = _strip_prefix({_BACKBONE + k: v for k, v in trunk.items()}, "detectron2", cfg)
    fitted = fit_state_dict(_rename_flat(trunk, "detectron2", cfg), body.model, layout="detectron2", head="drop")
    report.resized += fitted.report.resized
    out.update({f"{prefix}body.model.{k}": v for k, v in fitted.items()})

    names: dict[str, str] = {}
    for key in sd:
        rest = key[len(_BACKBONE):] if key.startswith(_BACKBONE) else None
        m = re.match(r"^scale(\d)_norm\.(.*)$", rest or "")
        if m:
            if not own_norms and int(m.group(1)) in levels:
                names[key] = f"{prefix}body.norms.{levels[int(m.group(1))]}.{m.group(2)}"
            continue
        m = re.match(r"^backbone\.fpn_(lateral|output)(\d)\.(.*)$", key)
        if m and int(m.group(2)) in levels:
            blocks = "inner_blocks" if m.group(1) == "lateral" else "layer_blocks"
            names[key] = f"{prefix}fpn.{blocks}.{_conv_norm(m.group(3), levels[int(m.group(2))])}"
    heads = {k: v for k, v in sd.items() if k.startswith(("proposal_generator.", "roi_heads."))}
    if prefix:
        names.update(_head_names(heads, target))
    else:
        report.dropped += sorted(heads)

    num_classes = target.get("roi_heads.box_predictor.cls_score.weight", torch.empty(0)).shape[0]
    mismatched = []
    for key, name in names.items():
        value = _with_background(name, sd[key], num_classes) if prefix else sd[key]
        if name not in target:
            report.unexpected.append(f"{key} (as {name})")
        elif value.shape != target[name].shape:
            mismatched.append(f"{key} -> {name}: checkpoint {tuple(value.shape)} vs model {tuple(target[name].shape)}")
        else:
            out[name] = value.to(target[name].dtype)
    placed = set(names) | {k for k in sd if k.startswith(_BACKBONE)} | set(report.dropped)
    report.unexpected += sorted(k for k in sd if k not in placed)
    report.missing += sorted(k for k in target if k not in out)
    if mismatched or report.missing or report.unexpected:
        msg = [f"detectron2 checkpoint does not fit {type(model).__name__}"]
        if mismatched:
            msg.append(f"shape mismatch ({len(mismatched)}): {'; '.join(mismatched[:8])}")
        if report.missing:
            msg.append(f"missing ({len(report.missing)}): {', '.join(report.missing[:12])}")
        if report.unexpected:
            msg.append(f"not mapped ({len(report.unexpected)}): {', '.join(report.unexpected[:12])}")
        if isinstance(body.norms[0], nn.Identity) and not own_norms:
            msg.append("detectron2 normalises every level (scale{k}_norm): build MViTBackbone(..., norm=True)")
        raise CheckpointMismatchError("; ".join(msg))
    return out
