"""The datasets' own annotation files as data sources (`mvit_zoo.data.sources`): each format laid out
as the real datasets ship it, the split discovery of a dataset folder, and the malformed cases."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import pytest

from mvit_zoo.data.folders import IMAGE_EXTENSIONS, scan_data
from mvit_zoo.data.sources import AnnotationError, detect_format, find_eval_split, find_splits, read_annotations

DATA = Path(__file__).resolve().parents[2] / "mvit_zoo" / "data"


def touch(root: Path, names: Iterable[str]) -> None:
    """Empty files standing for videos (reading annotations looks at names only)."""
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).touch()


# -- path-label lists ------------------------------------------------------------------------------

def test_slowfast_list_folder(tmp_path: Path) -> None:
    # SlowFast: DATA.PATH_TO_DATA_DIR holds train.csv / val.csv / test.csv, "path label" split by a space,
    # paths relative to DATA.PATH_PREFIX
    touch(tmp_path / "videos", [f"{c}/{i}.mp4" for c in ("abseiling", "archery") for i in range(3)])
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "train.csv").write_text("abseiling/0.mp4 0\nabseiling/1.mp4 0\narchery/0.mp4 1\n"
                                                  "archery/1.mp4 1\n")
    (tmp_path / "lists" / "val.csv").write_text("abseiling/2.mp4 0\narchery/2.mp4 1\n")
    (tmp_path / "lists" / "test.csv").write_text("abseiling/2.mp4 0\narchery/2.mp4 1\n")
    assert detect_format(tmp_path / "lists") == "list"
    train, val = find_splits(tmp_path / "lists", data_root=tmp_path / "videos")
    assert train.classes == ["0", "1"] and train.format == "list"
    assert train.samples == [(str(tmp_path / "videos" / "abseiling" / f"{i}.mp4"), 0) for i in range(2)] + [
        (str(tmp_path / "videos" / "archery" / f"{i}.mp4"), 1) for i in range(2)]
    assert [t for _, t in val.samples] == [0, 1] and val.source == str(tmp_path / "lists" / "val.csv")
    assert find_eval_split(tmp_path / "lists", data_root=tmp_path / "videos").samples == val.samples


def test_list_matches_pytorchvideo_reader(tmp_path: Path) -> None:
    from pytorchvideo.data.labeled_video_paths import LabeledVideoPaths

    touch(tmp_path, ["a/x 1.mp4", "a/y.mp4", "b/z.mp4"])  # pytorchvideo splits at the last space: spaces in paths
    lines = f"{tmp_path}/a/x 1.mp4 0\n{tmp_path}/a/y.mp4 0\n{tmp_path}/b/z.mp4 1\n"
    (tmp_path / "list.txt").write_text(lines)
    reference = LabeledVideoPaths.from_csv(str(tmp_path / "list.txt"))
    expected = [(path, info["label"]) for path, info in (reference[i] for i in range(len(reference)))]
    assert read_annotations(tmp_path / "list.txt").samples == expected


def test_mmaction2_list_and_separators(tmp_path: Path) -> None:
    # mmaction2's kinetics400_train_list_videos.txt: "path label" with a space, relative to data_prefix
    touch(tmp_path / "videos_train", ["abseiling/a.mp4", "air drumming/b.mp4"])
    (tmp_path / "kinetics400_train_list_videos.txt").write_text("abseiling/a.mp4 0\nair drumming/b.mp4 1\n")
    split = read_annotations(tmp_path / "kinetics400_train_list_videos.txt", data_root=tmp_path / "videos_train")
    assert [t for _, t in split.samples] == [0, 1] and split.missing == []
    # a header, commas, tabs (paths with spaces), class names ordered by a given list
    (tmp_path / "names.csv").write_text("path,label\nabseiling/a.mp4,abseiling\nair drumming/b.mp4 , air drumming\n")
    (tmp_path / "names.tsv").write_text("air drumming/b.mp4\tair drumming\nabseiling/a.mp4\tabseiling\n")
    k400 = (DATA / "kinetics-400.txt").read_text().splitlines()
    for name in ("names.csv", "names.tsv"):
        split = read_annotations(tmp_path / name, data_root=tmp_path / "videos_train", classes=k400)
        assert split.classes == k400 and sorted(t for _, t in split.samples) == [0, 1]
    sorted_names = read_annotations(tmp_path / "names.tsv", data_root=tmp_path / "videos_train")
    assert sorted_names.classes == ["abseiling", "air drumming"]


def test_single_file_held_out_split_is_stratified(tmp_path: Path) -> None:
    touch(tmp_path, [f"{c}/{i}.mp4" for c in range(3) for i in range(10)])
    (tmp_path / "all.txt").write_text("".join(f"{c}/{i}.mp4 {c}\n" for c in range(3) for i in range(10)))
    train, val = find_splits(tmp_path / "all.txt", val_split=0.2, seed=3)
    assert len(train.samples) == 24 and [sum(t == c for _, t in val.samples) for c in range(3)] == [2, 2, 2]
    assert not {p for p, _ in train.samples} & {p for p, _ in val.samples}
    assert find_splits(tmp_path / "all.txt", val_split=0.2, seed=3)[1].samples == val.samples
    assert find_splits(tmp_path / "all.txt", val_split=0.2, seed=4)[1].samples != val.samples


def test_missing_files_are_counted_unless_all_are(tmp_path: Path) -> None:
    touch(tmp_path, ["a.mp4"])
    (tmp_path / "train.txt").write_text("a.mp4 0\ngone.mp4 1\n")
    split = read_annotations(tmp_path / "train.txt")
    assert split.samples == [(str(tmp_path / "a.mp4"), 0)] and split.missing == [str(tmp_path / "gone.mp4")]
    assert split.classes == ["0", "1"]
    with pytest.raises(FileNotFoundError, match=rf"none of the 2 videos listed in .*train.txt is under {tmp_path / 'x'}"
                                                r" \(the first: .*a.mp4\); give the folder .* \(--data-root\)"):
        read_annotations(tmp_path / "train.txt", data_root=tmp_path / "x")


# -- Kinetics --------------------------------------------------------------------------------------

KINETICS_TRAIN = """label,youtube_id,time_start,time_end,split
abseiling,--33Lscn6sk,4,14,train
abseiling,--VnA3ztuZg,13,23,train
air drumming,-0Qn2TuRxvM,22,32,train
air drumming,-1j8w3sRhxE,1,11,train
"""
KINETICS_VAL = """label,youtube_id,time_start,time_end,split
abseiling,0wR5jVB-WPk,417,427,val
air drumming,--nQbRBEz2s,104,114,val
"""


def test_kinetics_cvdf_layout(tmp_path: Path) -> None:
    # CVDF: k400/{train,val,test}/<youtube_id>_<start:06d>_<end:06d>.mp4 (flat) and k400/annotations/*.csv
    root = tmp_path / "k400"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "train.csv").write_text(KINETICS_TRAIN)
    (root / "annotations" / "val.csv").write_text(KINETICS_VAL)
    (root / "annotations" / "test.csv").write_text("youtube_id,time_start,time_end,split\n--65_UAU7ao,0,10,test\n")
    touch(root / "train", ["--33Lscn6sk_000004_000014.mp4", "-0Qn2TuRxvM_000022_000032.mp4",
                           "-1j8w3sRhxE_000001_000011.mp4"])  # one train clip never downloaded
    touch(root / "val", ["0wR5jVB-WPk_000417_000427.mp4", "--nQbRBEz2s_000104_000114.mp4"])
    touch(root / "test", ["--65_UAU7ao_000000_000010.mp4"])
    assert detect_format(root) == "kinetics"
    train, val = find_splits(root)
    assert train.classes == ["abseiling", "air drumming"] and train.format == "kinetics"
    assert train.samples == [(str(root / "train" / "--33Lscn6sk_000004_000014.mp4"), 0),
                             (str(root / "train" / "-0Qn2TuRxvM_000022_000032.mp4"), 1),
                             (str(root / "train" / "-1j8w3sRhxE_000001_000011.mp4"), 1)]
    assert train.missing == ["--VnA3ztuZg_000013_000023.mp4"]
    assert val.samples == [(str(root / "val" / "0wR5jVB-WPk_000417_000427.mp4"), 0),
                           (str(root / "val" / "--nQbRBEz2s_000104_000114.mp4"), 1)]
    assert find_eval_split(root).samples == val.samples
    with pytest.raises(AnnotationError, match=r"test.csv line 1: no 'label' column .*a test split without labels"):
        read_annotations(root / "annotations" / "test.csv", data_root=root)


def test_kinetics_class_folders_and_first_release_columns(tmp_path: Path) -> None:
    # ActivityNet's downloader: <root>/<label>/<clip>.mp4 (label as written); the first K400 CSVs add is_cc
    # and quote labels
    (tmp_path / "kinetics_400_validate.csv").write_text(
        'label,youtube_id,time_start,time_end,split,is_cc\nabseiling,0wR5jVB-WPk,417,427,val,0\n'
        '"air drumming",--nQbRBEz2s,104,114,val,0\n')
    touch(tmp_path / "val", ["abseiling/0wR5jVB-WPk_000417_000427.mp4", "air drumming/--nQbRBEz2s_000104_000114.mp4"])
    split = find_eval_split(tmp_path)
    assert split.classes == ["abseiling", "air drumming"] and [t for _, t in split.samples] == [0, 1]
    assert split.samples[1][0] == str(tmp_path / "val" / "air drumming" / "--nQbRBEz2s_000104_000114.mp4")


def test_kinetics_400_class_order_is_the_shipped_list(tmp_path: Path) -> None:
    k400 = (DATA / "kinetics-400.txt").read_text().splitlines()
    assert k400 == sorted(k400) and len(set(k400)) == 400  # SlowFast / torchvision / mmaction2 order: sorted names
    rows = "".join(f'"{name}",id{i:08d},0,10,train\n' for i, name in enumerate(reversed(k400)))
    (tmp_path / "train.csv").write_text("label,youtube_id,time_start,time_end,split\n" + rows)
    touch(tmp_path, [f"id{i:08d}_000000_000010.mp4" for i in range(400)])
    split = read_annotations(tmp_path / "train.csv")
    assert split.classes == k400 and split.samples[0][1] == 399


# -- Something-Something v2 ------------------------------------------------------------------------

def ssv2_folder(root: Path, prefix: str = "") -> list[str]:
    """labels.json numbering the 174 templates in sorted order, as the release does; two train videos and one
    validation video in 20bn-something-something-v2/."""
    templates = (DATA / "ssv2.txt").read_text().splitlines()
    (root / "labels").mkdir(parents=True)
    (root / "labels" / f"{prefix}labels.json").write_text(json.dumps({t: str(i) for i, t in enumerate(templates)}))
    (root / "labels" / f"{prefix}train.json").write_text(json.dumps([
        {"id": "78687", "label": "holding potato next to vicks vaporub bottle",
         "template": "Holding [something] next to [something]", "placeholders": ["potato", "vicks vaporub bottle"]},
        {"id": "42326", "label": "spreading margarine onto bread",
         "template": "Spreading [something] onto [something]", "placeholders": ["margarine", "bread"]},
    ], indent=1))
    (root / "labels" / f"{prefix}validation.json").write_text(json.dumps([
        {"id": "74225", "label": "spinning cube that quickly stops spinning",
         "template": "Spinning [something] that quickly stops spinning", "placeholders": ["cube"]}]))
    (root / "labels" / f"{prefix}test.json").write_text(json.dumps([{"id": "1420"}]))
    touch(root / "20bn-something-something-v2", ["78687.webm", "42326.webm", "74225.webm", "1420.webm"])
    return templates


@pytest.mark.parametrize("prefix", ["", "something-something-v2-"])
def test_ssv2_release_layout(tmp_path: Path, prefix: str) -> None:
    templates = ssv2_folder(tmp_path, prefix)
    assert detect_format(tmp_path) == "ssv2"
    train, val = find_splits(tmp_path)
    assert train.classes == templates and len(templates) == 174
    videos = tmp_path / "20bn-something-something-v2"
    assert train.samples == [(str(videos / "78687.webm"), templates.index("Holding something next to something")),
                             (str(videos / "42326.webm"), templates.index("Spreading something onto something"))]
    assert val.samples == [(str(videos / "74225.webm"), 140)]  # line 141 of mmaction2's sthv2 label_map.txt
    with pytest.raises(AnnotationError, match=r"test.json entry 0 \(id 1420\): no 'template' \(a test split"):
        read_annotations(tmp_path / "labels" / f"{prefix}test.json", data_root=tmp_path)


# -- class folders and dataset folders -------------------------------------------------------------

def test_class_folders_as_scan_data(tmp_path: Path) -> None:
    touch(tmp_path, [f"{c}/{i}.png" for c in ("cat", "dog") for i in range(5)])
    classes, kept, held = scan_data(tmp_path, IMAGE_EXTENSIONS, 0.4, seed=1)
    train, val = find_splits(tmp_path, val_split=0.4, seed=1, extensions=IMAGE_EXTENSIONS)
    assert (train.classes, train.samples, val.samples, train.format) == (classes, kept, held, "folders")
    split = find_eval_split(tmp_path, extensions=IMAGE_EXTENSIONS)
    assert split.classes == classes and len(split.samples) == 10


def test_explicit_validation_file(tmp_path: Path) -> None:
    touch(tmp_path, [f"{c}/{i}.mp4" for c in ("a", "b") for i in range(3)])
    (tmp_path / "mine.txt").write_text("".join(f"{c}/{i}.mp4\t{c}\n" for c in ("a", "b") for i in range(2)))
    (tmp_path / "held.txt").write_text("b/2.mp4\tb\na/2.mp4\ta\n")
    train, val = find_splits(tmp_path / "mine.txt", val_data=tmp_path / "held.txt", val_split=0.5)
    assert len(train.samples) == 4 and val.samples == [(str(tmp_path / "b" / "2.mp4"), 1),
                                                        (str(tmp_path / "a" / "2.mp4"), 0)]
    (tmp_path / "other.txt").write_text("a/2.mp4\tc\n")
    with pytest.raises(AnnotationError, match=r"other.txt line 1: label 'c' is not one of the 2 classes of the given"):
        find_splits(tmp_path / "mine.txt", val_data=tmp_path / "other.txt")


def test_folder_with_class_folders_and_annotations_is_ambiguous(tmp_path: Path) -> None:
    touch(tmp_path / "train", ["abseiling/a_000000_000010.mp4", "archery/b_000000_000010.mp4"])
    (tmp_path / "train.csv").write_text(KINETICS_TRAIN)
    with pytest.raises(AnnotationError, match=r"holds both class folders and annotation files \(.*train.csv\); "
                                              r"pass the data format \(--data-format folders"):
        find_splits(tmp_path)
    assert find_splits(tmp_path, data_format="folders")[0].classes == ["abseiling", "archery"]


# -- malformed files -------------------------------------------------------------------------------

@pytest.mark.parametrize("name, text, message", [
    ("train.csv", "a.mp4 0\nb.mp4\n", r"train.csv line 2: expected 'path label' separated by a space, a comma or "
                                      r"a tab, got 'b.mp4'"),
    ("train.csv", "a.mp4 0\nb.mp4 zero\n", r"train.csv line 2: label 'zero' is not an integer class index like the "
                                           r"labels before it \(line 1: 0\)"),
    ("train.csv", "a.mp4 0\nb.mp4 -1\n", r"train.csv line 2: label -1 is negative"),
    ("train.csv", "a.mp4 0\n\nb.mp4 1\na.mp4 1\n", r"train.csv line 4: 'a.mp4' is listed twice \(also line 1\); "
                                                   r"remove one"),
    ("train.csv", "\n\n", r"train.csv is empty: it lists no videos; expected 'path label'"),
    ("train.csv", "label,youtube_id,time_start,time_end,split\nabseiling,x,4,14\n",
     r"train.csv line 2: expected 5 comma-separated values \(label,youtube_id,time_start,time_end,split\), got 4"),
    ("train.csv", "label,youtube_id,time_start,time_end,split\nabseiling,x,four,14,train\n",
     r"train.csv line 2: time_start and time_end must be numbers"),
    ("train.csv", "label,youtube_id,time_start,time_end,split\nabseiling,x,4,14,train\nabseiling,x,4,14,train\n",
     r"train.csv line 3: 'x_000004_000014' is listed twice \(also line 2\)"),
    ("train.json", '[{"id": "1", "template": "Holding [something]"},\n {"id": "2" "template": "x"}]',
     r"train.json line 2 column 13: not valid JSON \(Expecting ',' delimiter\)"),
    ("train.json", '[{"id": "1", "template": "Holding [something]"}, {"id": "1", "template": "Holding something"}]',
     r"train.json entry 1 \(id 1\): '1' is listed twice \(also entry 0 \(id 1\)\)"),
    ("train.json", '[{"id": "1", "template": "Juggling [something]"}]',
     r"train.json entry 0 \(id 1\): label 'Juggling something' is not one of the 2 classes"),
])
def test_malformed_files_name_the_line_and_what_was_expected(tmp_path: Path, name: str, text: str,
                                                             message: str) -> None:
    (tmp_path / "labels.json").write_text('{"Holding something": "0", "Moving something up": "1"}')
    touch(tmp_path, ["a.mp4", "b.mp4", "1.webm", "x_000004_000014.mp4"])
    (tmp_path / name).write_text(text)
    with pytest.raises(AnnotationError, match=message):
        read_annotations(tmp_path / name)


def test_unknown_labels_and_bad_label_files(tmp_path: Path) -> None:
    touch(tmp_path, ["a.mp4"])
    (tmp_path / "list.txt").write_text("a.mp4 7\n")
    with pytest.raises(AnnotationError, match=r"list.txt line 1: class index 7 is out of range: there are 3 classes"):
        read_annotations(tmp_path / "list.txt", classes=["x", "y", "z"])
    (tmp_path / "names.txt").write_text("a.mp4,abseling\n")
    with pytest.raises(AnnotationError, match=r"names.txt line 1: label 'abseling' is not one of the 400 classes of "
                                              r"the given class list \('abseiling', "):
        read_annotations(tmp_path / "names.txt", classes=(DATA / "kinetics-400.txt").read_text().splitlines())
    (tmp_path / "train.json").write_text('[{"id": "1", "template": "Holding [something]"}]')
    with pytest.raises(AnnotationError, match=r"train.json: the Something-Something v2 label file \(labels.json or "
                                              r"something-something-v2-labels.json\) is not next to it"):
        read_annotations(tmp_path / "train.json")
    (tmp_path / "labels.json").write_text('{"Holding something": "0", "Moving something up": "0"}')
    with pytest.raises(AnnotationError, match=r"labels.json: template 'Moving something up' has the index '0'; "
                                              r"expected each of 0..1 once"):
        read_annotations(tmp_path / "train.json")
