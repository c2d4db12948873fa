"""The registered models: timm entrypoints, pretrained tags and their weight sources.

Importing `mvit_zoo` imports this module, which registers every model with timm, so that
`timm.create_model('mvit_v2_s_16x4.fb_k400', pretrained=True)` works.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

import timm
import torch.fx
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import get_notrace_functions, get_notrace_modules
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import FeatureGetterNet, FeatureInfo
from torch import nn
from timm.models._builder import resolve_pretrained_cfg
from timm.models._pretrained import PretrainedCfg

from ..weights import hub
from .mvit import MODEL_CFGS, MViT, MViTCfg, make_cfg

__all__ = ["MViTPretrainedCfg", "create_model", "list_models", "list_pretrained", "default_cfgs"]

KINETICS_MEAN = (0.45, 0.45, 0.45)
KINETICS_STD = (0.225, 0.225, 0.225)
PAPER_V1 = "Multiscale Vision Transformers (Fan et al., ICCV 2021)"
PAPER_V2 = "MViTv2: Improved Multiscale Vision Transformers for Classification and Detection (Li et al., CVPR 2022)"
_MVIT_REPO = "https://dl.fbaipublicfiles.com/mvit/mvitv2_models/"
_SLOWFAST_V2 = "https://dl.fbaipublicfiles.com/pyslowfast/model_zoo/mvitv2/pysf_video_models/"
_SLOWFAST_V1 = "https://dl.fbaipublicfiles.com/pyslowfast/model_zoo/mvit/"
_PYTORCHVIDEO = "https://dl.fbaipublicfiles.com/pytorchvideo/model_zoo/"
_CFG_FIELDS = {f.name for f in fields(MViTCfg)} | {"num_frames"}


@dataclass
class MViTPretrainedCfg(PretrainedCfg):
    """timm's PretrainedCfg plus what video models and upstream checkpoints need."""

    num_frames: Optional[int] = None  # video: frames per clip (T)
    sampling_rate: Optional[int] = None  # video: stride between sampled frames (tau)
    frame_sampling: Optional[str] = None  # video: 'stride' (T frames, tau apart) or 'segment' (middle frame of T
    #                                       equal segments of the whole video, SlowFast's SSv2 test protocol)
    channel_order: str = "RGB"  # channel order the model sees (SlowFast's SSv2 loader reads BGR and flips to RGB)
    test_views: Optional[tuple[int, int]] = None  # (temporal clips, spatial crops) of the published accuracy
    label_set: Optional[str] = None  # imagenet-1k | imagenet-21k-winter | kinetics-400 | kinetics-600 | ssv2
    top1: Optional[float] = None  # published accuracy of these weights (%)
    top5: Optional[float] = None
    file_sha256: Optional[str] = None  # SHA-256 of the official `url` file (full, or a published prefix of >= 8
    #                                    hex digits), checked on download; unset: none known, except for torchvision's
    #                                    `name-<sha256 prefix>.pth` files (MODEL_CARD.md, "File hashes")
    arch: Optional[dict] = None  # architecture fields these weights need (e.g. pytorchvideo's pooling-norm eps)


def _image_cfg(**kw: Any) -> MViTPretrainedCfg:
    return MViTPretrainedCfg(**{
        "input_size": (3, 224, 224), "crop_pct": 0.9, "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD, "num_classes": 1000,
        "first_conv": "patch_embed.proj", "classifier": "head.fc", "license": "apache-2.0",
        "paper_name": PAPER_V2, "paper_ids": "arXiv:2112.01526", "label_set": "imagenet-1k", **kw,
    })


def _video_cfg(frames: int, rate: int, size: int = 224, **kw: Any) -> MViTPretrainedCfg:
    return MViTPretrainedCfg(**{
        "input_size": (3, size, size), "num_frames": frames, "sampling_rate": rate, "frame_sampling": "stride",
        "crop_pct": size / 256 if size == 224 else 1.0, "interpolation": "bilinear", "mean": KINETICS_MEAN,
        "std": KINETICS_STD,
        "num_classes": 400, "first_conv": "patch_embed.proj", "classifier": "head.fc", "license": "apache-2.0",
        "label_set": "kinetics-400", "test_views": (5, 1), "paper_name": PAPER_V2, "paper_ids": "arXiv:2112.01526",
        **kw,
    })


