"""Class-folder datasets for training: scanning `DIR/<class>/<file>` trees, image samples,
per-sample seeding and the process-sharded sampler.

Augmentation is seeded per (seed, epoch, sample) and batches are drawn by :class:`ShardSampler`,
so a run gives the same numbers whatever the number of data workers or processes, and a run
resumed within an epoch gives the same numbers as an uninterrupted one.
"""
from __future__ import annotations

import math
import os
import random
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

__all__ = [
    "IMAGE_EXTENSIONS",
    "Samples",
    "SampleError",
    "scan_data",
    "walk_files",
    "class_folder_samples",
    "hold_out",
    "ImageSamples",
    "EpochSeeded",
    "ShardSampler",
    "derive_seed",
    "seed_everything",
]

IMAGE_EXTENSIONS: Tuple[str, ...] = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

Samples = List[Tuple[str, int]]


class SampleError(ValueError):
    """A data file that cannot be read; the message names the file and the fix."""


def walk_files(top: Path, extensions: Tuple[str, ...], tree: Optional[Path] = None) -> List[str]:
    """Files under `top` whose names end in one of `extensions` (any case), in torchvision's
    `make_dataset` order (sorted folders, then sorted names), as paths under `top`.

    Links to files and to folders outside `tree` (default: `top`) are followed. A link to a
    folder inside `tree`, to `tree` itself, to an ancestor of `tree` or of the link, or to a folder
    already walked would list files twice or loop (`a/loop -> ..`): it is skipped with a warning
    naming it.
    """
    tree_real = os.path.realpath(tree if tree is not None else top)
    visited = {os.path.realpath(top)}
    found: List[Tuple[str, List[str]]] = []
    pending = [str(top)]
    while pending:
        folder = pending.pop()
        names: List[str] = []
        with os.scandir(folder) as entries:
            for entry in entries:
                if not entry.is_dir():
                    if entry.name.lower().endswith(extensions):
                        names.append(entry.name)
                    continue
                if entry.is_symlink():
                    real = os.path.realpath(entry.path)
                    inside = os.path.commonpath([real, tree_real]) in (real, tree_real)
                    above = os.path.commonpath([real, os.path.realpath(folder)]) == real
                    if inside or above or real in visited:
                        warnings.warn(f"not following the link {entry.path} -> {os.readlink(entry.path)}: it leads "
                                      f"back into {tree if tree is not None else top} (its files would be listed "
                                      "twice or without end); remove the link or point it outside the data folder",
                                      stacklevel=2)
                        continue
                    visited.add(real)
                else:
                    visited.add(os.path.realpath(entry.path))
                pending.append(entry.path)
        found.append((folder, sorted(names)))
    return [os.path.join(folder, name) for folder, names in sorted(found) for name in names]


def class_folder_samples(root: Path, class_to_idx: dict, extensions: Tuple[str, ...]) -> Samples:
    """`(file, class index)` of every file under `root/<class>/` for the classes of `class_to_idx`,
    walked by :func:`walk_files` with `root` as the tree (its links back into `root` are skipped)."""
    samples: Samples = []
    for name in sorted(class_to_idx):
        samples += [(path, class_to_idx[name]) for path in walk_files(root / name, extensions, tree=root)]
    return samples


def hold_out(samples: Samples, num_classes: int, val_split: float, seed: int) -> Tuple[Samples, Samples]:
    """(kept, held) samples: a `val_split` fraction of each class held out, chosen by `seed`,
    at least one sample of each class kept; both sorted."""
    rng = random.Random(seed)
    kept: Samples = []
    held: Samples = []
    for idx in range(num_classes):
        items = [s for s in samples if s[1] == idx]
        rng.shuffle(items)
        n_val = min(int(round(len(items) * val_split)), len(items) - 1)
        held.extend(items[:n_val])
        kept.extend(items[n_val:])
    return sorted(kept), sorted(held)


