"""`mvit_zoo.data.config`: the one config.json schema, written by finetune and convert/publish and read by
predict and convert, validated with errors that name the field; files of the earlier writers still read."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

import mvit_zoo
from mvit_zoo.apps.classify import load_model
from mvit_zoo.apps.run_folder import model_config, save_weights
from mvit_zoo.data.config import ConfigError, ModelConfig, find_config, read_config, write_config
from mvit_zoo.data.transforms import resolve_data_config
from mvit_zoo.weights import publish

pytestmark = pytest.mark.usefixtures("single_thread")
SMALL_3D = {"depths": (1, 1, 1, 1), "embed_dim": 16, "num_heads": 1, "img_size": (4, 32, 32)}
LABELS = ["pull", "push", "spin"]


def _finetuned_ssv2(folder: Path) -> torch.nn.Module:
    """A folder as `mvit-zoo finetune` leaves it, fine-tuned from the SSv2 tag (segment sampling)."""
    model = mvit_zoo.create_model("mvit_v2_s_16x4.fb_ssv2", num_classes=3, **SMALL_3D).eval()
    config = model_config(model, "mvit_v2_s_16x4.fb_ssv2", LABELS, {**SMALL_3D, "num_classes": 3},
                                   resolve_data_config(model))
    write_config(folder, config)
    save_weights(folder / "model.safetensors", model, 10)
    return model


def test_finetuned_ssv2_keeps_frame_sampling_through_convert_and_predict(tmp_path: Path) -> None:
    model = _finetuned_ssv2(tmp_path / "run")
    run = read_config(tmp_path / "run")
    assert run.frame_sampling == "segment" and run.label_names == tuple(LABELS) and run.tag == "mvit_v2_s_16x4.fb_ssv2"
    assert "top1" not in run.data_config and "label_set" not in run.data_config  # not the tag's weights

    folder, report = publish.convert_checkpoint(str(tmp_path / "run"), "mvit_v2_s_16x4", tmp_path / "hub")
    assert not report.resized
    converted = read_config(folder)
    assert converted.frame_sampling == "segment" and converted.label_names == tuple(LABELS)
    assert converted.model_args["img_size"] == [4, 32, 32] and converted.num_frames == 4
    assert converted.mean == run.mean and converted.pretrained_cfg["crop_pct"] == run.pretrained_cfg["crop_pct"]
    card = (folder / "README.md").read_text()
    assert "segment sampling" in card and "fine-tuned from mvit_v2_s_16x4.fb_ssv2" in card
    # its own 3 classes, not the 174 of the SSv2 set it was fine-tuned from
    assert "label_set" not in converted.data_config and "Something-Something" not in card.split("Classes:**")[1]

    loaded, labels, data_cfg = load_model(None, str(folder))  # predict reads it through the same schema
    assert labels == LABELS and data_cfg.input_size == (3, 4, 32, 32)
    x = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_round_trip_and_validation(tmp_path: Path) -> None:
    cfg = ModelConfig(architecture="mvit_tiny", num_classes=2, model_args={"img_size": [32, 32], "num_classes": 2},
                      pretrained_cfg={"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3},
                      data_config={"channel_order": "BGR"}, label_names=("a", "b"), source={"layout": "timm"})
    assert read_config(write_config(tmp_path, cfg)) == cfg
    assert cfg.channel_order == "BGR" and cfg.frame_sampling == "stride"
    assert not list(tmp_path.glob(".*.part"))
    assert find_config(tmp_path / "model.safetensors") == cfg and find_config(tmp_path / "elsewhere" / "x") is None

    bad = [
        ("{not json", r"not valid JSON"),
        (json.dumps(["x"]), r"expected a JSON object, got list"),
        (json.dumps({"num_classes": 2}), r"no 'architecture'"),
        (json.dumps({"architecture": "mvit_tiny.fb_in1k", "num_classes": 2}), r"architecture must be .* without tag"),
        (json.dumps({"architecture": "mvit_tiny", "num_classes": "2"}), r"num_classes must be an integer"),
        (json.dumps({"architecture": "mvit_tiny", "num_classes": 2, "label_names": ["a"]}),
         r"label_names must be 2 strings \(one per class\), got 1"),
        (json.dumps({"architecture": "mvit_tiny", "num_classes": 2, "data_config": {"frame_sampling": "random"}}),
         r"data_config\.frame_sampling must be one of \('stride', 'segment'\), got 'random'"),
        (json.dumps({"architecture": "mvit_tiny", "num_classes": 2, "pretrained_cfg": {"input_size": [32, 32]}}),
         r"pretrained_cfg\.input_size must be \[C, H, W\]"),
        (json.dumps({"architecture": "mvit_tiny", "num_classes": 2, "model_args": [1]}),
         r"model_args must be an object"),
        (json.dumps({"architecture": "mvit_tiny", "num_classes": 2, "model_args": {"embed_dim": 0}}),
         r"model_args: embed_dim must be a number or list of numbers >= 1, got 0"),
        (json.dumps({"architecture": "mvit_tiny", "num_classes": 2, "model_args": {"img_size": [32, -32]}}),
         r"model_args: img_size must be .* >= 1, got \[32, -32\]"),
        (json.dumps({"architecture": "mvit_tiny", "num_classes": 2, "model_args": {"depths": [1, 0, 1, 1]}}),
         r"model_args: depths must be"),
        (json.dumps({"architecture": "mvit_tiny", "num_classes": 2, "pretrained_cfg": {"mean": [0.5, 0.5]}}),
         r"pretrained_cfg\.mean must be a list of 3 numbers \(one per input channel\), got \[0\.5, 0\.5\]"),
        (json.dumps({"architecture": "mvit_tiny", "num_classes": 2, "pretrained_cfg": {"std": [0.5, 0, 0.5]}}),
         r"pretrained_cfg\.std must be above 0"),
        (json.dumps({"architecture": "mvit_tiny", "num_classes": 2, "pretrained_cfg": {"interpolation": "cubic"}}),
         r"pretrained_cfg\.interpolation must be one of bilinear, bicubic, nearest, box, hamming, lanczos, "
         r"got 'cubic'"),
        (json.dumps({"architecture": "mvit_v2_s_16x4", "num_classes": 2, "data_config": {"num_frames": 4},
                     "pretrained_cfg": {"interpolation": "lanczos"}}),
         r"pretrained_cfg\.interpolation must be one of bilinear, bicubic, nearest, got 'lanczos'"),
        (json.dumps({"architecture": "mvit_tiny", "num_classes": 2, "pretrained_cfg": {"crop_pct": 0}}),
         r"pretrained_cfg\.crop_pct must be a number in \(0, 1\]"),
    ]
    for text, message in bad:
        (tmp_path / "config.json").write_text(text)
        with pytest.raises(ConfigError, match=message) as info:
            read_config(tmp_path)
        assert str(tmp_path / "config.json") in str(info.value)


def test_reads_the_files_earlier_writers_produced(tmp_path: Path) -> None:
    """The keys `mvit-zoo finetune` and `mvit-zoo convert` wrote before the schema had `source`."""
    finetuned = {"architecture": "mvit_v2_s_16x4", "num_classes": 2, "num_features": 128, "global_pool": "token",
                 "label_names": ["a", "b"], "model_args": {"img_size": [8, 32, 32], "num_classes": 2},
                 "pretrained_cfg": {"input_size": [3, 32, 32], "mean": [0.45] * 3, "std": [0.225] * 3,
                                    "crop_pct": 0.875, "interpolation": "bilinear", "num_classes": 2},
                 "data_config": {"num_frames": 8, "sampling_rate": 2, "channel_order": "RGB"}}
    converted = {"architecture": "mvit_b_16x4", "num_classes": 400, "num_features": 768, "global_pool": "token",
                 "model_args": {"pool_norm_eps": 1e-5, "num_classes": 400},
                 "pretrained_cfg": {"input_size": [3, 224, 224], "license": "apache-2.0", "num_classes": 400},
                 "data_config": {"num_frames": 16, "sampling_rate": 4, "frame_sampling": "stride", "label_set":
                                 "kinetics-400", "top1": 78.85, "test_views": [5, 1]}}
    for old in (finetuned, converted):
        (tmp_path / "config.json").write_text(json.dumps(old))
        cfg = read_config(tmp_path)
        assert cfg.to_dict() == old and cfg.source == {}
    assert read_config(tmp_path).sampling_rate == 4 and read_config(tmp_path).frame_sampling == "stride"


def test_a_label_set_of_another_class_count_is_left_out() -> None:
    """A head fine-tuned from a tag does not inherit the tag's label set into its config.json."""
    from mvit_zoo.data.config import config_for_model

    def label_set(num_classes: int, label_set: str) -> object:
        model = mvit_zoo.create_model("mvit_v2_s_16x4", num_classes=num_classes, **SMALL_3D)
        config = config_for_model(model, model_args={}, pretrained_cfg={}, data_config={"label_set": label_set})
        return config.data_config.get("label_set")

    assert label_set(10, "kinetics-400") is None and label_set(2, "imagenet-1k") is None
    assert label_set(400, "kinetics-400") == "kinetics-400" and label_set(174, "ssv2") == "ssv2"


def test_finetune_writes_through_the_schema(tmp_path: Path) -> None:
    _finetuned_ssv2(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["data_config"] == {"num_frames": 4, "channel_order": "RGB", "frame_sampling": "segment",
                                      "sampling_rate": 1}
    assert written["source"]["description"] == "fine-tuned from mvit_v2_s_16x4.fb_ssv2 with mvit-zoo finetune"
    assert safetensors.torch.load_file(str(tmp_path / "model.safetensors"))