def _det_cfg(**kw: Any) -> MViTPretrainedCfg:
    """A detection backbone (no head) of detectron2's COCO detectors, for its 1024-pixel inputs, pixels
    normalised as its MViTv2 configs do (ImageNet mean and std, RGB). detectron2's MODEL_ZOO.md puts its model
    zoo files under CC BY-SA 3.0; no file hash is published (the hub records the first download's SHA-256 beside
    the converted copy); box / mask AP are in README.md's model table.

    NOTE: `input_size` is the LSJ training crop. projects/MViTv2 tests its files at short side 800, long side at
    most 1333 (its coco_loader), not at a 1024 crop: evaluate through a detector's own resize. projects/ViTDet
    tests at long side 1024, padded to 1024 x 1024
    """
    return _image_cfg(**{"input_size": (3, 1024, 1024), "crop_pct": 1.0, "interpolation": "bilinear",
                         "num_classes": 0, "label_set": None, "license": "cc-by-sa-3.0", **kw})


def _ours(name: str) -> str:
    """This project's Hub repository for a converted checkpoint."""
    return f"{hub.hub_org()}/{name}"


_PV = dict(arch={"pool_norm_eps": 1e-5}, paper_name=PAPER_V1, paper_ids="arXiv:2104.11227")
_V1 = dict(paper_name=PAPER_V1, paper_ids="arXiv:2104.11227")
# SSv2: 174 classes, 1 clip x 3 crops with the short side resized to the crop, segment sampling.
_SSV2 = dict(num_classes=174, label_set="ssv2", test_views=(1, 3), frame_sampling="segment", sampling_rate=None,
             crop_pct=1.0)
# SlowFast normalised SSv2 frames in BGR order before flipping them to RGB, so in RGB order ImageNet's
# mean/std are reversed for the L 40x3 SSv2 checkpoint.
_BGR_IMAGENET = dict(mean=IMAGENET_DEFAULT_MEAN[::-1], std=IMAGENET_DEFAULT_STD[::-1])
# NOTE: SlowFast's one-crop test resizes the short side to TRAIN_JITTER_SCALES[0]: 356 in its MVITv2_L_40x3
# config (312 crops), where the 224 models' 256 is their crop_pct 224 / 256
_L_K400_CROP_PCT = 312 / 356
# SlowFast's code ran the Q/K/V pooling norms with eps 1e-5 until mid-2022, when the MViT v1 files were trained.
_SF_2021 = dict(arch={"pool_norm_eps": 1e-5}, paper_name=PAPER_V1, paper_ids="arXiv:2104.11227")

_D2 = "https://dl.fbaipublicfiles.com/detectron2/MViTv2/"

# ViTDet's MViTv2 detectors (projects/ViTDet): the same backbones as projects/MViTv2's B / L / H (its configs set
# the same embed_dim, depth, num_heads and last_block_indexes), in Cascade Mask R-CNNs with LayerNorm in FPN and
# heads, trained and tested with large-scale jitter at 1024: the test resizes the long side to 1024 and pads the
# image to 1024 x 1024 (`square_pad`), which `input_size` is here
_VITDET = "https://dl.fbaipublicfiles.com/detectron2/ViTDet/"

_MMACTION2 = "https://download.openmmlab.com/mmaction/v1.0/recognition/mvit/"
_MM = dict(license="apache-2.0")
PAPER_MASKFEAT = "Masked Feature Prediction for Self-Supervised Visual Pre-Training (Wei et al., CVPR 2022)"
_MASKFEAT = "https://dl.fbaipublicfiles.com/pyslowfast/masked_models/"
_MASKFEAT_PT = dict(num_classes=0, label_set=None, arch={"expand_attn": False}, paper_name=PAPER_MASKFEAT,
                    paper_ids="arXiv:2112.09133")

