"""mvit_zoo.evaluation (`mvit_zoo.evaluate`): loaders, class folders, multi-view score averaging, labels, bad input."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import mvit_zoo
from mvit_zoo.data.video import write_video
from mvit_zoo.data.reader import read_frames
from mvit_zoo.evaluation import (
    label_set_names,
    match_classes,
    video_scores,
    view_sampling,
)

TINY_3D = {"depths": (1, 1, 1, 1), "embed_dim": 16, "num_heads": 1, "img_size": (4, 32, 32)}
pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_video_model(name: str = "mvit_v2_s_16x4") -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **TINY_3D).eval()


def write_clips(root: Path, classes: dict[str, int], frames: int = 24) -> None:
    rng = np.random.default_rng(0)
    for name, n in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            write_video(root / name / f"{i}.mp4", rng.integers(0, 256, (frames, 40, 56, 3), dtype=np.uint8), fps=30)


def test_loader_counts_match_a_direct_computation() -> None:
    model = torch.nn.Linear(6, 4)
    model.num_classes = 4
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(5, 6, generator=g), torch.randint(0, 4, (5,), generator=g)) for _ in range(3)]
    result = mvit_zoo.evaluate(model, batches)
    with torch.no_grad():
        logits = torch.cat([model(x) for x, _ in batches])
    target = torch.cat([y for _, y in batches])
    assert result.count == 15
    assert result.top1 == pytest.approx(100 * float((logits.argmax(-1) == target).float().mean()))
    top4 = logits.topk(4, -1).indices.eq(target[:, None]).any(1)
    # 4 classes: top-k is top-4 (a top-5 would be 100% by construction), and is named so
    assert result.k == 4 and result.topk == pytest.approx(100 * float(top4.float().mean())) == 100.0
    assert set(result.metrics()) == {"loss", "top1", "top4"} and "top5" not in result.to_dict()
    assert result.loss == pytest.approx(float(torch.nn.functional.cross_entropy(logits, target)), rel=1e-6)
    reduced = mvit_zoo.evaluate(model, batches, all_reduce=lambda t: 2 * t)  # as if two processes
    assert reduced.count == 30 and reduced.top1 == pytest.approx(result.top1)


def test_multi_view_scores_are_averaged_softmax(tmp_path: Path) -> None:
    write_clips(tmp_path, {"abseiling": 1})
    model = tiny_video_model()
    result = mvit_zoo.evaluate(model, tmp_path, views="3x3", batch_size=4)
    sampling = view_sampling(model, "3x3")
    path = tmp_path / "abseiling" / "0.mp4"
    clips = sampling.clip_indices(24, 30.0)
    frames, rows = read_frames(path, [i for c in clips for i in c])
    views = torch.stack(list(sampling.iter_views(frames, [rows[4 * t:4 * t + 4] for t in range(3)])))
    with torch.no_grad():
        probs = model(views).softmax(-1).mean(0)
    assert result.count == 1 and str(result.views) == "3x3"
    assert result.loss == pytest.approx(float(-probs[0].log()), rel=1e-4)
    assert result.top1 == (100.0 if probs.argmax() == 0 else 0.0)
    torch.testing.assert_close(video_scores(model, path, "3x3", batch_size=4), probs, rtol=1e-5, atol=1e-6)


def test_default_views_come_from_the_tag() -> None:
    assert str(view_sampling(tiny_video_model()).views) == "5x1"  # fb_k400
    s = view_sampling(tiny_video_model("mvit_v2_s_16x4.fb_ssv2"))
    assert str(s.views) == "1x3" and s.frame_sampling == "segment"
    # BGR-order ImageNet stats
    assert view_sampling(tiny_video_model("mvit_v2_l_40x3.fb_ssv2")).mean == pytest.approx((0.406, 0.456, 0.485))


def test_match_classes() -> None:
    kinetics = label_set_names("kinetics-400")
    assert match_classes(["air_drumming", "Abseiling"], 400, None, "kinetics-400", kinetics)[0] == [1, 0]
    imagenet = label_set_names("imagenet-1k")
    idx, how = match_classes(["n01443537", "tench", "tabby, tabby cat"], 1000, None, "imagenet-1k", imagenet)
    assert idx == [1, 0, 281] and how == "label set imagenet-1k"
    assert match_classes(["b", "a"], 2, ["a", "b"]) == ([1, 0], "checkpoint class list")
    assert match_classes(["3", "0"], 5) == ([3, 0], "class index")
    with pytest.raises(ValueError, match="'zzz' is not a class of the model's label set kinetics-400"):
        match_classes(["abseiling", "zzz", "yyy"], 400, None, "kinetics-400", kinetics)
    with pytest.raises(ValueError, match="'c' is not one of the model's 2 classes"):
        match_classes(["a", "c"], 2, ["a", "b"])
    with pytest.raises(ValueError, match="'cat': the model has no class names"):
        match_classes(["0", "cat"], 5)


def test_api_errors_name_the_api_arguments(tmp_path: Path) -> None:
    """Python callers are told about `class_names=` and `batch_size`, not command-line flags."""
    kinetics = label_set_names("kinetics-400")
    for call in (lambda: match_classes(["0", "cat"], 5),
                 lambda: match_classes(["abseiling", "zzz"], 400, None, "kinetics-400", kinetics)):
        with pytest.raises(ValueError, match="class_names=") as info:
            call()
        assert "--" not in str(info.value)
    write_clips(tmp_path, {"abseiling": 1}, frames=4)
    model = tiny_video_model()
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"batch_size must be an integer of at least 1 .*got {bad}"):
            video_scores(model, tmp_path / "abseiling" / "0.mp4", "1x1", batch_size=bad)
        with pytest.raises(ValueError, match="batch_size must be"):
            mvit_zoo.evaluate(model, tmp_path, batch_size=bad)


def test_local_dir_model_carries_its_class_names(tmp_path: Path) -> None:
    """A fine-tuned folder loaded with timm's 'local-dir:' scores its class folders with no class_names=,
    and reports neither the label set nor the names of the weights it was fine-tuned from."""
    from mvit_zoo.data.config import config_for_model, write_config

    torch.manual_seed(0)
    kwargs = {"depths": (1, 1, 1, 1), "embed_dim": 16, "num_heads": 1, "img_size": 32, "num_classes": 2}
    model = timm.create_model("mvit_tiny", **kwargs)
    run = tmp_path / "run"
    run.mkdir()
    from safetensors.torch import save_file
    save_file(model.state_dict(), str(run / "model.safetensors"))
    write_config(run, config_for_model(model, model_args=kwargs, pretrained_cfg=dict(model.pretrained_cfg),
                                       data_config={}, label_names=["dogs", "cats"]))
    data = tmp_path / "data"
    for name in ("cats", "dogs"):
        (data / name).mkdir(parents=True)
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(data / name / "a.png")
    loaded = timm.create_model(f"local-dir:{run}", pretrained=True)
    result = mvit_zoo.evaluate(loaded, data)
    assert result.info["matched_by"] == "checkpoint class list" and result.class_names == ["dogs", "cats"]
    assert result.info["label_set"] is None and result.k == 2 and "top2" in result.to_dict()


def test_unreadable_files_are_counted_and_empty_class_folders_allowed(tmp_path: Path) -> None:
    for name in ("0", "1", "2"):
        (tmp_path / "val" / name).mkdir(parents=True)
    for name in ("0", "1"):
        Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "val" / name / "a.png")
    (tmp_path / "val" / "1" / "broken.png").write_bytes(b"not a png")
    model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    result = mvit_zoo.evaluate(model, tmp_path)  # DIR/val/ is used
    assert result.count == 2 and result.info["classes"] == 3 and result.info["format"] == "folders"
    assert result.info["matched_by"] == "class index"
    assert [Path(p).name for p, _ in result.skipped] == ["broken.png"]


def test_empty_tree_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    for data in (tmp_path, tmp_path / "a"):  # an empty class folder; no class folder at all
        with pytest.raises(ValueError, match=r"no files with the extensions \.jpg, .* in the class folders of"):
            mvit_zoo.evaluate(timm.create_model("resnet18", pretrained=False), data)


def test_video_shorter_than_a_clip_is_scored_and_counted(tmp_path: Path) -> None:
    write_clips(tmp_path, {"abseiling": 1}, frames=6)  # a 4x4 clip spans 16 frames
    (tmp_path / "abseiling" / "empty.mp4").write_bytes(b"")
    result = mvit_zoo.evaluate(tiny_video_model(), tmp_path, views="2x1")
    assert result.count == 1 and result.short == 1 and len(result.skipped) == 1


def test_image_model_rejects_multi_views(tmp_path: Path) -> None:
    (tmp_path / "0").mkdir()
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "0" / "a.png")
    with pytest.raises(ValueError, match="one centre crop"):
        mvit_zoo.evaluate(timm.create_model("resnet18", pretrained=False), tmp_path, views="3x1")


def test_every_tag_has_test_views_and_a_label_set() -> None:
    """Video tags carry their published views; a shipped label list has as many names as the head."""
    from mvit_zoo.model.registry import default_cfgs

    unavailable = {"kinetics-600", "imagenet-21k-winter"}  # no list on PyPI: these heads report indices
    for arch, entry in default_cfgs.items():
        for tag, cfg in entry.cfgs.items():
            if not tag or not cfg.num_classes:  # untagged, or backbone-only weights (no head, no classes)
                continue
            assert cfg.label_set, f"{arch}.{tag}"
            names = label_set_names(cfg.label_set)
            assert (names is None and cfg.label_set in unavailable) or len(names) == cfg.num_classes, f"{arch}.{tag}"
            if cfg.num_frames:
                assert cfg.test_views and cfg.frame_sampling in ("stride", "segment"), f"{arch}.{tag}"
