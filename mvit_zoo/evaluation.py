"""Evaluate a classifier on a dataset or a data loader: top-1/top-k, loss, per-class counts.

`evaluate(model, DATA)` reads a class-folder tree (`DATA/<class>/<file>`, or `DATA/val/<class>/<file>`), a
dataset's annotation file (a `path label` list as SlowFast and mmaction2 write them, a Kinetics CSV, a
Something-Something v2 JSON) or a folder holding a dataset's annotation files, whose val split is used
(:func:`mvit_zoo.data.sources.find_eval_split`): images for image models, videos for video models. Video
models are scored over `views` (temporal clips x spatial crops, :mod:`mvit_zoo.data.views`; default: the
`test_views` of the model's pretrained cfg) with their softmax scores averaged; only the frames of the views
are decoded. Views of several videos share a batch; a worker holds only the frames of one video's views.
Class names (folder names, or an annotation file's labels) are matched to the model's classes by
:func:`match_classes`; an integer-labelled list gives class indices directly. Files that cannot be read are
counted and listed (`skipped`), as are files an annotation file lists but that are not there (`missing`);
neither is fatal.

`evaluate(model, loader)` scores `(input, target)` batches as they come (one view each); it is the
validation of `mvit-zoo finetune`.

Top-k is top-5, or top-`num_classes` for a head of fewer than 5 classes (named `top2`, `top3`, ...;
a top-5 of 100% there would say nothing).
"""
from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .data.folders import IMAGE_EXTENSIONS
from .data.video import VIDEO_EXTENSIONS
from .data.reader import resolve_backend
from .data.sources import DatasetSplit, find_eval_split
from .data.views import Views, ViewSampling, decode_views

__all__ = ["IMAGE_EXTENSIONS", "ClassMatchError", "Evaluation", "decode_views", "evaluate", "label_set_names",
           "match_classes", "video_scores", "view_sampling"]

DATA_DIR = Path(__file__).resolve().parent / "data"
_LABEL_SET_BY_CLASSES = {1000: "imagenet-1k", 400: "kinetics-400"}
TOP_K = 5


