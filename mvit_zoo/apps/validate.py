"""Top-1/top-5 of a model on a dataset of images or videos (class folders or annotation files), multi-view for video.

Usage::

    mvit-zoo validate --model mvit_base.fb_in1k --data imagenet/            # DIR/val/<synset>/*.JPEG
    mvit-zoo validate --model mvit_v2_s_16x4.fb_k400 --data kinetics400/ --views 5x1
    mvit-zoo validate --model mvit_v2_s_16x4.fb_k400 --data k400/annotations/val.csv --data-root k400/videos/
    mvit-zoo validate --model mvit_v2_s_16x4.fb_ssv2 --data ssv2/labels/validation.json --data-root ssv2/videos/
    mvit-zoo validate --checkpoint runs/flowers --data flowers/ --results-file flowers.json
    mvit-zoo validate --model resnet18 --data imagenet/                     # any timm classifier

`--data` is a class-folder tree, an annotation file (a `path label` list as SlowFast and mmaction2 write
them, a Kinetics CSV, a Something-Something v2 JSON beside its labels.json) or a folder holding a dataset's
annotation files, whose val file is used; the videos a file lists are looked for under `--data-root`
(default: the file's folder), and those not found are counted and listed as missing. Folder names and
labels are matched to the model's classes by name (the checkpoint's `label_names`, else the label set of
the model's pretrained cfg: Kinetics names, ImageNet synsets or names), else by class index; an
integer-labelled list gives class indices. Video models are scored over `--views TxS` (temporal clips x
spatial crops; default: the tag's `test_views`) with the softmax scores averaged, as SlowFast's test, decoding
only the frames of the views (`--decoder`). A head of fewer than 5 classes reports top-k with k = its class
count (`top-2`, ...), not a top-5 that is 100% by construction.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..data.config import find_config
from .cli import CliError
from .options import DATA_FORMATS, add_decoder_argument, add_weight_arguments, positive_int, printable
from .threads import add_threads_argument, apply_threads

if TYPE_CHECKING:
    from ..evaluation import Evaluation

__all__ = ["configure_parser", "run"]

MISSING_SHOWN = 20  # missing files named on stderr; a results file lists them all


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the `validate` options to `parser`."""
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("--model", default=None, help="NAME[.tag] (default: from --checkpoint's config.json)")
    parser.add_argument("--data", required=True, metavar="DIR|FILE",
                        help="DIR/<class>/<file> or DIR/val/<class>/<file>; an annotation file (path-label list, "
                             "Kinetics CSV, SSv2 JSON); or a dataset folder holding its val file")
    parser.add_argument("--data-root", default=None, metavar="DIR",
                        help="the folder the videos of an annotation file are under (default: the file's folder)")
    parser.add_argument("--data-format", choices=DATA_FORMATS, default=None,
                        help="how to read --data (default: detected from it)")
    add_weight_arguments(parser)
    parser.add_argument("--views", default=None, metavar="TxS",
                        help="video: temporal clips x spatial crops, S = 1 or 3 (default: the tag's test_views)")
    parser.add_argument("--batch-size", type=positive_int, default=8,
                        help="views per forward pass, at least 1 (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=0, help="data-loading processes (default: %(default)s)")
    add_threads_argument(parser)
    add_decoder_argument(parser)
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    parser.add_argument("--device", default="auto", help="'cpu', 'cuda', ... (auto: CUDA if available)")
    parser.add_argument("--results-file", default=None, metavar="FILE.json|FILE.csv",
                        help="write the results (model, tag, views, preprocessing, counts, accuracy)")
    parser.add_argument("--per-class", action="store_true", help="print (and write) the accuracy of each class")
    parser.add_argument("--confusion", default=None, metavar="FILE.csv",
                        help="write the confusion matrix (rows: folder classes, columns: predicted classes)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="progress bar with the running accuracy (default: yes)")


def _checkpoint_classes(checkpoint: str | None) -> list[str] | None:
    if not checkpoint:
        return None
    config = find_config(checkpoint)
    return list(config.label_names) if config is not None and config.label_names else None


def _write_results(path: Path, row: dict) -> None:
    if path.suffix.lower() == ".csv":
        flat = {k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in row.items()
                if k not in ("per_class", "skipped_files")}
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(flat))
            writer.writeheader()
            writer.writerow(flat)
    elif path.suffix.lower() == ".json":
        path.write_text(json.dumps(row, indent=2) + "\n")
    else:
        raise CliError(f"--results-file {path}: the name must end in .json or .csv")


def _write_confusion(path: Path, result: Evaluation, folder_classes: list[int]) -> None:
    """Rows: the classes of the folders; columns: those classes, then any other predicted class."""
    assert result.confusion is not None
    predicted = sorted({p for _, p in result.confusion} - set(folder_classes))
    columns = folder_classes + predicted
    name = (lambda k: result.class_names[k]) if result.class_names else str
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["target \\ predicted", *map(name, columns)])
        for t in folder_classes:
            writer.writerow([name(t), *(result.confusion.get((t, p), 0) for p in columns)])


