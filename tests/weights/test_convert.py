"""`mvit_zoo.weights.convert`: every upstream layout maps onto our models and computes what the reference
computes; conversion is lossless; resizing and image -> video inflation behave as the model does at
run time; mismatches are reported by name."""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import nn

import mvit_zoo
from mvit_zoo.weights import convert
from mvit_zoo.weights.convert import (CheckpointMismatchError, convert_state_dict, describe_checkpoint, detect_layout,
                              inflate_image_to_video, matching_architectures, to_native, unwrap_checkpoint)
from mvit_zoo.weights.hub import read_checkpoint, save_safetensors
from references import (fb_mvit_checkpoint, image_input, max_diff, pv_checkpoint, pv_reference, slowfast_checkpoint,
                        timm_reference, tv_reference, video_input)

pytestmark = pytest.mark.usefixtures("single_thread")
TOL = 1e-4


def _split_qkv(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """PySlowFast's 2021 attention (separate `attn.q/k/v`), from a fused checkpoint."""
    sd = {}
    for key, value in checkpoint["model_state"].items():
        if ".attn.qkv." in key:
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                sd[key.replace(".attn.qkv.", f".attn.{name}.")] = part.clone()
        else:
            sd[key] = value
    return {**checkpoint, "model_state": sd}


def _state_dict(ref: nn.Module) -> dict[str, Any]:
    return ref.state_dict()


CASES: dict[str, tuple[Callable[[], tuple[nn.Module, str, dict]], Callable[[nn.Module], Any], str, bool]] = {
    # name: (reference builder, checkpoint maker, expected layout, video)
    "timm": (lambda: timm_reference(False), _state_dict, "timm", False),
    "timm-cls": (lambda: timm_reference(True), _state_dict, "timm", False),
    "facebookresearch-mvit": (lambda: timm_reference(False), fb_mvit_checkpoint, "mvit", False),
    "torchvision-v2": (lambda: tv_reference(True), _state_dict, "torchvision", True),
    "torchvision-v1": (lambda: tv_reference(False), _state_dict, "torchvision", True),
    "slowfast-v2": (lambda: tv_reference(True), slowfast_checkpoint, "slowfast", True),
    "slowfast-v1": (lambda: tv_reference(False), slowfast_checkpoint, "slowfast", True),
    "slowfast-v1-separate-qkv": (lambda: tv_reference(False), lambda m: _split_qkv(slowfast_checkpoint(m)),
                                 "slowfast", True),
    "pytorchvideo": (lambda: pv_reference(), pv_checkpoint, "pytorchvideo", True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_layout_converts_to_the_reference_function(case: str) -> None:
    build, make_checkpoint, layout, video = CASES[case]
    ref, arch, kw = build()
    checkpoint = make_checkpoint(ref)
    assert detect_layout(unwrap_checkpoint(checkpoint)) == layout
    model = mvit_zoo.create_model(arch, **kw)
    sd = convert_state_dict(checkpoint, model)
    assert sd.report.layout == layout and not (sd.report.missing or sd.report.unexpected or sd.report.resized)
    assert sd.report.architecture == []  # built as the reference: nothing to warn about
    model.load_state_dict(sd)  # strict
    assert max_diff(ref, model, video_input() if video else image_input()) < TOL


def test_fabricated_facebookresearch_layout_is_what_timm_reads() -> None:
    """timm's own mvitv2 checkpoint_filter_fn maps our facebookresearch/mvit file back to timm's keys."""
    from timm.models.mvitv2 import checkpoint_filter_fn

    ref, _, _ = timm_reference()
    back = checkpoint_filter_fn(fb_mvit_checkpoint(ref), ref)
    assert back.keys() == ref.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ref.state_dict().items())


@pytest.mark.parametrize("case", ["pytorchvideo", "slowfast-v2", "torchvision-v1"])
def test_convert_save_load_is_lossless(case: str, tmp_path: Path) -> None:
    build, make_checkpoint, _, _ = CASES[case]
    ref, arch, kw = build()
    model = mvit_zoo.create_model(arch, **kw)
    first = convert_state_dict(make_checkpoint(ref), model)
    path = save_safetensors(first, tmp_path / "model.safetensors")
    again = convert_state_dict(read_checkpoint(path), model)
    assert again.report.layout == "mvit-zoo"
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert all(first[k].dtype == again[k].dtype for k in first)
    native, _ = to_native(make_checkpoint(ref), model)  # the renaming step alone keeps every value
    assert all(torch.equal(native[k], first[k]) for k in native)


def test_wrappers_and_prefixes() -> None:
    ref, arch, kw = timm_reference()
    sd = ref.state_dict()
    model = mvit_zoo.create_model(arch, **kw)
    expected = convert_state_dict(sd, model)
    variants = [
        {"state_dict": sd},
        {"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3},
        {"model_state": {k.replace("stages.0.", "stages.0._checkpoint_wrapped_module."): v for k, v in sd.items()}},
    ]
    for checkpoint in variants:
        got = convert_state_dict(checkpoint, model)
        assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_load_time_resizing_matches_run_time_resizing() -> None:
    """A checkpoint loaded into a model built for another size (tables and embeddings interpolated at
    load) computes what the model built at the checkpoint's size computes on that input (interpolated
    at run time): relative-position tables (MViTv2) and absolute position embeddings (MViT v1)."""
    for build, size, x in [(lambda: timm_reference(), 64, torch.randn(1, 3, 64, 64)),
                           (lambda: tv_reference(False), (8, 64, 64), torch.randn(1, 3, 8, 64, 64)),
                           (lambda: tv_reference(True), (8, 64, 64), torch.randn(1, 3, 8, 64, 64))]:
        ref, arch, kw = build()
        at_ckpt = mvit_zoo.create_model(arch, **kw)
        at_ckpt.load_state_dict(convert_state_dict(ref.state_dict(), at_ckpt))
        resized = mvit_zoo.create_model(arch, **{**kw, "img_size": size})
        sd = convert_state_dict(ref.state_dict(), resized)
        assert sd.report.resized and all(re.search(r"rel_pos|pos_embed", k) for k in sd.report.resized)
        resized.load_state_dict(sd)
        assert max_diff(at_ckpt, resized, x) < TOL, arch


def test_image_to_video_inflation() -> None:
    ref, _, _ = timm_reference()
    kw = dict(depths=(1, 1, 1, 1), embed_dim=16, num_heads=1, img_size=(4, 32, 32), num_classes=10)
    video = mvit_zoo.create_model("mvit_v2_s_16x4", **kw)
    sd = inflate_image_to_video(ref.state_dict(), video)  # 'mean', as PySlowFast's inflate_weight
    report = sd.report
    assert "patch_embed.proj.weight" in report.inflated and "stages.0.blocks.0.attn.pool_q.weight" in report.inflated
    assert {"stages.0.blocks.0.attn.rel_pos_t", "stages.3.blocks.0.attn.rel_pos_t"} <= set(report.initialized)
    assert report.resized  # the video model pools K/V harder: shorter rel-pos tables
    assert report.missing == [] and report.fresh == ["cls_token"]  # timm's tiny has none; the video model keeps its own
    kernel_2d = ref.state_dict()["patch_embed.proj.weight"]
    assert sd["patch_embed.proj.weight"].shape == (16, 3, 3, 7, 7)
    torch.testing.assert_close(sd["patch_embed.proj.weight"].sum(2), kernel_2d)
    assert torch.count_nonzero(sd["stages.0.blocks.0.attn.rel_pos_t"]) == 0
    video.load_state_dict(sd, strict=False)

    centre = inflate_image_to_video(ref.state_dict(), video, inflate="center")["patch_embed.proj.weight"]
    assert torch.equal(centre[:, :, 1], kernel_2d) and torch.count_nonzero(centre[:, :, [0, 2]]) == 0
    with pytest.raises(CheckpointMismatchError, match="needs an image"):
        inflate_image_to_video(video.state_dict(), video)
    with pytest.raises(ValueError, match="needs a video model"):
        inflate_image_to_video(ref.state_dict(), mvit_zoo.create_model("mvit_tiny", depths=(1, 1, 1, 1), embed_dim=16))


def test_other_input_channels_adapt_the_stem() -> None:
    ref, arch, kw = timm_reference()
    model = mvit_zoo.create_model(arch, **{**kw, "in_chans": 1})
    sd = convert_state_dict(ref.state_dict(), model)
    assert sd.report.adapted == ["patch_embed.proj.weight"]
    torch.testing.assert_close(sd["patch_embed.proj.weight"], ref.state_dict()["patch_embed.proj.weight"].sum(1,
                                                                                                           keepdim=True))


def test_classifier_policies() -> None:
    ref, arch, kw = timm_reference()
    other = mvit_zoo.create_model(arch, **{**kw, "num_classes": 5})
    sd = convert_state_dict(ref.state_dict(), other)  # 'auto': another class count, head left out
    assert sd.report.dropped == ["head.fc.weight", "head.fc.bias"] and sorted(sd.report.fresh) == [
        "head.fc.bias", "head.fc.weight"]
    with pytest.raises(CheckpointMismatchError, match=r"head\.fc\.weight: checkpoint \(10, 128\) vs model \(5, 128\)"):
        convert_state_dict(ref.state_dict(), other, head="strict")
    headless = mvit_zoo.create_model(arch, **{**kw, "num_classes": 0})
    assert not any(k.startswith("head") for k in convert_state_dict(ref.state_dict(), headless))
    no_head = {k: v for k, v in ref.state_dict().items() if not k.startswith("head")}
    model = mvit_zoo.create_model(arch, **kw)
    assert sorted(convert_state_dict(no_head, model).report.fresh) == ["head.fc.bias", "head.fc.weight"]
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(2\): head\.fc\.weight, head\.fc\.bias"):
        convert_state_dict(no_head, model, head="strict")


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------

def test_unusable_checkpoints() -> None:
    model = mvit_zoo.create_model("mvit_tiny", depths=(1, 1, 1, 1), embed_dim=16, num_classes=10)
    with pytest.raises(CheckpointMismatchError, match=r"unrecognised checkpoint layout \(first keys: conv1\.weight"):
        convert_state_dict({"conv1.weight": torch.zeros(1), "fc.weight": torch.zeros(1)}, model)
    with pytest.raises(CheckpointMismatchError, match=r"holds no tensors \(found: epoch, cfg\)"):
        convert_state_dict({"epoch": 1, "cfg": "x"}, model)
    ref, _, _ = tv_reference(False)
    checkpoint = _split_qkv(slowfast_checkpoint(ref))
    del checkpoint["model_state"]["blocks.0.attn.v.weight"]
    video = mvit_zoo.create_model("mvit_b_16x4", depths=(1, 2, 1, 1), embed_dim=16, img_size=(4, 32, 32))
    with pytest.raises(CheckpointMismatchError, match=r"stages\.0\.blocks\.0\.attn\.qkv\.weight: .* only \['k', 'q'\]"):
        convert_state_dict(checkpoint, video)


def test_video_checkpoint_into_image_model() -> None:
    ref, _, _ = tv_reference(True)
    image = mvit_zoo.create_model("mvit_tiny", depths=(1, 2, 1, 1), embed_dim=16, num_classes=3)
    with pytest.raises(CheckpointMismatchError) as info:
        convert_state_dict(ref.state_dict(), image)
    assert "patch_embed.proj.weight: checkpoint (16, 3, 3, 7, 7) vs model (16, 3, 7, 7)" in str(info.value)
    assert "this is a video checkpoint and the model is an image model" in str(info.value)
    ref, _, _ = tv_reference(False)
    v1_image = mvit_zoo.create_model("mvit_v1_b_16", depths=(1, 2, 1, 1), embed_dim=16, num_classes=3)
    with pytest.raises(CheckpointMismatchError, match=r"pos_embed_temporal: \(1, 2, 16\) covers 2 frames; this is a "
                                                      r"video checkpoint"):
        convert_state_dict(ref.state_dict(), v1_image)


def test_wrong_architecture_names_the_right_one() -> None:
    """Full-size structures on the meta device: a mvit_small checkpoint for mvit_tiny."""
    with torch.device("meta"):
        small = mvit_zoo.create_model("mvit_small")
        tiny = mvit_zoo.create_model("mvit_tiny")
    assert matching_architectures(small.state_dict()) == ["mvit_small"]
    with pytest.raises(CheckpointMismatchError) as info:
        convert_state_dict(small.state_dict(), tiny)
    message = str(info.value)
    assert "does not fit mvit_tiny" in message and "unexpected keys (138): stages.2.blocks.5." in message
    assert "The checkpoint is for mvit_small; create that architecture instead" in message
    assert describe_checkpoint(small.state_dict()) == ("timm layout; image, depths (1, 2, 11, 2), width 96; "
                                                       "1000 classes; fits mvit_small")


def test_describe_flat_layouts() -> None:
    ref, _, _ = pv_reference()
    assert describe_checkpoint(pv_checkpoint(ref)) == (
        "pytorchvideo layout; video, depths (1, 2, 1, 1), width 16; 3 classes; fits no registered architecture")
    assert convert.matching_architectures({"epoch": 1}) == []


# --------------------------------------------------------------------------------------------------
# Architecture fields a layout implies
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case, field, wrong, fix", [
    # pytorchvideo's pooling norms use eps 1e-5; the plain architecture has 1e-6
    ("pytorchvideo", "pool_norm_eps", {}, "'mvit_b_16x4.pv_k400'"),
    # PySlowFast's (and torchvision's) residual pooling skips the class token
    ("slowfast-v2", "residual_pool_cls", {"residual_pool_cls": True},
     "create 'mvit_v2_s_16x4' without overriding residual_pool_cls"),
])
def test_layout_implied_architecture_warns_with_a_fix_that_works(case: str, field: str, wrong: dict,
                                                                  fix: str) -> None:
    build, make_checkpoint, layout, _ = CASES[case]
    ref, arch, kw = build()
    kw = {k: v for k, v in kw.items() if k != "pool_norm_eps"}
    model = mvit_zoo.create_model(arch, **kw, **wrong)
    with pytest.warns(convert.ArchitectureMismatchWarning) as record:
        sd = convert_state_dict(make_checkpoint(ref), model)
    (message,) = [str(w.message) for w in record]
    assert message.startswith(f"{field}: the {layout} checkpoint implies") and fix in message, message
    assert sd.report.architecture == [message] and field in sd.report.summary()
    model.load_state_dict(sd)  # strict: the keys alone do not show it
    assert max_diff(ref, model, video_input()) > 1e-5

    implied = convert.layout_architecture(to_native(make_checkpoint(ref), model)[0], layout)
    fixed = mvit_zoo.create_model(arch, **{**kw, **wrong, field: implied[field]})
    with warnings.catch_warnings():
        warnings.simplefilter("error", convert.ArchitectureMismatchWarning)
        fixed.load_state_dict(convert_state_dict(make_checkpoint(ref), fixed))
    assert max_diff(ref, fixed, video_input()) < 1e-5
    if case == "pytorchvideo":  # the tag the warning names builds the same
        tagged = mvit_zoo.create_model("mvit_b_16x4.pv_k400", **kw)
        tagged.load_state_dict(convert_state_dict(make_checkpoint(ref), tagged))
        assert max_diff(ref, tagged, video_input()) < 1e-5


def test_checkpoint_img_size_reads_the_tables() -> None:
    for build in (lambda: timm_reference(), lambda: tv_reference(True), lambda: tv_reference(False),
                  lambda: pv_reference()):
        ref, arch, kw = build()
        model = mvit_zoo.create_model(arch, **kw)
        native, _ = to_native(ref.state_dict(), model)
        size = kw["img_size"]
        assert convert.checkpoint_img_size(native, model) == ((size, size) if isinstance(size, int) else size), arch


def test_missing_attention_weights_are_reported_by_name() -> None:
    """A stage whose only block lacks its qkv weight: the report names it (the hint code copes)."""
    ref, arch, kw = timm_reference()
    sd = {k: v for k, v in ref.state_dict().items() if k != "stages.3.blocks.0.attn.qkv.weight"}
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(1\): stages\.3\.blocks\.0\.attn\.qkv\.weight"):
        convert_state_dict(sd, mvit_zoo.create_model(arch, **kw))
    del sd["stages.0.blocks.0.attn.qkv.weight"]
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(2\): stages\.0\.blocks\.0\.attn\.qkv\.weight"):
        convert_state_dict(sd, mvit_zoo.create_model(arch, **kw))
    assert matching_architectures(sd) == []


def test_class_token_mismatch_says_which_model_to_build() -> None:
    ref, arch, kw = timm_reference(cls_token=True)
    model = mvit_zoo.create_model(arch, **kw, use_cls_token=False)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys \(1\): cls_token; also use_cls_token: the timm "
                                                      r"checkpoint implies True, the model has False; create "
                                                      r"'mvit_small_cls' without overriding use_cls_token"):
        convert_state_dict(ref.state_dict(), model)
