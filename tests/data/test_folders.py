"""Class-folder scanning, per-sample seeding and the process-sharded sampler of `mvit_zoo.data.folders`."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from mvit_zoo.data.folders import IMAGE_EXTENSIONS, EpochSeeded, ImageSamples, SampleError, ShardSampler, scan_data


def make_tree(root: Path, classes: int, per_class: int, suffix: str = ".png") -> Path:
    """Empty files named like images in `classes` class folders (scanning reads names only)."""
    for c in range(classes):
        (root / str(c)).mkdir(parents=True)
        for i in range(per_class):
            (root / str(c) / f"{i:03d}{suffix}").touch()
    return root


def test_scan_data_stratified_split(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "d", classes=10, per_class=40)
    classes, train, val = scan_data(root, IMAGE_EXTENSIONS, 0.25, seed=1)
    assert classes == [str(i) for i in range(10)]
    assert len(val) == 100 and {t for _, t in val} == set(range(10))
    assert not {p for p, _ in train} & {p for p, _ in val}
    assert scan_data(root, IMAGE_EXTENSIONS, 0.25, seed=1)[2] == val
    assert scan_data(root, IMAGE_EXTENSIONS, 0.25, seed=2)[2] != val


def test_scan_data_train_and_val_trees(tmp_path: Path) -> None:
    make_tree(tmp_path / "d" / "train", classes=2, per_class=3)
    make_tree(tmp_path / "d" / "val", classes=2, per_class=1)
    classes, train, val = scan_data(tmp_path / "d", IMAGE_EXTENSIONS, 0.5, seed=0)
    assert classes == ["0", "1"] and len(train) == 6 and len(val) == 2


def test_scan_data_errors_name_the_problem_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist; give a folder of class folders"):
        scan_data(tmp_path / "missing", IMAGE_EXTENSIONS, 0.1, 0)
    (tmp_path / "file.png").touch()
    with pytest.raises(NotADirectoryError, match="is a file; give a folder of class folders"):
        scan_data(tmp_path / "file.png", IMAGE_EXTENSIONS, 0.1, 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no class folders; a classifier needs at least two"):
        scan_data(tmp_path / "empty", IMAGE_EXTENSIONS, 0.1, 0)
    make_tree(tmp_path / "one", classes=1, per_class=2)
    with pytest.raises(ValueError, match="only one class folder"):
        scan_data(tmp_path / "one", IMAGE_EXTENSIONS, 0.1, 0)
    make_tree(tmp_path / "txt", classes=2, per_class=2, suffix=".txt")
    with pytest.raises(ValueError, match=r"no files with the extensions \.jpg.* in the class folder\(s\) 0, 1"):
        scan_data(tmp_path / "txt", IMAGE_EXTENSIONS, 0.1, 0)


def test_unreadable_sample_names_its_file(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    Image.new("RGB", (4, 4)).save(good)
    bad.write_bytes(b"not an image")
    data = EpochSeeded(ImageSamples([(str(good), 0), (str(bad), 1)]), seed=None)
    assert data[0][1] == 0
    with pytest.raises(SampleError, match=f"cannot read {bad} .*UnidentifiedImageError.*; remove or re-encode"):
        data[1]


def test_epoch_seeded_depends_on_seed_epoch_and_index_only() -> None:
    import torch

    class Noise:
        samples = [("x", 0)] * 3

        def __getitem__(self, index: int) -> float:
            return float(torch.rand(()))

        def __len__(self) -> int:
            return 3

    data = EpochSeeded(Noise(), seed=5)
    first = [data[i] for i in range(3)]
    assert [data[i] for i in reversed(range(3))] == first[::-1] and len(set(first)) == 3
    data.epoch = 1
    assert [data[i] for i in range(3)] != first


def test_shard_sampler_global_batches_match_single_process() -> None:
    single = ShardSampler(10, shuffle=True, seed=3, pad=True)
    shards = [ShardSampler(10, 2, r, shuffle=True, seed=3, pad=True) for r in range(2)]
    for s in (single, *shards):
        s.set_epoch(4)
    order = list(single)
    assert sorted(order) == list(range(10))
    assert [list(s) for s in shards] == [order[0::2], order[1::2]]
    single.set_epoch(5)
    assert list(single) != order
    single.set_epoch(4, skip=6)
    assert list(single) == order[6:] and len(single) == 4
    odd = [ShardSampler(5, 2, r, pad=True) for r in range(2)]
    assert [len(s) for s in odd] == [3, 3]
    val = [ShardSampler(5, 2, r) for r in range(2)]
    assert sorted(list(val[0]) + list(val[1])) == list(range(5))


def test_scan_data_skips_links_back_into_the_tree(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "d", classes=2, per_class=8)
    (root / "0" / "loop").symlink_to("..")  # followed 40 levels deep by os.walk(followlinks=True)
    (root / "0" / "twin").symlink_to(root / "1")  # class 1's images would also be labelled 0
    with pytest.warns(UserWarning) as caught:
        classes, train, val = scan_data(root, IMAGE_EXTENSIONS, 0.0, seed=0)
    assert len(train) == 16 and val == []
    assert sorted(Path(p).parent.name for p, t in train if t == 0) == ["0"] * 8
    messages = " ".join(str(w.message) for w in caught)
    assert f"not following the link {root / '0' / 'loop'} -> .." in messages and "twin" in messages


def test_scan_data_follows_links_to_files_and_folders_outside_the_tree(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "d", classes=2, per_class=2)
    outside = make_tree(tmp_path / "extra", classes=1, per_class=3)
    (root / "0" / "more").symlink_to(outside / "0")
    (root / "1" / "one.png").symlink_to(outside / "0" / "000.png")
    (root / "2").symlink_to(outside / "0", target_is_directory=True)  # a whole class folder elsewhere
    (outside / "0" / "up").symlink_to(outside)  # a loop outside the tree is cut too
    with pytest.warns(UserWarning, match="up -> "):
        classes, train, _ = scan_data(root, IMAGE_EXTENSIONS, 0.0, seed=0)
    assert classes == ["0", "1", "2"]
    assert [sum(t == c for _, t in train) for c in range(3)] == [5, 3, 3]
