"""Registration, published sizes and the timm model contract."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from timm.optim import param_groups_layer_decay
from torch.utils.flop_counter import FlopCounterMode

import mvit_zoo

# name: (params, GMACs = FLOPs / 2 for one view at the build size), from ../shared/reference/zoo.md.
# 2D: timm 1.0.31 mvitv2_* measured (base/large/huge _cls with their 19168-class IN-21k heads).
# 3D: torchvision (v1-B 16x4, v2-S), pytorchvideo (v1-B 32x3), SlowFast's model code on its configs
# (B-24 32x3, v2-B, v2-L; the papers' GFLOPs are multiply-adds). v1-B-16 image: SlowFast's config
# with a 1000-class head (36.98M; the MViT paper lists 7.8 GFLOPs).
PUBLISHED = {
    "mvit_tiny": (24_173_320, 4.68),
    "mvit_small": (34_870_216, 6.96),
    "mvit_base": (51_472_744, 10.10),
    "mvit_large": (217_992_952, 43.71),
    "mvit_small_cls": (34_870_312, 7.00),
    "mvit_base_cls": (65_444_032, 10.18),
    "mvit_large_cls": (234_583_216, 42.02),
    "mvit_huge_cls": (694_804_128, 120.33),
    # detectron2's COCO backbones (no head): the plain models' blocks plus a norm per stage, no final norm
    # (test_window.py checks each against its plain model); their FLOPs are not published
    "mvit_tiny_det": (23_405_664, None),
    "mvit_small_det": (34_102_560, None),
    "mvit_base_det": (50_705_088, None),
    "mvit_large_det": (212_484_384, None),
    "mvit_huge_det": (665_345_408, None),
    "mvit_v1_b_16": (36_982_600, 7.8),
    "mvit_b_16x4": (36_610_672, 70.6),
    "mvit_b_32x3": (36_611_440, 170.37),
    "mvit_b24_32x3": (53_115_280, None),  # not published
    "mvit_v2_s_16x4": (34_537_744, 64.0),
    "mvit_v2_b_32x3": (51_230_128, 225.0),
    "mvit_v2_l_40x3": (213_390_112, 2828.0),
}
# tags whose weights need another head or architecture than their model's default, with the figures their
# publisher gives for them (mmaction2's configs/recognition/mvit/README.md: params rounded to 0.1M, GFLOPs = GMACs)
PUBLISHED_TAGS = {
    "mvit_v2_s_16x4.mm_k400": (34_500_000, 64.0),
    "mvit_v2_s_16x4.mm_maskfeat_k400": (36_400_000, 71.0),  # expand_attn=False
    "mvit_v2_s_16x4.mm_ssv2": (34_400_000, 64.0),  # 174 classes
    # SlowFast projects/maskfeat/README.md gives the fine-tuned networks' figures (400 classes, params in whole M)
    "mvit_v2_s_16x4.fb_maskfeat_pt_k400": (36_000_000, 71.0),
    "mvit_v2_l_40x3.fb_maskfeat_pt_k400": (218_000_000, 377.0),
}
_FINE_TUNED_HEAD = {"mvit_v2_s_16x4.fb_maskfeat_pt_k400": 400, "mvit_v2_l_40x3.fb_maskfeat_pt_k400": 400}


def test_every_registered_model_is_listed() -> None:
    assert set(mvit_zoo.list_models()) == set(PUBLISHED)
    assert set(timm.list_models("mvit_*")) >= set(PUBLISHED)


@pytest.mark.parametrize("name", list(PUBLISHED) + list(PUBLISHED_TAGS))
def test_params_and_flops_match_published(name: str) -> None:
    params, gmacs = {**PUBLISHED, **PUBLISHED_TAGS}[name]
    head = {"num_classes": _FINE_TUNED_HEAD[name]} if name in _FINE_TUNED_HEAD else {}
    with torch.device("meta"):
        model = mvit_zoo.create_model(name, **head).eval()
        x = torch.empty((1, 3) + model.img_size)
    n = sum(p.numel() for p in model.parameters())
    rounding = 500_000 if params % 1_000_000 == 0 else 0  # a figure given in whole millions
    assert abs(n - params) <= max(0.01 * params, rounding), f"{name}: {n:,} params vs published {params:,}"
    if gmacs is not None:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
        measured = counter.get_total_flops() / 2e9
        assert abs(measured - gmacs) <= 0.01 * gmacs, f"{name}: {measured:.2f} GMACs vs published {gmacs}"


def test_pretrained_tags_and_cfgs() -> None:
    tags = mvit_zoo.list_pretrained()
    for expected in ["mvit_tiny.fb_in1k", "mvit_huge_cls.fb_inw21k", "mvit_v2_b_32x3.fb_k400",
                     "mvit_v2_b_32x3.fb_ssv2", "mvit_b24_32x3.fb_k600", "mvit_b_32x3.pv_k400"]:
        assert expected in tags
    small = dict(depths=(1, 1, 1, 1), embed_dim=16, num_heads=1)
    ssv2 = mvit_zoo.create_model("mvit_v2_s_16x4.fb_ssv2", img_size=(4, 32, 32), **small)
    cfg = ssv2.pretrained_cfg
    assert ssv2.num_classes == 174 and cfg["label_set"] == "ssv2" and cfg["test_views"] == (1, 3)
    assert cfg["num_frames"] == 16 and cfg["input_size"] == (3, 224, 224) and cfg["hf_hub_id"].endswith(
        "/mvit_v2_s_16x4.fb_ssv2")
    tiny = mvit_zoo.create_model("mvit_tiny", img_size=32, **small)
    assert tiny.pretrained_cfg["hf_hub_id"] == "timm/mvitv2_tiny.fb_in1k"
    assert tiny.pretrained_cfg["license"] and tiny.pretrained_cfg["paper_ids"]


def test_unknown_names_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="did you mean mvit_small"):
        mvit_zoo.create_model("mvit_smal")
    with pytest.raises(ValueError, match="unknown pretrained tag 'fb_k700' for mvit_v2_s_16x4; available:"):
        mvit_zoo.create_model("mvit_v2_s_16x4.fb_k700")


# ------------------------------------------------------------------------------------------------
# timm model contract
# ------------------------------------------------------------------------------------------------

SMALL = dict(depths=(1, 1, 2, 1), embed_dim=16, num_heads=1)


@pytest.fixture(params=["mvit_tiny", "mvit_small_cls", "mvit_v2_s_16x4", "mvit_b_16x4"])
def small_model(request: pytest.FixtureRequest) -> tuple[mvit_zoo.MViT, torch.Tensor]:
    name = request.param
    video = name.endswith(("16x4", "32x3"))
    size = (4, 32, 32) if video else (32, 32)
    model = timm.create_model(name, img_size=size, num_classes=7, **SMALL).eval()
    return model, torch.randn((2, 3) + size)


def test_forward_head_and_features(small_model) -> None:
    model, x = small_model
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert tokens.shape[-1] == model.num_features == 128
        pooled = model.forward_head(tokens, pre_logits=True)
        assert pooled.shape == (2, model.num_features)
        assert torch.equal(model.forward_head(tokens), model(x)) and model(x).shape == (2, 7)


def test_reset_classifier_and_global_pool(small_model) -> None:
    model, x = small_model
    model.reset_classifier(3)
    assert model.get_classifier().out_features == 3 and model(x).shape == (2, 3)
    model.reset_classifier(0, global_pool="avg")
    assert model(x).shape == (2, model.num_features)
    model.reset_classifier(0, global_pool="")
    assert model(x).shape == model.forward_features(x).shape
    if model.cls_token is None:
        with pytest.raises(ValueError, match="needs a class token"):
            model.reset_classifier(0, global_pool="token")
    with pytest.raises(ValueError, match="global_pool must be"):
        model.reset_classifier(0, global_pool="max")


def test_num_classes_zero_and_in_chans() -> None:
    m = timm.create_model("mvit_tiny", img_size=32, num_classes=0, in_chans=1, **SMALL)
    assert m(torch.randn(2, 1, 32, 32)).shape == (2, 128)
    v = timm.create_model("mvit_v2_s_16x4", img_size=(4, 32, 32), in_chans=4, **SMALL)
    assert v(torch.randn(1, 4, 4, 32, 32)).shape == (1, 400)


def test_grad_checkpointing_same_output_and_grads(small_model) -> None:
    model, x = small_model
    model.train()
    model.head.drop.p = 0.0
    torch.manual_seed(0)
    out = model(x)
    out.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out_ckpt = model(x)
    out_ckpt.sum().backward()
    assert torch.allclose(out, out_ckpt, atol=1e-6)
    for n, p in model.named_parameters():
        if n in grads:
            assert torch.allclose(grads[n], p.grad, atol=1e-6), n


def test_no_weight_decay_and_layer_decay_groups(small_model) -> None:
    model, _ = small_model
    nwd = model.no_weight_decay()
    assert any("rel_pos" in n or "pos_embed" in n for n in nwd)
    assert all(any(k in n for k in ("pos_embed", "rel_pos", "cls_token")) for n in nwd)
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.75)
    scales = sorted({g["lr_scale"] for g in groups})
    assert len(scales) == sum(SMALL["depths"]) + 2  # stem, each block, final norm/head
    coarse = model.group_matcher(coarse=True)
    assert coarse["blocks"][0][0] == r"^stages\.(\d+)"


def test_fused_and_explicit_attention_agree_at_other_sizes() -> None:
    torch.manual_seed(0)
    for name, x in [("mvit_small_cls", torch.randn(2, 3, 48, 80)), ("mvit_v2_s_16x4", torch.randn(1, 3, 6, 40, 72))]:
        video = x.ndim == 5
        m = timm.create_model(name, img_size=(4, 32, 32) if video else 32, **SMALL).eval()
        with torch.no_grad():
            a = m(x)
            m.set_fused_attn(False)
            b = m(x)
        assert (a - b).abs().max() < 1e-5


def test_local_dir_keeps_the_saved_data_config(tmp_path: Path) -> None:
    """timm's 'local-dir:' keeps only PretrainedCfg's own fields of config.json; the video data settings a
    fine-tuned folder saved (sampling rate, frame sampling, channel order) must reach the model's cfg too."""
    from safetensors.torch import save_file

    from mvit_zoo.data.config import config_for_model, write_config

    kwargs = {"depths": [1, 1, 1, 1], "embed_dim": 16, "num_heads": 1, "img_size": [8, 32, 32], "num_classes": 3}
    model = timm.create_model("mvit_v2_s_16x4", **kwargs)
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    data = {"sampling_rate": 2, "frame_sampling": "segment", "channel_order": "BGR", "test_views": [1, 3]}
    write_config(tmp_path, config_for_model(model, model_args=kwargs, pretrained_cfg=model.pretrained_cfg,
                                            data_config=data, label_names=["a", "b", "c"]))
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True)
    cfg = loaded.pretrained_cfg
    assert (cfg["num_frames"], cfg["sampling_rate"], cfg["frame_sampling"], cfg["channel_order"]) == (
        8, 2, "segment", "BGR")
    assert tuple(cfg["test_views"]) == (1, 3) and cfg.get("label_set") is None and cfg["label_names"] == ["a", "b", "c"]
