"""Data sources for training and evaluation: class-folder trees and the datasets' own annotation files.

Formats (:func:`detect_format` names them):

- ``folders``: ``DIR/<class>/<file>`` (or ``DIR/train/...`` and ``DIR/val/...``), classes the sorted
  folder names (:func:`mvit_zoo.data.folders.scan_data`).
- ``list``: one ``path label`` per line, as SlowFast, mmaction2 and pytorchvideo write them. The
  separator is a tab if the line holds one, else a comma if it holds one, else the last run of
  spaces, so a path with spaces needs no quoting and a path or label with a comma needs a tab.
  The label is an integer class index (SlowFast, mmaction2, pytorchvideo), or a class name in
  every line of the file; names are ordered by the given `classes`, else sorted. An optional first
  line names the columns (``path,label``). Paths are relative to `data_root` (SlowFast's
  ``DATA.PATH_PREFIX``, mmaction2's ``data_prefix``) or absolute.
- ``kinetics``: the CSVs of the Kinetics release (``label,youtube_id,time_start,time_end,split``
  and, in the first Kinetics-400 files, ``is_cc``), videos named
  ``<youtube_id>_<time_start:06d>_<time_end:06d>.mp4`` anywhere under `data_root`: flat as the
  CVDF archives extract, or in ``<label>/`` folders (ActivityNet's downloader, CVDF's
  ``arrange_by_classes.py``). Classes are the sorted label names, which for Kinetics-400 is the
  order of the shipped ``kinetics-400.txt`` (torchvision's, SlowFast's and mmaction2's order).
- ``ssv2``: Something-Something v2's ``labels.json`` (template -> index string; or
  ``something-something-v2-labels.json``) and split JSONs (``train.json`` / ``validation.json`` or
  ``something-something-v2-train.json`` ...: entries with ``id``, ``label``, ``template``,
  ``placeholders``), videos ``<id>.webm`` under `data_root`. A template's ``[something]`` brackets
  are dropped to find its class, as SlowFast and mmaction2 do; classes are in labels.json order.

Listed files that are not found are counted in :attr:`DatasetSplit.missing`, not fatal, unless
none is found. Malformed files raise :class:`AnnotationError` naming the file, the line (or JSON
entry), what was expected and what was found.
"""
from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from .folders import Samples, class_folder_samples, hold_out, scan_data, walk_files
from .video import VIDEO_EXTENSIONS

__all__ = ["FORMATS", "AnnotationError", "DatasetSplit", "detect_format", "read_annotations", "find_splits",
           "find_eval_split"]

FORMATS: Tuple[str, ...] = ("folders", "list", "kinetics", "ssv2")
PathLike = Union[str, os.PathLike]

_LIST_LAYOUT = "'path label' separated by a space, a comma or a tab"
_PATH_HEADERS = frozenset({"path", "paths", "video", "videos", "file", "filename", "video_path", "path_to_video"})
_LABEL_HEADERS = frozenset({"label", "labels", "class", "class_id", "class_index", "class_name", "target",
                            "category", "action"})
_SSV2_LABEL_FILES = ("labels.json", "something-something-v2-labels.json")
_SPLIT_WORD = re.compile(r"(?:^|[-_.])(train|val|validate|validation|test)(?:$|[-_.])")
_ANNOTATION_SUFFIXES = (".csv", ".txt", ".json", ".lst")


class AnnotationError(ValueError):
    """A malformed annotation file; the message names the file, the line and what was expected."""


@dataclass
class DatasetSplit:
    """One split: `classes` (index -> name), `samples` (absolute path, class index), the listed
    files not found (`missing`), the `format` read and the `source` file or folder."""

    classes: List[str]
    samples: Samples
    missing: List[str] = field(default_factory=list)
    format: str = "folders"
    source: str = ""


@dataclass
class _Row:
    where: str  # "line 12" or "entry 3 (id 4711)", for messages
    key: str  # list: the path as written; kinetics: the clip's file stem; ssv2: the video id
    label: Union[int, str]
    folder_hint: str = ""  # kinetics: the label, as a class-folder name


def _split_word(path: Path) -> Optional[str]:
    match = _SPLIT_WORD.search(path.stem.lower())
    return {"validate": "val", "validation": "val"}.get(match.group(1), match.group(1)) if match else None