def scan_data(root: Path, extensions: Tuple[str, ...], val_split: float,
              seed: int) -> Tuple[List[str], Samples, Samples]:
    """Classes and (train, val) samples of a class-folder tree.

    `root/train` and `root/val` (or `validation`) are used when present; otherwise the
    classes are `root`'s folders and a stratified `val_split` fraction of each class is
    held out, chosen by `seed`. Links that lead back into the tree are skipped with a warning
    (:func:`walk_files`). Raises `FileNotFoundError` / `ValueError` naming the problem and the
    fix for a missing folder, a file, no class folders or a class without files.
    """
    layout = "a folder of class folders (DIR/<class>/<file>, or DIR/train/<class>/<file> and DIR/val/...)"
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist; give {layout}")
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is a file; give {layout}")
    train_root = root / "train" if (root / "train").is_dir() else root
    classes = sorted(entry.name for entry in train_root.iterdir() if entry.is_dir())
    if len(classes) < 2:
        found = f"only one class folder ({classes[0]!r})" if classes else "no class folders"
        raise ValueError(f"{train_root} has {found}; a classifier needs at least two: give {layout}")
    class_to_idx = {name: i for i, name in enumerate(classes)}
    train = class_folder_samples(train_root, class_to_idx, extensions)
    empty = sorted(set(classes) - {classes[t] for _, t in train})
    if empty:
        raise ValueError(f'no files with the extensions {", ".join(extensions)} in the class folder(s) '
                         f'{", ".join(empty[:5])}{" ..." if len(empty) > 5 else ""} of {train_root}; '
                         'add files or remove those folders')
    if train_root != root:
        for name in ("val", "validation"):
            if (root / name).is_dir():
                val_classes = {entry.name for entry in (root / name).iterdir() if entry.is_dir()}
                return classes, train, class_folder_samples(root / name, {c: class_to_idx[c] for c in classes
                                                                          if c in val_classes}, extensions)
    if val_split <= 0:
        return classes, train, []
    kept, held = hold_out(train, len(classes), val_split, seed)
    return classes, kept, held


class ImageSamples(Dataset):
    """`(path, target)` samples read with PIL as RGB and transformed."""

    def __init__(self, samples: Samples, transform: Optional[Callable] = None) -> None:
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        from PIL import Image
        path, target = self.samples[index]
        with open(path, "rb") as f:
            img = Image.open(f).convert("RGB")
        return (self.transform(img) if self.transform is not None else img), target


def derive_seed(*values: int) -> int:
    """A 32-bit seed mixed from `values` (NumPy's SeedSequence)."""
    return int(np.random.SeedSequence([int(v) & 0xFFFFFFFF for v in values]).generate_state(1)[0])


def seed_everything(seed: int, accelerators: bool = True) -> None:
    """Seed Python's, NumPy's and torch's global generators (CPU only if not `accelerators`)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    if accelerators:
        torch.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)  # much cheaper, for per-sample use


class EpochSeeded(Dataset):
    """Seeds the global generators from (seed, epoch, index) before loading each sample.

    Augmentation then depends only on the sample and epoch, not on the data-loader workers,
    the process rank or where an interrupted run was resumed. `seed=None` loads without
    seeding (deterministic evaluation transforms). A sample that cannot be read raises
    :class:`SampleError` naming its file (`dataset.samples[index][0]`).
    """

    def __init__(self, dataset: Dataset, seed: Optional[int]) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        if self.seed is not None:
            seed_everything(derive_seed(self.seed, 1, self.epoch, index), accelerators=False)
        try:
            return self.dataset[index]
        except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
            path = self.dataset.samples[index][0]  # type: ignore[attr-defined]
            raise SampleError(f"cannot read {path} ({type(e).__name__}: {e}); remove or re-encode that file") from e


class ShardSampler(Sampler[int]):
    """Per-epoch shuffled indices, split across processes like `DistributedSampler`.

    `pad` repeats samples so that every rank gets the same count (training);
    `set_epoch(epoch, skip)` reshuffles and skips the first `skip` indices of this rank
    (resuming within an epoch). With one process the global batches are the same sets as
    those of N processes with 1/N of the batch size.
    """

    def __init__(self, size: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = False,
                 seed: int = 0, pad: bool = False) -> None:
        self.size = size
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.pad = pad
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch = epoch
        self.skip = skip

    def shard(self) -> List[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed(self.seed, 2, self.epoch))
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        if self.pad and self.size % self.num_replicas:
            total = math.ceil(self.size / self.num_replicas) * self.num_replicas
            order += (order * math.ceil(total / max(self.size, 1)))[:total - self.size]
        return order[self.rank::self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.shard()[self.skip:])

    def __len__(self) -> int:
        return max(len(self.shard()) - self.skip, 0)