def _summary(row: dict, result: Evaluation, per_class: bool) -> str:
    topk, name = f"top-{result.k}", result.topk_name
    lines = [f"{'model':<14}{printable(row['model'])}"]
    for key in ("views", "matched_by", "count", "skipped", "missing", "short_videos"):
        if row.get(key) is not None:
            lines.append(f"{key:<14}{row[key]}")
    lines += [f"{'top-1':<14}{row['top1']:.3f}", f"{topk:<14}{row[name]:.3f}", f"{'loss':<14}{row['loss']:.4f}"]
    if per_class:
        lines.append(f"{'class':<40}{'n':>6}{'top-1':>9}{topk:>9}")
        lines += [f"{printable(c['label'])[:39]:<40}{c['count']:>6}{c['top1']:>9.2f}{c[name]:>9.2f}"
                  for c in result.class_accuracy()]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Evaluate, print the summary, write the files asked for; returns the exit status."""
    import torch

    from ..data.views import Views
    from ..evaluation import ClassMatchError, evaluate
    from .classify import load_model, resolve_decoder
    from .models import parse_model_kwargs

    apply_threads(args.threads, args.workers)
    if not args.model and not args.checkpoint:
        raise CliError("--model NAME[.tag] or --checkpoint DIR is needed")
    if args.results_file and Path(args.results_file).suffix.lower() not in (".json", ".csv"):
        raise CliError(f"--results-file {args.results_file}: the name must end in .json or .csv")
    if not Path(args.data).exists():
        raise CliError(f"--data {args.data}: no such file or folder; give a DIR/<class>/<file> tree (or DIR/val/...), "
                       "an annotation file, or a dataset folder")
    if args.data_root is not None and not Path(args.data_root).is_dir():
        raise CliError(f"--data-root {args.data_root}: no such folder; give the folder that holds the videos")
    decoder = resolve_decoder(args.decoder)
    if args.views is not None:
        Views.parse(args.views)  # a malformed TxS is reported before the model loads
    model, _, data_cfg = load_model(args.model, args.checkpoint, args.pretrained,
                                    parse_model_kwargs(args.model_kwargs))
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    class_names = _checkpoint_classes(args.checkpoint)
    try:
        result = evaluate(model, args.data, args.views, batch_size=args.batch_size, device=device, amp=args.amp,
                          workers=args.workers, class_names=class_names, data_cfg=data_cfg,
                          confusion=bool(args.confusion), progress=args.progress, data_root=args.data_root,
                          data_format=args.data_format, decoder=decoder)
    except ClassMatchError as e:
        what = "rename the folders" if e.problem.startswith("class folder") else "fix the labels"
        raise CliError(f"{printable(e.problem)}; {what}, or pass the --checkpoint whose config.json "
                       "lists their names (label_names)") from e
    name = args.model or getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
    arch, _, tag = name.partition(".")
    row = {"model": name, "architecture": arch, "tag": tag or None, "checkpoint": args.checkpoint,
           "data": str(args.data), "num_classes": result.num_classes, **result.to_dict(per_class=args.per_class)}
    if result.class_names is None:
        print(f"note: no class names for this {result.num_classes}-class head ship with the package; "
              "classes are given by index", file=sys.stderr)
    for path, reason in result.skipped:
        print(f"skipped {printable(path)}: {printable(reason)}", file=sys.stderr)
    missing = result.info.get("missing_files", [])
    for path in missing[:MISSING_SHOWN]:
        print(f"missing {printable(path)}: listed in {printable(result.info['source'])}, not found under the data "
              "root", file=sys.stderr)
    if len(missing) > MISSING_SHOWN:
        print(f"missing: {len(missing) - MISSING_SHOWN} more (all are in --results-file's missing_files)",
              file=sys.stderr)
    if result.short:
        print(f"note: {result.short} video(s) have fewer frames than one clip spans; their last frame is repeated",
              file=sys.stderr)
    print(_summary(row, result, args.per_class))
    if args.results_file:
        _write_results(Path(args.results_file), row)
    if args.confusion:
        folder_classes = sorted({int(k) for k in torch.nonzero(result.per_class[:, 0]).flatten().tolist()})
        _write_confusion(Path(args.confusion), result, folder_classes)
    return 0