def _annotation_files(folder: Path) -> Dict[str, List[Path]]:
    """Split files (`train`, `val`, `test` in the name) in `folder`, `folder/annotations` and `folder/labels`."""
    found: Dict[str, List[Path]] = {}
    for where in (folder, folder / "annotations", folder / "labels"):
        if not where.is_dir():
            continue
        for path in sorted(where.iterdir()):
            if path.is_file() and path.suffix.lower() in _ANNOTATION_SUFFIXES and path.name not in _SSV2_LABEL_FILES:
                word = _split_word(path)
                if word is not None:
                    found.setdefault(word, []).append(path)
    return found


def _has_class_folders(folder: Path, extensions: Tuple[str, ...]) -> bool:
    """True if `folder` (or `folder/train`) holds at least two folders with matching files directly in them."""
    root = folder / "train" if (folder / "train").is_dir() else folder
    count = 0
    for entry in sorted(root.iterdir()):
        if entry.is_dir() and any(p.name.lower().endswith(extensions) for p in entry.iterdir()):
            count += 1
            if count == 2:
                return True
    return False


def detect_format(path: PathLike, extensions: Tuple[str, ...] = VIDEO_EXTENSIONS) -> str:
    """The format of a data file or folder: ``folders``, ``list``, ``kinetics`` or ``ssv2``.

    A folder is ``folders`` unless it (or its ``annotations/`` or ``labels/``) holds split files
    (``train``/``val``/``test`` in the name), which give the format; a folder with both class
    folders and split files is ambiguous and raises naming both.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; give a class-folder tree or an annotation file")
    if path.is_file():
        if path.suffix.lower() == ".json":
            return "ssv2"
        with open(path, newline="", encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "")
        return "kinetics" if "youtube_id" in [c.strip() for c in first.split(",")] else "list"
    files = _annotation_files(path)
    if not files:
        return "folders"
    if _has_class_folders(path, extensions):
        named = ", ".join(str(p) for paths in files.values() for p in paths)
        raise AnnotationError(f"{path} holds both class folders and annotation files ({named}); "
                              "pass the data format (--data-format folders, or list / kinetics / ssv2)")
    chosen = files.get("train") or files.get("val") or files["test"]
    return detect_format(chosen[0])


def _parse_list(path: Path) -> List[_Row]:
    rows: List[_Row] = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for n, line in enumerate(lines, 1):
        text = line.strip()
        if not text:
            continue
        sep = "\t" if "\t" in text else ("," if "," in text else None)
        parts = [p.strip() for p in text.rsplit(sep, 1)]
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise AnnotationError(f"{path} line {n}: expected {_LIST_LAYOUT}, got {line!r}")
        if not rows and (parts[0].lower() in _PATH_HEADERS or parts[1].lower() in _LABEL_HEADERS):
            continue  # the column names
        if rows and isinstance(rows[0].label, int):
            try:
                label: Union[int, str] = int(parts[1])
            except ValueError:
                raise AnnotationError(f"{path} line {n}: label {parts[1]!r} is not an integer class index like "
                                      f"the labels before it ({rows[0].where}: {rows[0].label}); give every line "
                                      "an index, or every line a class name") from None
        else:
            label = int(parts[1]) if re.fullmatch(r"[+-]?\d+", parts[1]) and not rows else parts[1]
        if isinstance(label, int) and label < 0:
            raise AnnotationError(f"{path} line {n}: label {label} is negative (a test split without labels?); "
                                  "expected a class index 0, 1, ...")
        rows.append(_Row(f"line {n}", parts[0], label))
    return rows


def _parse_kinetics(path: Path) -> List[_Row]:
    rows: List[_Row] = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = [c.strip() for c in next(reader, [])]
        need = ["label", "youtube_id", "time_start", "time_end"]
        if "label" not in header and {"youtube_id", "time_start", "time_end"} <= set(header):
            raise AnnotationError(f"{path} line 1: no 'label' column ({','.join(header)}): a test split without "
                                  "labels; use the labelled train/val CSVs")
        if not set(need) <= set(header):
            raise AnnotationError(f"{path} line 1: expected the header label,youtube_id,time_start,time_end,split, "
                                  f"got {','.join(header)!r}")
        col = {name: header.index(name) for name in need}
        for values in reader:
            n = reader.line_num
            if not any(v.strip() for v in values):
                continue
            if len(values) != len(header):
                raise AnnotationError(f"{path} line {n}: expected {len(header)} comma-separated values "
                                      f"({','.join(header)}), got {len(values)}: {','.join(values)!r}")
            label, youtube_id = values[col["label"]].strip(), values[col["youtube_id"]].strip()
            try:
                start, end = (int(float(values[col[c]])) for c in ("time_start", "time_end"))
            except ValueError:
                raise AnnotationError(f"{path} line {n}: time_start and time_end must be numbers (seconds), got "
                                      f"{values[col['time_start']]!r} and {values[col['time_end']]!r}") from None
            if not label or not youtube_id:
                raise AnnotationError(f"{path} line {n}: empty label or youtube_id in {','.join(values)!r}")
            rows.append(_Row(f"line {n}", f"{youtube_id}_{start:06d}_{end:06d}", label, label))
    return rows


def _load_json(path: Path) -> object:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path} line {e.lineno} column {e.colno}: not valid JSON ({e.msg}); "
                              "re-download or repair the file") from None


def _ssv2_classes(split_file: Path) -> List[str]:
    """The templates of the labels.json next to `split_file`, in index order."""
    label_file = next((split_file.parent / n for n in _SSV2_LABEL_FILES if (split_file.parent / n).is_file()), None)
    if label_file is None:
        raise AnnotationError(f"{split_file}: the Something-Something v2 label file ({' or '.join(_SSV2_LABEL_FILES)})"
                              " is not next to it; put it in the same folder")
    table = _load_json(label_file)
    if not isinstance(table, dict) or not table:
        raise AnnotationError(f"{label_file}: expected a JSON object of template -> class index, got "
                              f"{type(table).__name__}")
    by_index: Dict[int, str] = {}
    for template, index in table.items():
        if not str(index).isdigit() or int(index) in by_index:
            raise AnnotationError(f"{label_file}: template {template!r} has the index {index!r}; expected each of "
                                  f"0..{len(table) - 1} once, as a string of digits")
        by_index[int(index)] = template
    if sorted(by_index) != list(range(len(table))):
        raise AnnotationError(f"{label_file}: the indices are not 0..{len(table) - 1}; re-download the file")
    return [by_index[i] for i in range(len(table))]


def _parse_ssv2(path: Path) -> List[_Row]:
    entries = _load_json(path)
    if not isinstance(entries, list):
        raise AnnotationError(f"{path}: expected a JSON list of videos (id, label, template, placeholders), got "
                              f"{type(entries).__name__}")
    rows: List[_Row] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "id" not in entry:
            raise AnnotationError(f"{path} entry {i}: expected an object with 'id' and 'template', got {entry!r:.80}")
        if "template" not in entry:
            raise AnnotationError(f"{path} entry {i} (id {entry['id']}): no 'template' (a test split without "
                                  "labels); use the labelled train/validation files")
        template = str(entry["template"]).replace("[", "").replace("]", "")
        rows.append(_Row(f"entry {i} (id {entry['id']})", str(entry["id"]), template))
    return rows


def _resolve_labels(rows: List[_Row], path: Path, classes: Optional[Sequence[str]],
                    default: Optional[List[str]]) -> Tuple[List[str], List[int]]:
    """The class list and each row's class index; unknown names and out-of-range indices raise."""
    if rows and isinstance(rows[0].label, int):
        names = list(classes) if classes is not None else [str(i) for i in range(max(int(r.label) for r in rows) + 1)]
        for r in rows:
            if int(r.label) >= len(names):
                raise AnnotationError(f"{path} {r.where}: class index {r.label} is out of range: there are "
                                      f"{len(names)} classes (0..{len(names) - 1})")
        return names, [int(r.label) for r in rows]
    names = list(classes) if classes is not None else (default or sorted({str(r.label) for r in rows}))
    lookup = {name: i for i, name in enumerate(names)}
    for r in rows:
        if r.label not in lookup:
            origin = "the given class list" if classes is not None else "the class list"
            raise AnnotationError(f"{path} {r.where}: label {r.label!r} is not one of the {len(names)} classes of "
                                  f"{origin} ({', '.join(map(repr, names[:3]))}, ...); fix the label or the list")
    return names, [lookup[str(r.label)] for r in rows]