class ClassMatchError(ValueError):
    """Class folders that cannot be matched to the model's classes. `problem` says which folder and why;
    the message adds the fix in Python terms (`class_names=`), a command line gives its own."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(f"{problem}; {fix}")
        self.problem = problem


# -- results ---------------------------------------------------------------------------------------

@dataclass
class Evaluation:
    """Counts of one evaluation; accuracies in percent.

    `per_class[c] = (samples, top-1 hits, top-k hits)` of model class `c` (k = :attr:`k`); `confusion` counts
    `(target, prediction)` pairs (when asked for); `skipped` lists `(file, reason)` of
    unreadable files, `info['missing']` counts the files an annotation file lists that are not there
    (`info['missing_files']` names them); `short` counts videos with fewer frames than one clip spans (their last
    frame is repeated, as in SlowFast).
    """

    num_classes: int
    per_class: torch.Tensor  # (num_classes, 3) float64
    loss_sum: float = 0.0
    views: Views | None = None
    class_names: list[str] | None = None
    confusion: Counter | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    short: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return int(self.per_class[:, 0].sum())

    def _percent(self, column: int) -> float:
        return 100.0 * float(self.per_class[:, column].sum()) / max(self.count, 1)

    @property
    def top1(self) -> float:
        return self._percent(1)

    @property
    def k(self) -> int:
        """The k of top-k: 5, or the class count when there are fewer classes."""
        return min(TOP_K, self.num_classes)

    @property
    def topk_name(self) -> str:
        """`top5`, or `top2` for a 2-class head: the key of top-k in :meth:`metrics` and :meth:`to_dict`."""
        return f"top{self.k}"

    @property
    def topk(self) -> float:
        return self._percent(2)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.count, 1)

    def metrics(self) -> dict[str, float]:
        return {"loss": self.loss, "top1": self.top1, self.topk_name: self.topk}

    def class_accuracy(self) -> list[dict[str, Any]]:
        """Top-1/top-k of each class that has samples."""
        rows = []
        for c in torch.nonzero(self.per_class[:, 0]).flatten().tolist():
            n, c1, c5 = self.per_class[c].tolist()
            name = self.class_names[c] if self.class_names else str(c)
            rows.append({"index": c, "label": name, "count": int(n), "top1": 100.0 * c1 / n,
                         self.topk_name: 100.0 * c5 / n})
        return rows

    def to_dict(self, per_class: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.info)
        out.update(views=str(self.views) if self.views else None, count=self.count, top1=self.top1,
                   **{self.topk_name: self.topk}, loss=self.loss, skipped=len(self.skipped),
                   skipped_files=[list(s) for s in self.skipped], short_videos=self.short)
        if per_class:
            out["per_class"] = self.class_accuracy()
        return out


class _Scorer:
    """Accumulates the averaged scores of samples whose views arrive in batches."""

    def __init__(self, num_classes: int, confusion: bool) -> None:
        self.per_class = torch.zeros(num_classes, 3, dtype=torch.float64)
        self.loss_sum = 0.0
        self.confusion: Counter | None = Counter() if confusion else None

    def add(self, log_probs: torch.Tensor, target: torch.Tensor) -> None:
        """`log_probs`: `(B, K)` log of the averaged softmax scores; `target`: `(B,)`."""
        log_probs, target = log_probs.float().cpu(), target.cpu().long()
        top = log_probs.topk(min(TOP_K, log_probs.shape[-1]), dim=-1).indices
        hits = top.eq(target[:, None])
        self.loss_sum += float(-log_probs.gather(1, target[:, None]).sum())
        stats = torch.stack([torch.ones_like(target), hits[:, 0].long(), hits.any(1).long()], 1).double()
        self.per_class.index_add_(0, target, stats)
        if self.confusion is not None:
            self.confusion.update(zip(target.tolist(), top[:, 0].tolist()))

    @property
    def correct(self) -> float:
        return float(self.per_class[:, 1].sum())

    @property
    def count(self) -> float:
        return float(self.per_class[:, 0].sum())


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if enabled else nullcontext()


# -- labels ----------------------------------------------------------------------------------------

def _norm(name: str) -> str:
    return re.sub(r"\s+", " ", name.replace("_", " ")).strip().lower()


def label_set_names(label_set: str) -> list[str] | None:
    """Class names of a label set shipped in `mvit_zoo/data/` (`imagenet-1k`, `kinetics-400`, `ssv2`)."""
    path = DATA_DIR / f"{label_set}.txt"
    return path.read_text(encoding="utf-8").splitlines() if path.is_file() else None


def _label_set_of(model: nn.Module) -> tuple[str | None, list[str] | None]:
    """The label set of `model`'s head and its shipped class names; `(None, None)` for a head that is not
    the label set's (a fine-tuned one), whose pretrained cfg still names the label set it started from."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    name = cfg.get("label_set")
    if name and cfg.get("num_classes") not in (None, num_classes):
        name = None
    name = name or _LABEL_SET_BY_CLASSES.get(num_classes)
    names = label_set_names(name) if name else None
    if names is not None and len(names) != num_classes:
        return None, None
    return name, names