default_cfgs = generate_default_cfgs({
    # 2D MViTv2: timm's Hub files load as they are; the mvit repo's .pyth files are the fallback
    "mvit_tiny.fb_in1k": _image_cfg(hf_hub_id="timm/mvitv2_tiny.fb_in1k", url=_MVIT_REPO + "MViTv2_T_in1k.pyth",
                                    top1=82.3),
    "mvit_small.fb_in1k": _image_cfg(hf_hub_id="timm/mvitv2_small.fb_in1k", url=_MVIT_REPO + "MViTv2_S_in1k.pyth",
                                     top1=83.6),
    "mvit_base.fb_in1k": _image_cfg(hf_hub_id="timm/mvitv2_base.fb_in1k", url=_MVIT_REPO + "MViTv2_B_in1k.pyth",
                                    top1=84.4),
    "mvit_large.fb_in1k": _image_cfg(hf_hub_id="timm/mvitv2_large.fb_in1k", url=_MVIT_REPO + "MViTv2_L_in1k.pyth",
                                     top1=85.3),
    "mvit_small_cls": _image_cfg(),
    "mvit_base_cls.fb_inw21k": _image_cfg(hf_hub_id="timm/mvitv2_base_cls.fb_inw21k",
                                          url=_MVIT_REPO + "MViTv2_B_in21k.pyth", num_classes=19168,
                                          label_set="imagenet-21k-winter"),
    "mvit_large_cls.fb_inw21k": _image_cfg(hf_hub_id="timm/mvitv2_large_cls.fb_inw21k",
                                           url=_MVIT_REPO + "MViTv2_L_in21k.pyth", num_classes=19168,
                                           label_set="imagenet-21k-winter"),
    "mvit_huge_cls.fb_inw21k": _image_cfg(hf_hub_id="timm/mvitv2_huge_cls.fb_inw21k",
                                          url=_MVIT_REPO + "MViTv2_H_in21k.pyth", num_classes=19168,
                                          label_set="imagenet-21k-winter"),
    # 2D MViTv2 detection backbones (hybrid window attention, a norm per stage) of detectron2's COCO detectors
    # (projects/MViTv2); weights.detectron2.convert_detectron2_detector maps FPN and Mask R-CNN heads of the same
    # files. The first tag of an architecture is its default (timm's rule): mvit_tiny_det's is the Mask R-CNN
    # file, the one whose whole detector torchvision can run.
    "mvit_tiny_det.d2_coco_mask_rcnn": _det_cfg(url=_D2 + "mask_rcnn_mvitv2_t_3x/f307611773/model_final_1a1c30.pkl"),
    "mvit_tiny_det.d2_coco_cascade": _det_cfg(
        url=_D2 + "cascade_mask_rcnn_mvitv2_t_3x/f308344828/model_final_c6967a.pkl"),
    "mvit_small_det.d2_coco_cascade": _det_cfg(
        url=_D2 + "cascade_mask_rcnn_mvitv2_s_3x/f308344647/model_final_279baf.pkl"),
    "mvit_base_det.d2_coco_cascade": _det_cfg(
        url=_D2 + "cascade_mask_rcnn_mvitv2_b_3x/f308109448/model_final_421a91.pkl"),
    "mvit_base_det.d2_in21k_coco_cascade": _det_cfg(
        url=_D2 + "cascade_mask_rcnn_mvitv2_b_in12k_3x/f309003202/model_final_be5168.pkl"),
    "mvit_large_det.d2_in21k_coco_cascade": _det_cfg(
        url=_D2 + "cascade_mask_rcnn_mvitv2_l_in12k_lsj_50ep/f308099658/model_final_c41c5a.pkl"),
    "mvit_huge_det.d2_in21k_coco_cascade": _det_cfg(
        url=_D2 + "cascade_mask_rcnn_mvitv2_h_in12k_lsj_3x/f309013744/model_final_30d36b.pkl"),
    "mvit_base_det.d2_vitdet_in21k_coco_cascade": _det_cfg(
        url=_VITDET + "COCO/cascade_mask_rcnn_mvitv2_b_in21k/f325820315/model_final_8c3da3.pkl"),
    "mvit_large_det.d2_vitdet_in21k_coco_cascade": _det_cfg(
        url=_VITDET + "COCO/cascade_mask_rcnn_mvitv2_l_in21k/f325607715/model_final_2141b0.pkl"),
    "mvit_huge_det.d2_vitdet_in21k_coco_cascade": _det_cfg(
        url=_VITDET + "COCO/cascade_mask_rcnn_mvitv2_h_in21k/f326187358/model_final_2234d7.pkl"),
    # NOTE: upstream's LVIS paths have no 'f' before the model id, unlike its COCO ones
    "mvit_base_det.d2_vitdet_in21k_lvis_cascade": _det_cfg(
        url=_VITDET + "LVIS/cascade_mask_rcnn_mvitv2_b_in21k/329477206/model_final_a00567.pkl"),
    "mvit_large_det.d2_vitdet_in21k_lvis_cascade": _det_cfg(
        url=_VITDET + "LVIS/cascade_mask_rcnn_mvitv2_l_in21k/329661552/model_final_7838a5.pkl"),
    "mvit_huge_det.d2_vitdet_in21k_lvis_cascade": _det_cfg(
        url=_VITDET + "LVIS/cascade_mask_rcnn_mvitv2_h_in21k/330445165/model_final_ad4220.pkl"),
    # 2D MViT v1
    "mvit_v1_b_16.pv_in1k": _image_cfg(hf_hub_id=_ours("mvit_v1_b_16.pv_in1k"),
                                       url=_PYTORCHVIDEO + "imagenet/MVIT_B_16_f292487636.pyth", top1=82.9, **_PV),
    # 3D MViT v1, Kinetics-400
    "mvit_b_16x4.tv_k400": _video_cfg(16, 4, hf_hub_id=_ours("mvit_b_16x4.tv_k400"),
                                      url="https://download.pytorch.org/models/mvit_v1_b-dbeb1030.pth",
                                      top1=78.477, top5=93.582, license="bsd-3-clause", **_V1),
    "mvit_b_16x4.pv_k400": _video_cfg(16, 4, hf_hub_id=_ours("mvit_b_16x4.pv_k400"),
                                      url=_PYTORCHVIDEO + "kinetics/MVIT_B_16x4.pyth", top1=78.85, top5=93.85, **_PV),
    "mvit_b_32x3.pv_k400": _video_cfg(32, 3, hf_hub_id=_ours("mvit_b_32x3.pv_k400"),
                                      url=_PYTORCHVIDEO + "kinetics/MVIT_B_32x3_f294077834.pyth", top1=80.30,
                                      top5=94.69, **_PV),
    "mvit_b24_32x3.fb_k400": _video_cfg(32, 3, hf_hub_id=_ours("mvit_b24_32x3.fb_k400"),
                                        url=_SLOWFAST_V1 + "k400.pyth", top1=80.4, top5=94.8, **_SF_2021),
    "mvit_b24_32x3.fb_k600": _video_cfg(32, 3, hf_hub_id=_ours("mvit_b24_32x3.fb_k600"),
                                        url=_SLOWFAST_V1 + "k600.pyth", num_classes=600, label_set="kinetics-600",
                                        top1=83.9, top5=96.5, **_SF_2021),
    # 3D MViTv2
    "mvit_v2_s_16x4.fb_k400": _video_cfg(16, 4, hf_hub_id=_ours("mvit_v2_s_16x4.fb_k400"),
                                         url=_SLOWFAST_V2 + "MViTv2_S_16x4_k400_f302660347.pyth", top1=81.0,
                                         top5=94.6),
    "mvit_v2_s_16x4.tv_k400": _video_cfg(16, 4, hf_hub_id=_ours("mvit_v2_s_16x4.tv_k400"),
                                         url="https://download.pytorch.org/models/mvit_v2_s-ae3be167.pth",
                                         top1=80.757, top5=94.665, license="bsd-3-clause"),
    "mvit_v2_s_16x4.fb_ssv2": _video_cfg(16, 4, hf_hub_id=_ours("mvit_v2_s_16x4.fb_ssv2"),
                                         url=_SLOWFAST_V2 + "MViTv2_S_16x4_ssv2_f308341823.pyth", top1=68.2,
                                         top5=91.4, **_SSV2),
    "mvit_v2_b_32x3.fb_k400": _video_cfg(32, 3, hf_hub_id=_ours("mvit_v2_b_32x3.fb_k400"),
                                         url=_SLOWFAST_V2 + "MViTv2_B_32x3_k400_f304025456.pyth", top1=82.9,
                                         top5=95.7),
    "mvit_v2_b_32x3.fb_ssv2": _video_cfg(32, 3, hf_hub_id=_ours("mvit_v2_b_32x3.fb_ssv2"),
                                         url=_SLOWFAST_V2 + "MViTv2_B_32x3_ssv2_f305803282.pyth", top1=70.5,
                                         top5=92.7, **_SSV2),
    "mvit_v2_l_40x3.fb_k400": _video_cfg(40, 3, 312, hf_hub_id=_ours("mvit_v2_l_40x3.fb_k400"),
                                         url=_SLOWFAST_V2 + "MViTv2_L_40x3_k400_f306903192.pyth", top1=86.1,
                                         top5=97.0, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                                         test_views=(5, 3), crop_pct=_L_K400_CROP_PCT),
    "mvit_v2_l_40x3.fb_ssv2": _video_cfg(40, 3, 312, hf_hub_id=_ours("mvit_v2_l_40x3.fb_ssv2"),
                                         url=_SLOWFAST_V2 + "MViTv2_L_40x3_ssv2_f309603968.pyth", top1=73.3,
                                         top5=94.1, **_SSV2, **_BGR_IMAGENET),
    # mmaction2's own MViTv2-S (configs/recognition/mvit): 0-255 mean/std 114.75/57.375 = 0.45/0.225; the test
    # resizes the short side to the crop (crop_pct 1.0); file names end in their SHA-256's first 8 hex digits
    "mvit_v2_s_16x4.mm_k400": _video_cfg(16, 4, hf_hub_id=_ours("mvit_v2_s_16x4.mm_k400"),
                                         url=_MMACTION2 + "mvit-small-p244_32xb16-16x4x1-200e_kinetics400-rgb/"
                                         "mvit-small-p244_32xb16-16x4x1-200e_kinetics400-rgb_20230201-23284ff3.pth",
                                         file_sha256="23284ff3", top1=80.6, top5=94.7, crop_pct=1.0, **_MM),
    "mvit_v2_s_16x4.mm_maskfeat_k400": _video_cfg(
        16, 4, hf_hub_id=_ours("mvit_v2_s_16x4.mm_maskfeat_k400"),
        url=_MMACTION2 + "mvit-small-p244_k400-maskfeat-pre_8xb32-16x4x1-100e_kinetics400-rgb/"
        "mvit-small-p244_k400-maskfeat-pre_8xb32-16x4x1-100e_kinetics400-rgb_20230201-5bced1d0.pth",
        file_sha256="5bced1d0", top1=81.8, top5=95.2, crop_pct=1.0, test_views=(10, 1), arch={"expand_attn": False},
        paper_name=PAPER_MASKFEAT, paper_ids="arXiv:2112.09133", **_MM),
    "mvit_v2_s_16x4.mm_ssv2": _video_cfg(16, 4, hf_hub_id=_ours("mvit_v2_s_16x4.mm_ssv2"),
                                         url=_MMACTION2 + "mvit-small-p244_k400-pre_16xb16-u16-100e_sthv2-rgb/"
                                         "mvit-small-p244_k400-pre_16xb16-u16-100e_sthv2-rgb_20230201-4065c1b9.pth",
                                         file_sha256="4065c1b9", top1=68.2, top5=91.3, **_SSV2, **_MM),
    # MaskFeat K400 pre-training (SlowFast projects/maskfeat), no classifier: backbones to fine-tune, as its FT
    # configs do, with a mean-pooled head (global_pool='avg') and DIM_MUL_IN_ATT False
    "mvit_v2_s_16x4.fb_maskfeat_pt_k400": _video_cfg(
        16, 4, hf_hub_id=_ours("mvit_v2_s_16x4.fb_maskfeat_pt_k400"),
        url=_MASKFEAT + "k400_MVIT_S_MaskFeat_PT_epoch_00300.pyth", **_MASKFEAT_PT),
    "mvit_v2_l_40x3.fb_maskfeat_pt_k400": _video_cfg(
        16, 4, hf_hub_id=_ours("mvit_v2_l_40x3.fb_maskfeat_pt_k400"),
        url=_MASKFEAT + "k400_MVIT_L_MaskFeat_PT_epoch_00800.pyth",
        **{**_MASKFEAT_PT, "arch": {"expand_attn": False, "num_frames": 16, "img_size": 224}}),
})