class _VideoIndex:
    """Video files under a folder by file stem, walked once (for Kinetics clips and SSv2 ids)."""

    def __init__(self, root: Path, extensions: Tuple[str, ...]) -> None:
        self.root = root
        self.by_stem: Dict[str, List[str]] = {}
        for path in walk_files(root, extensions):
            self.by_stem.setdefault(os.path.splitext(os.path.basename(path))[0], []).append(path)

    def find(self, stem: str, folder_hint: str) -> Optional[str]:
        paths = self.by_stem.get(stem)
        if not paths:
            return None
        hinted = [p for p in paths if os.path.basename(os.path.dirname(p)) in (folder_hint,
                                                                                folder_hint.replace(" ", "_"))]
        return os.path.abspath((hinted or paths)[0])


def _read(path: Path, data_format: str, data_root: Path, classes: Optional[Sequence[str]],
          extensions: Tuple[str, ...], index: Dict[Path, _VideoIndex]) -> DatasetSplit:
    parse = {"list": _parse_list, "kinetics": _parse_kinetics, "ssv2": _parse_ssv2}.get(data_format)
    if parse is None:
        raise ValueError(f"unknown annotation format {data_format!r}; expected one of list, kinetics, ssv2")
    rows = parse(path)
    if not rows:
        raise AnnotationError(f"{path} is empty: it lists no videos; expected "
                              + {"list": _LIST_LAYOUT + " per line", "kinetics": "a row per clip under the header",
                                 "ssv2": "a list of {id, label, template, placeholders}"}[data_format])
    seen: Dict[str, str] = {}
    for r in rows:
        if r.key in seen:
            raise AnnotationError(f"{path} {r.where}: {r.key!r} is listed twice (also {seen[r.key]}); "
                                  "remove one of the two")
        seen[r.key] = r.where
    names, targets = _resolve_labels(rows, path, classes, _ssv2_classes(path) if data_format == "ssv2" else None)
    samples: Samples = []
    missing: List[str] = []
    if data_format == "list":
        for r, t in zip(rows, targets):
            file = os.path.abspath(os.path.join(data_root, r.key))
            (samples.append((file, t)) if os.path.exists(file) else missing.append(file))
    else:
        if data_root not in index:
            index[data_root] = _VideoIndex(data_root, extensions)
        suffix = ".mp4" if data_format == "kinetics" else ".webm"
        for r, t in zip(rows, targets):
            file = index[data_root].find(r.key, r.folder_hint)
            (samples.append((file, t)) if file is not None else missing.append(r.key + suffix))
    if not samples:
        raise FileNotFoundError(f"none of the {len(rows)} videos listed in {path} is under {data_root} (the first: "
                                f"{missing[0]}); give the folder that holds them as data_root (--data-root)")
    return DatasetSplit(names, samples, missing, data_format, str(path))