def _own_label_names(model: nn.Module) -> list[str] | None:
    """The class names a model carries in its pretrained cfg (`timm.create_model('local-dir:RUN')` and
    'hf-hub:' put the `label_names` of the folder's config.json there), if one per class."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("label_names")
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    return list(names) if names and len(names) == num_classes else None


def _aliases(label_set: str | None, names: Sequence[str]) -> dict[str, int]:
    """Normalised folder-name spellings of each class: its name, and for ImageNet its synset and lemmas."""
    table: dict[str, int] = {}
    lemmas: Counter = Counter()
    for i, name in enumerate(names):
        table[_norm(name)] = i
        if label_set == "imagenet-1k":
            lemmas.update(_norm(part) for part in name.split(","))
    if label_set == "imagenet-1k":
        from timm.data import ImageNetInfo

        for i, synset in enumerate(ImageNetInfo("imagenet-1k").label_names()):
            table[synset.lower()] = i
        for i, name in enumerate(names):  # a lemma names a class only where no other class shares it
            for part in map(_norm, name.split(",")):
                if lemmas[part] == 1:
                    table.setdefault(part, i)
    return table


def match_classes(
        folders: Sequence[str],
        num_classes: int,
        class_names: Sequence[str] | None = None,
        label_set: str | None = None,
        label_set_classes: Sequence[str] | None = None,
        noun: str = "class folder",
) -> tuple[list[int], str]:
    """Model class index of each folder (or class name), and how they were matched.

    In order: the checkpoint's own `class_names` (exact folder names, as `finetune` writes them),
    then the label set's names (Kinetics names with `_` or spaces, any case; ImageNet synsets,
    names or unambiguous lemmas), then folders named by class index (`0`, `17`, ...). `noun` names
    what `folders` are in messages (an annotation file's labels are matched as folder names are).
    """
    folders_named = noun == "class folder"
    fix, rename = ("rename the folder", "name the folders") if folders_named else ("fix the label", "write the labels")
    if class_names:
        lookup = {name: i for i, name in enumerate(class_names)}
        unknown = [f for f in folders if f not in lookup]
        if not unknown:
            return [lookup[f] for f in folders], "checkpoint class list"
        raise ClassMatchError(f'{noun} {unknown[0]!r} is not one of the model\'s {len(class_names)} classes '
                              f'({", ".join(map(repr, class_names[:5]))}, ...)',
                              f"{fix}, or evaluate the model that was fine-tuned for these classes")
    by_index = all(f.isdigit() and int(f) < num_classes for f in folders)
    if label_set_classes:
        table = _aliases(label_set, label_set_classes)
        unknown = [f for f in folders if _norm(f) not in table and f.lower() not in table]
        if not unknown:
            return [table.get(f.lower(), table.get(_norm(f))) for f in folders], f"label set {label_set}"
        if by_index:
            return [int(f) for f in folders], "class index"
        raise ClassMatchError(f"{noun} {unknown[0]!r} is not a class of the model's label set {label_set} "
                              f"({len(label_set_classes)} classes)", f"{rename} after its classes (see "
                              f"mvit_zoo/data/{label_set}.txt), or pass class_names= (one per class, in head order)")
    if by_index:
        return [int(f) for f in folders], "class index"
    bad = next(f for f in folders if not (f.isdigit() and int(f) < num_classes))
    raise ClassMatchError(f"{noun} {bad!r}: the model has no class names (no label set ships for its "
                          f"{num_classes} classes and no class list was given), so classes must be class indices "
                          f"0..{num_classes - 1}", f"{fix}, or pass class_names= (one per class, in head order)")


# -- data ------------------------------------------------------------------------------------------

class _ImageItems(Dataset):
    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable) -> None:
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[str, int, Any]:
        from PIL import Image

        path, target = self.samples[index]
        try:
            with open(path, "rb") as f:
                img = Image.open(f).convert("RGB")
        except Exception as e:  # noqa: BLE001 - any unreadable file is reported, not fatal
            return path, target, f"{type(e).__name__}: {e}"
        return path, target, self.transform(img)


class _VideoItems(Dataset):
    """Per video: the frames its views need (uint8), the rows of each clip, and whether it was short."""

    def __init__(self, samples: Sequence[tuple[str, int]], sampling: ViewSampling, backend: str | None) -> None:
        self.samples, self.sampling, self.backend = samples, sampling, backend

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[str, int, Any]:
        path, target = self.samples[index]
        try:
            return path, target, decode_views(path, self.sampling, self.backend)
        except Exception as e:  # noqa: BLE001 - any undecodable file is reported, not fatal
            return path, target, f"{type(e).__name__}: {e}"


def view_sampling(model: nn.Module, views: str | Sequence[int] | Views | None = None,
                  data_cfg: Any = None) -> ViewSampling:
    """The test views of a video model: from its pretrained cfg (`test_views`, `frame_sampling`) and
    data config (`num_frames`, `sampling_rate`, size, mean/std, channel order)."""
    from .data.transforms import resolve_data_config

    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    data_cfg = data_cfg or resolve_data_config(model)
    chosen = Views.parse(views if views is not None else (cfg.get("test_views") or (1, 1)))
    return ViewSampling(
        num_frames=data_cfg.num_frames, crop_size=tuple(data_cfg.input_size[-2:]), views=chosen,
        sampling_rate=data_cfg.sampling_rate, frame_sampling=cfg.get("frame_sampling") or "stride",
        crop_pct=data_cfg.crop_pct, mean=tuple(data_cfg.mean), std=tuple(data_cfg.std),
        channel_order=data_cfg.channel_order, interpolation=data_cfg.interpolation,
    )


# -- evaluation ------------------------------------------------------------------------------------

@torch.no_grad()
def video_scores(model: nn.Module, path: str | os.PathLike, views: str | Sequence[int] | Views | None = None, *,
                 data_cfg: Any = None, batch_size: int = 8, amp: bool = False,
                 decoder: str | None = None, info: Any = None) -> torch.Tensor:
    """Softmax scores of one video file averaged over its `views`: `(num_classes,)`. `decoder`: the video
    backend, 'pyav' or 'torchcodec' (None: the first that works here); `info`: the file's
    :func:`~mvit_zoo.data.reader.probe`, where the caller has it."""
    _check_batch_size(batch_size)
    device = next(model.parameters()).device
    sampling = view_sampling(model, views, data_cfg)
    frames, clips, _ = decode_views(path, sampling, decoder, info)
    all_views = sampling.iter_views(frames, clips)
    total = None
    model.eval()
    while batch := [v for _, v in zip(range(batch_size), all_views)]:
        with _autocast(device, amp):
            probs = model(torch.stack(batch).to(device)).float().softmax(-1).sum(0)
        total = probs if total is None else total + probs
    return total.cpu() / len(sampling.views)


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer of at least 1 (views per forward pass), got {batch_size!r}")


@torch.no_grad()
def evaluate(
        model: nn.Module,
        data: str | os.PathLike | Iterable,
        views: str | Sequence[int] | Views | None = None,
        *,
        batch_size: int = 8,
        device: str | torch.device | None = None,
        amp: bool = False,
        workers: int = 0,
        class_names: Sequence[str] | None = None,
        data_cfg: Any = None,
        confusion: bool = False,
        progress: bool = False,
        desc: str = "val",
        all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        data_root: str | os.PathLike | None = None,
        data_format: str | None = None,
        decoder: str | None = None,
) -> Evaluation:
    """Top-1/top-k and loss of `model` on a dataset or an iterable of `(input, target)`.

    `data` is a class-folder tree, an annotation file or a folder of a dataset's annotation files (the module
    docstring); `data_root` holds the videos an annotation file lists (default: its folder), `data_format`
    forces 'folders', 'list', 'kinetics' or 'ssv2' (default: detected), `decoder` picks the video backend
    ('pyav', 'torchcodec'; None: the first that works here). `views` (`'TxS'`) applies to video data;
    `class_names` is a fine-tuned model's class list (folder names or labels; default: the `label_names` of its
    pretrained cfg, which a model loaded with `timm.create_model('local-dir:RUN', pretrained=True)` carries);
    `data_cfg` the preprocessing
    (:func:`mvit_zoo.data.transforms.resolve_data_config` of the model by default). `batch_size` is
    the views per forward pass (at least 1). `all_reduce` sums a float64 tensor over processes (distributed
    validation of a sharded loader).
    """
    _check_batch_size(batch_size)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    num_classes = int(model.num_classes)
    if not isinstance(data, (str, os.PathLike)):
        if views is not None and len(Views.parse(views)) != 1:
            raise ValueError("views apply to a dataset (a folder or an annotation file); a loader gives one view "
                             "per sample")
        scorer = _Scorer(num_classes, confusion)
        bar = tqdm(data, desc=desc, leave=False, disable=not progress, dynamic_ncols=True)
        for x, y in bar:
            with _autocast(device, amp):
                logits = model(x.to(device, non_blocking=True))
            scorer.add(logits.float().log_softmax(-1), y)
            if progress:
                bar.set_postfix(top1=f"{100 * scorer.correct / max(scorer.count, 1):.2f}")
        stats = torch.cat([scorer.per_class.flatten(), torch.tensor([scorer.loss_sum], dtype=torch.float64)])
        if all_reduce is not None:
            stats = all_reduce(stats.to(device)).cpu()
        return Evaluation(num_classes, stats[:-1].view(num_classes, 3), float(stats[-1]), confusion=scorer.confusion,
                          class_names=list(class_names) if class_names else _own_label_names(model))
    return _evaluate_dataset(model, data, views, batch_size, device, amp, workers, class_names, data_cfg,
                             confusion, progress, desc, data_root, data_format, decoder)


def _split_targets(split: DatasetSplit, num_classes: int, class_names: Sequence[str] | None,
                   label_set: str | None, set_names: Sequence[str] | None) -> tuple[list[int], str]:
    """Model class index of each class of `split`, and how they were matched."""
    integer_list = split.format == "list" and split.classes == [str(i) for i in range(len(split.classes))]
    if split.format != "folders" and (integer_list or not (class_names or set_names)):
        # NOTE: an annotation file's own class order is its dataset's official one: an integer-labelled list
        # (SlowFast, mmaction2) gives the model's class indices, and names the model cannot match keep it
        if len(split.classes) > num_classes:
            raise ClassMatchError(f"{split.source} has {len(split.classes)} classes, more than the model's "
                                  f"{num_classes}", "evaluate a model with a head for these classes")
        return list(range(len(split.classes))), "annotation file order"
    noun = "class folder" if split.format == "folders" else f"label (of {split.source})"
    return match_classes(split.classes, num_classes, class_names, label_set, set_names, noun=noun)


def _evaluate_dataset(model: nn.Module, data: str | os.PathLike, views: Any, batch_size: int, device: torch.device,
                      amp: bool, workers: int, class_names: Sequence[str] | None, data_cfg: Any, confusion: bool,
                      progress: bool, desc: str, data_root: str | os.PathLike | None, data_format: str | None,
                      decoder: str | None) -> Evaluation:
    from .data.transforms import build_transform, is_video_model, resolve_data_config

    data_cfg = data_cfg or resolve_data_config(model)
    num_classes = int(model.num_classes)
    video = is_video_model(model)
    if video and decoder is not None:
        resolve_backend(decoder)  # a backend that is not installed is one error, not one per video
    split = find_eval_split(data, data_root, data_format, VIDEO_EXTENSIONS if video else IMAGE_EXTENSIONS)
    label_set, set_names = _label_set_of(model)
    if not class_names and set_names is None:
        class_names = _own_label_names(model)
    targets, matched_by = _split_targets(split, num_classes, class_names, label_set, set_names)
    samples = [(path, targets[index]) for path, index in split.samples]
    names = list(class_names) if class_names else set_names
    if video:
        sampling = view_sampling(model, views, data_cfg)
        dataset: Dataset = _VideoItems(samples, sampling, decoder)
        chosen, preprocessing = sampling.views, sampling.to_dict()
    else:
        chosen = Views.parse(views) if views is not None else Views()
        if len(chosen) != 1:
            raise ValueError(f"views {chosen} asked for an image model; images are scored on one centre crop (1x1)")
        dataset = _ImageItems(samples, build_transform(data_cfg, is_training=False))
        preprocessing = data_cfg.to_dict()
    loader = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers)
    scorer = _Scorer(num_classes, confusion)
    result = Evaluation(num_classes, scorer.per_class, views=chosen, class_names=names, confusion=scorer.confusion,
                        info={"format": split.format, "source": split.source, "matched_by": matched_by,
                              "label_set": label_set, "classes": len(split.classes), "files": len(samples),
                              "missing": len(split.missing), "missing_files": list(split.missing),
                              "preprocessing": preprocessing})
    bar = tqdm(total=len(samples), desc=desc, disable=not progress, dynamic_ncols=True)
    pending: dict[int, list] = {}  # sample -> [summed log-probs (logsumexp), views left, target]
    batch: list[tuple[int, torch.Tensor]] = []

    def run_batch() -> None:
        x = torch.stack([v for _, v in batch]).to(device)
        with _autocast(device, amp):
            log_probs = model(x).float().log_softmax(-1).cpu()
        done = []
        for (sample, _), lp in zip(batch, log_probs):
            entry = pending[sample]
            entry[0] = lp if entry[0] is None else torch.logaddexp(entry[0], lp)
            entry[1] -= 1
            if entry[1] == 0:
                done.append(pending.pop(sample))
        if done:  # log of the mean softmax over the views
            scorer.add(torch.stack([e[0] for e in done]) - math.log(len(chosen)), torch.tensor([e[2] for e in done]))
            bar.update(len(done))
        batch.clear()
        if progress:
            bar.set_postfix(top1=f"{100 * scorer.correct / max(scorer.count, 1):.2f}", skipped=len(result.skipped))

    for sample, (path, target, item) in enumerate(loader):
        if isinstance(item, str):
            result.skipped.append((path, item))
            bar.update(1)
            continue
        pending[sample] = [None, len(chosen), target]
        for view in _views_of(item, sampling if video else None, result):
            batch.append((sample, view))
            if len(batch) == batch_size:
                run_batch()
    if batch:
        run_batch()
    bar.close()
    result.loss_sum = scorer.loss_sum
    return result


def _views_of(item: Any, sampling: ViewSampling | None, result: Evaluation) -> Iterator[torch.Tensor]:
    if sampling is None:  # an image: one view
        yield item
        return
    frames, clips, short = item
    result.short += int(short)
    yield from sampling.iter_views(frames, clips)