def _saved_data_config(pcfg: PretrainedCfg) -> dict[str, Any]:
    """The `data_config` (frames, sampling rate, frame sampling, channel order, ...) of the config.json that a
    'local-dir:' or 'hf-hub:' cfg was read from: timm keeps only its own PretrainedCfg fields of that file."""
    from ..data.config import CONFIG_FILE, DATA_FIELDS, read_config

    path = None
    if pcfg.source == "local-dir" and pcfg.file:
        path = Path(pcfg.file) / CONFIG_FILE
    elif pcfg.source == "hf-hub" and pcfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = pcfg.hf_hub_id.partition("@")
        cached = try_to_load_from_cache(repo, CONFIG_FILE, revision=revision or None)
        path = Path(cached) if isinstance(cached, str) else None
    if path is None or not path.is_file():
        return {}
    return {k: v for k, v in read_config(path).data_config.items() if k in DATA_FIELDS and v is not None}


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> Any:
    """Build `variant`: architecture overrides come from kwargs (and from the tag, where its weights
    need them); weights from `mvit_zoo.hub`; `features_only=True` wraps the model for its pyramid."""
    pcfg = resolve_pretrained_cfg(variant, kwargs.pop("pretrained_cfg", None),
                                  kwargs.pop("pretrained_cfg_overlay", None))
    if not isinstance(pcfg, MViTPretrainedCfg):  # a plain cfg (e.g. from 'hf-hub:' or 'local-dir:' config.json)
        registered = default_cfgs.get(variant)
        base = registered.default if registered is not None else MViTPretrainedCfg()
        known = {f.name for f in fields(PretrainedCfg)}
        if pcfg.num_classes is not None and pcfg.num_classes != base.num_classes:
            # another head (a fine-tuned folder's): the tag's label set and accuracy are not these weights'
            base = dataclasses.replace(base, label_set=None, top1=None, top5=None, file_sha256=None)
        values = {k: v for k, v in dataclasses.asdict(pcfg).items() if k in known}
        pcfg = dataclasses.replace(base, **values, **_saved_data_config(pcfg))
    features_only = kwargs.pop("features_only", False)
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    feature_cls = kwargs.pop("feature_cls", "getter")
    arch = dict(pcfg.arch or {})
    arch.update({k: kwargs.pop(k) for k in list(kwargs) if k in _CFG_FIELDS})
    model_cfg = make_cfg(MODEL_CFGS[variant], **arch)
    kwargs.setdefault("num_classes", pcfg.num_classes)
    model = build_model_with_cfg(MViT, variant, pretrained=False, pretrained_cfg=pcfg, model_cfg=model_cfg, **kwargs)
    if pretrained:
        hub.load_pretrained(model, pcfg)
    if features_only:
        pretrained_cfg = model.pretrained_cfg
        if feature_cls in ("getter", FeatureGetterNet):
            model = FeatureGetterNet(model, out_indices=out_indices)
        elif feature_cls == "fx":
            model = feature_graph(model, out_indices)
        else:
            raise ValueError(f"features_only for MViT takes feature_cls='getter' (default) or 'fx', "
                             f"got {feature_cls!r}")
        model.pretrained_cfg = model.default_cfg = pretrained_cfg
    return model