def read_annotations(path: PathLike, data_root: Optional[PathLike] = None, data_format: Optional[str] = None,
                     classes: Optional[Sequence[str]] = None,
                     extensions: Tuple[str, ...] = VIDEO_EXTENSIONS) -> DatasetSplit:
    """The samples of one annotation file (`list`, `kinetics` or `ssv2`; detected if not given).

    `data_root` (default: the file's folder) holds the videos; `classes` fixes the class order
    (names, or the names of the indices of an integer-labelled list).
    """
    path = Path(path)
    data_format = data_format or detect_format(path, extensions)
    root = Path(data_root) if data_root is not None else path.parent
    return _read(path, data_format, root, classes, extensions, {})


def _folder_split(root: Path, classes: List[str], extensions: Tuple[str, ...]) -> DatasetSplit:
    """A class-folder tree read with the given class order (unknown folders raise)."""
    folders = sorted(e.name for e in root.iterdir() if e.is_dir())
    unknown = [name for name in folders if name not in classes]
    if unknown:
        raise ValueError(f"class folder {root / unknown[0]} is not one of the {len(classes)} training classes; "
                         "rename or remove it")
    lookup = {name: classes.index(name) for name in folders}
    return DatasetSplit(classes, sorted(class_folder_samples(root, lookup, extensions)), [], "folders", str(root))


def _locate(data: Path, data_format: Optional[str], extensions: Tuple[str, ...]) -> Tuple[str, Dict[str, Path]]:
    """The format of `data` and its split files (none for a class-folder tree or a single file)."""
    if data_format is not None and data_format not in FORMATS:
        raise ValueError(f"unknown data format {data_format!r}; expected one of {', '.join(FORMATS)}")
    if not data.exists():
        raise FileNotFoundError(f"{data} does not exist; give a class-folder tree, an annotation file or a "
                                "folder holding a dataset's annotation files")
    if data.is_file():
        return data_format or detect_format(data, extensions), {}
    if data_format == "folders":
        return "folders", {}
    files = _annotation_files(data)
    fmt = data_format or detect_format(data, extensions)
    chosen: Dict[str, Path] = {}
    for word in ("train", "val"):
        paths = [p for p in files.get(word, []) if data_format is None or detect_format(p, extensions) == fmt]
        if len(paths) > 1:
            raise AnnotationError(f"{data} holds several {word} files ({', '.join(map(str, paths))}); pass the one "
                                  "to use as the data (--data FILE, and --val-data FILE)")
        if paths:
            chosen[word] = paths[0]
    if fmt != "folders" and not chosen:
        raise AnnotationError(f"{data} holds no {fmt} train or val file; expected train.csv / val.csv "
                              "(SlowFast, Kinetics) or train.json / validation.json with labels.json (SSv2)")
    return fmt, chosen


