"""`mvit-zoo validate`: agrees with finetune's own validation, multi-view video, any timm model, bad input."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mvit_zoo.apps import cli, finetune
from mvit_zoo.data.video import write_video

SMALL_2D = {"depths": [1, 1, 1, 1], "embed_dim": 16, "num_heads": 1, "img_size": 32}
SMALL_3D = {"depths": [1, 1, 1, 1], "embed_dim": 16, "num_heads": 1, "img_size": [4, 32, 32]}
pytestmark = pytest.mark.usefixtures("single_thread")


def write_digits(root: Path, per_class: int = 20) -> None:
    """scikit-learn's 8x8 digits upscaled to 32x32 PNGs in train/ and val/ class folders (every 5th in val)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for c in range(10):
        for n, i in enumerate(np.flatnonzero(digits.target == c)[:per_class]):
            folder = root / ("val" if n % 5 == 0 else "train") / str(c)
            folder.mkdir(parents=True, exist_ok=True)
            img = Image.fromarray((digits.images[i] * (255 / 16)).astype(np.uint8))
            img.resize((32, 32), Image.BILINEAR).save(folder / f"{i:04d}.png")


def validate(*args: str) -> int:
    return cli.main(["validate", "--no-progress", *args])


def test_validate_reproduces_finetune_top1(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data, run = tmp_path / "digits", tmp_path / "run"
    write_digits(data)
    assert finetune.main(["--model", "mvit_tiny", "--no-pretrained", "--model-kwargs", json.dumps(SMALL_2D),
                          "--data", str(data), "--output", str(run), "--no-progress", "--epochs", "2",
                          "--batch-size", "32", "--lr", "3e-3", "--warmup-epochs", "0.5", "--hflip", "0"]) == 0
    reported = json.loads((run / "metrics.json").read_text())[-1]
    assert validate("--checkpoint", str(run), "--data", str(data), "--results-file", str(tmp_path / "r.json"),
                    "--per-class", "--confusion", str(tmp_path / "c.csv")) == 0
    row = json.loads((tmp_path / "r.json").read_text())
    assert row["top1"] == pytest.approx(reported["val_top1"]) and row["top5"] == pytest.approx(reported["val_top5"])
    assert row["loss"] == pytest.approx(reported["val_loss"], rel=1e-4)
    assert row["matched_by"] == "checkpoint class list" and row["count"] == 40
    assert [c["label"] for c in row["per_class"]] == [str(c) for c in range(10)]
    matrix = list(csv.reader((tmp_path / "c.csv").open()))
    assert matrix[0][1:11] == [str(c) for c in range(10)]
    assert sum(int(v) for r in matrix[1:] for v in r[1:]) == 40
    assert sum(int(matrix[1 + c][1 + c]) for c in range(10)) == round(row["top1"] * 40 / 100)
    assert f"{row['top1']:.3f}" in capsys.readouterr().out


def write_two_class_videos(root: Path) -> None:
    rng = np.random.default_rng(0)
    for name, level in (("abseiling", 40), ("air_drumming", 200)):
        (root / name).mkdir(parents=True)
        for i in range(2):
            frames = np.clip(rng.normal(level, 20, (24, 36, 48, 3)), 0, 255).astype(np.uint8)
            write_video(root / name / f"{i}.mp4", frames, fps=30)


@pytest.mark.parametrize("views", ["1x1", "3x3"])
def test_validate_video_folder_with_views(tmp_path: Path, views: str, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "clips"
    write_two_class_videos(data)
    out = tmp_path / "r.csv"
    assert validate("--model", "mvit_v2_s_16x4", "--no-pretrained", "--model-kwargs", json.dumps(SMALL_3D),
                    "--data", str(data), "--views", views, "--batch-size", "4", "--results-file", str(out)) == 0
    (row,) = list(csv.DictReader(out.open()))
    assert row["views"] == views and row["count"] == "4" and row["matched_by"] == "label set kinetics-400"
    assert 0.0 <= float(row["top1"]) <= 100.0
    assert json.loads(row["preprocessing"])["views"] == views
    printed = capsys.readouterr().out
    assert f"views         {views}" in printed and f"top-1         {float(row['top1']):.3f}" in printed


def test_validate_any_timm_model_on_imagenet_names(tmp_path: Path) -> None:
    for name in ("n01440764", "goldfish"):  # a synset and a name
        (tmp_path / name).mkdir()
        Image.fromarray(np.full((40, 50, 3), 128, np.uint8)).save(tmp_path / name / "a.jpg")
    out = tmp_path / "r.json"
    assert validate("--model", "resnet18", "--no-pretrained", "--data", str(tmp_path), "--results-file", str(out)) == 0
    row = json.loads(out.read_text())
    assert row["count"] == 2 and row["matched_by"] == "label set imagenet-1k" and row["views"] == "1x1"


def test_validate_unknown_folder_names_the_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for name in ("tench", "not_a_class", "zebra_crossing"):
        (tmp_path / name).mkdir()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / name / "a.png")
    assert validate("--model", "resnet18", "--no-pretrained", "--data", str(tmp_path)) == 2
    assert "class folder 'not_a_class' is not a class" in capsys.readouterr().err


def test_predict_views_prints_the_averaged_top5(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import torch

    from mvit_zoo.apps.classify import load_model
    from mvit_zoo.evaluation import video_scores

    write_two_class_videos(tmp_path)
    path = tmp_path / "abseiling" / "0.mp4"
    common = ["--model", "mvit_v2_s_16x4", "--no-pretrained", "--model-kwargs", json.dumps(SMALL_3D)]
    torch.manual_seed(0)
    assert cli.main(["predict", str(path), *common, "--views", "3x3", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)["top"]
    torch.manual_seed(0)
    model, _, data_cfg = load_model("mvit_v2_s_16x4", None, False, SMALL_3D)
    probs = video_scores(model, path, "3x3", data_cfg=data_cfg)
    assert [t["index"] for t in printed] == probs.topk(5).indices.tolist()
    assert [t["probability"] for t in printed] == pytest.approx(probs.topk(5).values.tolist(), rel=1e-5)


def test_validate_bad_arguments_fail_before_the_model_loads(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert validate("--model", "mvit_base.fb_in1k", "--data", str(tmp_path / "missing")) == 2
    assert "--data" in capsys.readouterr().err
    assert validate("--model", "mvit_base.fb_in1k", "--data", str(tmp_path), "--views", "5x2") == 2
    assert "S = 1 or 3" in capsys.readouterr().err
    assert validate("--model", "mvit_base.fb_in1k", "--data", str(tmp_path), "--results-file", "r.txt") == 2
    assert ".json or .csv" in capsys.readouterr().err


def test_finetuned_two_class_head_reports_top2_and_no_pretraining_label_set(tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture) -> None:
    """A 2-class head: top-k is top-2 (a top-5 is 100% by construction), and the results name no label set
    (not the ImageNet-1k of the weights it was fine-tuned from)."""
    import mvit_zoo
    from mvit_zoo.data.config import config_for_model, write_config

    kwargs = {**SMALL_2D, "num_classes": 2}
    model = mvit_zoo.create_model("mvit_tiny", **kwargs)
    run = tmp_path / "run"
    run.mkdir()
    mvit_zoo.save_safetensors(model.state_dict(), run / "model.safetensors")
    write_config(run, config_for_model(model, model_args=kwargs, pretrained_cfg=dict(model.pretrained_cfg),
                                       data_config={}, label_names=["cats", "dogs"]))
    data = tmp_path / "data"
    for name in ("cats", "dogs"):
        (data / name).mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(data / name / "a.png")
    assert validate("--checkpoint", str(run), "--data", str(data), "--results-file", str(tmp_path / "r.json"),
                    "--per-class") == 0
    row = json.loads((tmp_path / "r.json").read_text())
    assert row["label_set"] is None and "top5" not in row and row["top2"] == 100.0
    out = capsys.readouterr().out
    assert "top-2" in out and "top-5" not in out


@pytest.mark.parametrize("batch_size", ["0", "-3"])
def test_batch_size_must_be_positive(batch_size: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        validate("--model", "mvit_tiny", "--no-pretrained", "--data", str(tmp_path), "--batch-size", batch_size)
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"mvit-zoo validate: error: argument --batch-size: must be at least 1, got {batch_size}")


def validate_row(tmp_path: Path, *args: str) -> dict:
    """`validate` of a small random-init video model (the same weights every call) on 1x1 views: the results row."""
    import torch

    out = tmp_path / "row.json"
    torch.manual_seed(0)
    assert validate("--model", "mvit_v2_s_16x4", "--no-pretrained", "--model-kwargs", json.dumps(SMALL_3D),
                    "--views", "1x1", "--decoder", "pyav", "--results-file", str(out), *args) == 0
    return json.loads(out.read_text())


def test_annotation_files_score_as_the_class_folders(tmp_path: Path) -> None:
    """A path-label CSV (names, and SlowFast's integer labels) and an SSv2-style JSON layout of the same videos
    give the class-folder tree's counts, top-1 and loss."""
    data = tmp_path / "clips"
    write_two_class_videos(data)
    folders = validate_row(tmp_path, "--data", str(data))
    videos = sorted(data.glob("*/*.mp4"))
    named, indexed = tmp_path / "val.csv", tmp_path / "val_idx.csv"
    named.write_text("".join(f"{p.relative_to(data)},{p.parent.name}\n" for p in videos))
    kinetics_index = {"abseiling": 0, "air_drumming": 1}  # their indices in kinetics-400.txt
    indexed.write_text("".join(f"{p.relative_to(data)} {kinetics_index[p.parent.name]}\n" for p in videos))
    ssv2 = tmp_path / "ssv2"
    (ssv2 / "labels").mkdir(parents=True)
    (ssv2 / "videos").mkdir()
    (ssv2 / "labels" / "labels.json").write_text(json.dumps({"abseiling": "0", "air drumming": "1"}))
    entries = []
    for i, p in enumerate(videos):
        (ssv2 / "videos" / f"{100 + i}.mp4").write_bytes(p.read_bytes())
        entries.append({"id": str(100 + i), "label": p.parent.name, "template": p.parent.name.replace("_", " "),
                        "placeholders": []})
    (ssv2 / "labels" / "validation.json").write_text(json.dumps(entries))
    rows = {"list": validate_row(tmp_path, "--data", str(named), "--data-root", str(data)),
            "integer list": validate_row(tmp_path, "--data", str(indexed), "--data-root", str(data)),
            "ssv2": validate_row(tmp_path, "--data", str(ssv2), "--data-root", str(ssv2 / "videos"))}
    for name, row in rows.items():
        assert (row["count"], row["top1"], row["missing"]) == (4, folders["top1"], 0), name
        assert row["loss"] == pytest.approx(folders["loss"], rel=1e-5), name
    assert rows["list"]["matched_by"] == rows["ssv2"]["matched_by"] == "label set kinetics-400"
    assert rows["integer list"]["matched_by"] == "annotation file order" and rows["ssv2"]["format"] == "ssv2"


def test_kinetics_csv_reports_missing_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "clips"
    write_two_class_videos(data)
    flat = tmp_path / "videos"  # as the CVDF archives extract: <youtube_id>_<start>_<end>.mp4, no class folders
    flat.mkdir()
    lines = ["label,youtube_id,time_start,time_end,split"]
    for i, p in enumerate(sorted(data.glob("*/*.mp4"))):
        (flat / f"yt{i:09d}_000010_000020.mp4").write_bytes(p.read_bytes())
        lines.append(f"{p.parent.name.replace('_', ' ')},yt{i:09d},10,20,val")
    lines.append("abseiling,gone0000000,0,10,val")  # listed, never downloaded
    csv_file = tmp_path / "validate.csv"
    csv_file.write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    row = validate_row(tmp_path, "--data", str(csv_file), "--data-root", str(flat))
    assert row["count"] == 4 and row["missing"] == 1 and row["missing_files"] == ["gone0000000_000000_000010.mp4"]
    assert row["format"] == "kinetics" and row["matched_by"] == "label set kinetics-400"
    captured = capsys.readouterr()
    assert f"missing gone0000000_000000_000010.mp4: listed in {csv_file}" in captured.err
    assert "missing       1" in captured.out