class _Pyramid(nn.Module):
    """`model.forward_intermediates` as a forward: the maps of the stages `indices`."""

    def __init__(self, model: MViT, indices: tuple[int, ...]) -> None:
        super().__init__()
        self.model = model
        self.indices = list(indices)

    def forward(self, x: Any) -> Any:
        return self.model.forward_intermediates(x, indices=self.indices, intermediates_only=True)


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer with timm's leaf modules and no-trace functions (ours are registered there)."""

    def __init__(self) -> None:
        super().__init__(autowrap_functions=tuple(get_notrace_functions()))
        self.leaves = tuple(get_notrace_modules())

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, module_qualified_name)


def feature_graph(model: MViT, out_indices: tuple[int, ...] = (0, 1, 2, 3)) -> torch.fx.GraphModule:
    """`features_only=True, feature_cls='fx'`: the pyramid as a torch.fx GraphModule (the stage maps are
    nodes of its graph, for tools that select or rewrite nodes), with the getter's `feature_info`; the
    stages after the last selected one and the head are pruned, as the getter does."""
    info = FeatureInfo(model.feature_info, out_indices)
    model.prune_intermediate_layers(list(out_indices), prune_head=True)
    root = _Pyramid(model, tuple(out_indices))
    graph = torch.fx.GraphModule(root, _Tracer().trace(root), class_name="MViTFeatureGraph")
    graph.feature_info = info
    return graph