def find_splits(data: PathLike, data_root: Optional[PathLike] = None, data_format: Optional[str] = None,
                val_data: Optional[PathLike] = None, val_split: float = 0.0, seed: int = 0,
                extensions: Tuple[str, ...] = VIDEO_EXTENSIONS,
                classes: Optional[Sequence[str]] = None) -> Tuple[DatasetSplit, DatasetSplit]:
    """The (train, val) splits of `data`, for training; both have the training split's classes.

    `data` is a class-folder tree (:func:`scan_data`: ``train/`` and ``val/`` folders, else a
    held-out split), one annotation file, or a folder holding a dataset's annotation files as
    distributed (train and val files; videos under `data_root`, default that folder). The
    validation split is `val_data` if given, else the dataset's own, else a stratified
    `val_split` fraction of each class chosen by `seed` (none if 0).
    """
    data = Path(data)
    fmt, files = _locate(data, data_format, extensions)
    root = Path(data_root) if data_root is not None else (data if data.is_dir() else data.parent)
    index: Dict[Path, _VideoIndex] = {}
    if fmt == "folders":
        names, train_samples, val_samples = scan_data(data, extensions, 0.0 if val_data else val_split, seed)
        if classes is not None:
            unknown = [n for n in names if n not in classes]
            if unknown:
                raise ValueError(f"class folder {unknown[0]!r} of {data} is not one of the {len(classes)} given "
                                 "classes; rename or remove it")
            order = [list(classes).index(n) for n in names]
            names = list(classes)
            train_samples = [(p, order[t]) for p, t in train_samples]
            val_samples = [(p, order[t]) for p, t in val_samples]
        train = DatasetSplit(names, train_samples, [], "folders", str(data))
        val = DatasetSplit(names, val_samples, [], "folders", str(data))
    else:
        train_file = files.get("train", data if data.is_file() else None)
        if train_file is None:
            raise AnnotationError(f"{data} holds no train file (only {files['val']}); add it, or pass the "
                                  "training file as the data")
        train = _read(train_file, fmt, root, classes, extensions, index)
        val = (_read(files["val"], fmt, root, train.classes, extensions, index) if "val" in files and not val_data
               else DatasetSplit(train.classes, [], [], fmt, str(train_file)))
    if val_data is not None:
        val = find_eval_split(val_data, data_root if data_root is not None or data.is_file() else data,
                              data_format if data_format != "folders" else None, extensions, train.classes)
    elif not val.samples and fmt != "folders" and val_split > 0:
        kept, held = hold_out(train.samples, len(train.classes), val_split, seed)
        val = DatasetSplit(train.classes, held, [], fmt, train.source)
        train = DatasetSplit(train.classes, kept, train.missing, fmt, train.source)
    return train, val


def find_eval_split(data: PathLike, data_root: Optional[PathLike] = None, data_format: Optional[str] = None,
                    extensions: Tuple[str, ...] = VIDEO_EXTENSIONS,
                    classes: Optional[Sequence[str]] = None) -> DatasetSplit:
    """The split of `data` to evaluate: its val file or ``val/`` folder if it has one, else all of it
    (one annotation file, or a class-folder tree). Classes are those of that split alone
    (sorted names, or `classes`), for matching to a model's classes by name."""
    data = Path(data)
    fmt, files = _locate(data, data_format, extensions)
    root = Path(data_root) if data_root is not None else (data if data.is_dir() else data.parent)
    if fmt == "folders":
        folder = next((data / n for n in ("val", "validation") if (data / n).is_dir()), data)
        names = list(classes) if classes is not None else sorted(e.name for e in folder.iterdir() if e.is_dir())
        split = _folder_split(folder, names, extensions)
        if not split.samples:
            raise ValueError(f"no files with the extensions {', '.join(extensions)} in the class folders of {folder}")
        return split
    if data.is_file():
        return _read(data, fmt, root, classes, extensions, {})
    if "val" not in files:
        raise AnnotationError(f"{data} holds no val file (only {files['train']}); add it (val.csv, validate.csv, "
                              "validation.json ...), or pass the file to evaluate as the data")
    return _read(files["val"], fmt, root, classes, extensions, {})