def _entrypoint(name: str) -> None:
    def fn(pretrained: bool = False, **kwargs: Any) -> MViT:
        return _create(name, pretrained=pretrained, **kwargs)

    fn.__name__ = fn.__qualname__ = name
    fn.__module__ = __name__
    fn.__doc__ = f"MViT variant `{name}`; see mvit_zoo.model.mvit.MODEL_CFGS['{name}']."
    globals()[name] = register_model(fn)


for _name in MODEL_CFGS:
    _entrypoint(_name)


def list_models(pattern: str = "") -> list[str]:
    """Names of the registered mvit-zoo architectures (fnmatch `pattern`)."""
    import fnmatch

    return [n for n in MODEL_CFGS if fnmatch.fnmatch(n, pattern or "*")]


def list_pretrained(pattern: str = "") -> list[str]:
    """`arch.tag` names that have published weights."""
    return [n for n in timm.list_pretrained(pattern or "mvit_*") if n.split(".")[0] in MODEL_CFGS]


def create_model(name: str, pretrained: bool = False, **kwargs: Any) -> Any:
    """`timm.create_model` for mvit-zoo names (`arch` or `arch.tag`), with a clear error for unknown ones."""
    arch, _, tag = name.partition(".")
    if arch not in MODEL_CFGS:
        import difflib

        close = difflib.get_close_matches(arch, list(MODEL_CFGS), n=3)
        raise ValueError(f"unknown mvit-zoo model {arch!r}" + (f"; did you mean {', '.join(close)}?" if close else "")
                         + f" Known: {', '.join(MODEL_CFGS)}")
    if tag:
        tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{arch}.*")]
        if tag not in tags:
            raise ValueError(f"unknown pretrained tag {tag!r} for {arch}; available: {', '.join(tags) or 'none'}")
    return timm.create_model(name, pretrained=pretrained, **kwargs)
