"""Per-clip features of every video (and image) of a folder or an annotation file, for downstream models.

Usage::

    mvit-zoo extract --model mvit_v2_s_16x4.fb_k400 --data videos/ --output features/
    mvit-zoo extract --model mvit_v2_s_16x4.fb_k400 --data k400/annotations/val.csv --data-root k400/videos/ \\
        --output k400-features/ --window-stride 32 --views 1x3 --device cuda --amp
    mvit-zoo extract --model mvit_v2_s_16x4.fb_k400 --data videos/ --output maps/ --layer stage2 --spatial-pool mean
    torchrun --nproc_per_node=4 -m mvit_zoo extract --model mvit_v2_s_16x4.fb_k400 --data videos/ --output features/

A video gives one row per window: clips of `num_frames x sampling_rate` frames at 30 fps starting every
`--window-stride` frames at 30 fps (default: one clip length, back-to-back windows), the last one ending on the
video's last frame (:mod:`mvit_zoo.extraction` states the rule exactly); each clip is the model's test view (centre
crop; `--views 1x3`: three crops averaged). `--layer pooled` is the vector the classifier reads
(`forward_head(forward_features(x), pre_logits=True)`), `logits` the class scores, `stageK` the map of
`model.stages[K]` `(C, T', H', W')`, or `(T', C)` with `--spatial-pool mean`. An image gives one row, without the
clip axis (a video model sees it held for a clip).

Output: `OUT/<path under the data root, extension replaced>.npy` (or `.safetensors`, tensor `features`), float32
`(num_clips, ...)`, and `OUT/index.jsonl`, one JSON line per input in data order: `source`, `file`, `frames`, `fps`,
`clips` (`[start_s, end_s]` of each), `shape`, `dtype`, `bytes`, `sha256` and `settings` (model, tag, checkpoint,
layer, views, window stride, preprocessing); an input that cannot be read has `error` instead, is counted, and makes
the exit status 1. Files are written atomically; a re-run skips the inputs whose line has the same settings and
whose file has the recorded bytes, so an interrupted extraction resumes (`--overwrite` redoes them). `--output`
must be a new or empty folder, or one this command wrote: files it did not write are never overwritten.

Under `torchrun` process `r` of `n` takes inputs `r, r + n, ...` of the data order and appends its lines to
`OUT/index.rank<r>.jsonl`; after all have finished, process 0 merges them into `index.jsonl` (a run that stopped
before that leaves them, and the next run reads and merges them).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from .cli import CliError
from .options import add_decoder_argument, add_weight_arguments, positive_int, printable
from .threads import add_threads_argument, apply_threads

__all__ = ["EXIT_FAILED", "LAYER_HELP", "check_output", "configure_parser", "main", "run"]

EXIT_FAILED = 1  # some inputs could not be read (the others were extracted)
LAYER_HELP = ("pooled (the classifier's input vector), logits, or stageK (the map of model.stages[K], K from 0); "
              "default: %(default)s")
# NOTE: copies of mvit_zoo.extraction's names, which imports torch
_FORMATS = ("npy", "safetensors")
_SPATIAL_POOLS = ("none", "mean")
_OWN_FILES = ("index.jsonl",)
_RANK_PREFIX, _RANK_SUFFIX = "index.rank", ".jsonl"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the `extract` options to `parser`."""
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("--model", default=None, help="NAME[.tag] (default: from --checkpoint's config.json)")
    parser.add_argument("--data", required=True, metavar="DIR|FILE",
                        help="a folder (every video and image under it) or an annotation file (path-label list, "
                             "Kinetics CSV, SSv2 JSON) whose videos are under --data-root")
    parser.add_argument("--data-root", default=None, metavar="DIR",
                        help="the folder the files of --data are under; output paths mirror theirs under it "
                             "(default: --data, or an annotation file's folder)")
    parser.add_argument("--output", required=True, metavar="DIR",
                        help="where the features and index.jsonl go: a new or empty folder, or one this command "
                             "wrote (a stopped run resumes)")
    add_weight_arguments(parser)
    parser.add_argument("--window-stride", type=positive_int, default=None, metavar="S",
                        help="frames at 30 fps between window starts (default: one clip, num_frames x sampling_rate)")
    parser.add_argument("--layer", default="pooled", help=LAYER_HELP)
    parser.add_argument("--spatial-pool", choices=_SPATIAL_POOLS, default="none",
                        help="stageK only: mean over H' and W', giving (T', C) per clip (default: %(default)s)")
    parser.add_argument("--views", choices=("1x1", "1x3"), default="1x1",
                        help="centre crop, or three crops whose features are averaged (default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=8,
                        help="windows decoded and run at once (x3 views with --views 1x3; default: %(default)s)")
    parser.add_argument("--workers", type=int, default=0,
                        help="data-loading processes, each decoding its own videos (default: %(default)s)")
    add_threads_argument(parser)
    add_decoder_argument(parser)
    parser.add_argument("--device", default="auto", help="'cpu', 'cuda', ... (auto: CUDA if available)")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (features are saved as float32)")
    parser.add_argument("--format", choices=_FORMATS, default="npy", help="(default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="redo the inputs a previous run finished (default: keep them)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="progress bar (default: yes)")


def _is_own(name: str) -> bool:
    return name in _OWN_FILES or (name.startswith(_RANK_PREFIX) and name.endswith(_RANK_SUFFIX))


def check_output(output: Path, data: Path, data_root: Optional[Path]) -> None:
    """CliError for an `--output` this command must not write to: inside the data, a file, a folder with a missing
    parent, or a non-empty folder that holds no index of a previous extraction."""
    out = output.resolve()
    for folder, flag in ((data if data.is_dir() else None, "--data"), (data_root, "--data-root")):
        if folder is not None and (out == folder.resolve() or folder.resolve() in out.parents):
            raise CliError(f"--output {output} is inside the data folder {folder} ({flag}): the features would be "
                           "mixed with the data; give a folder outside it")
    if output.exists() and not output.is_dir():
        raise CliError(f"--output {output} is a file; give a folder (new, or one this command wrote)")
    if not output.exists():
        if not output.parent.is_dir():
            raise CliError(f"the parent folder {output.parent} of --output does not exist; create it "
                           f"(mkdir -p {output.parent}) or give another --output")
        return
    names = os.listdir(output)
    if names and not any(_is_own(n) for n in names):
        raise CliError(f"--output {output} holds files this command did not write ({printable(sorted(names)[0])}, "
                       "...) and no index.jsonl; give a new or empty folder")


def _check_args(args: argparse.Namespace) -> None:
    data = Path(args.data)
    if not data.exists():
        raise CliError(f"--data {args.data} does not exist; give a folder of videos or images, or an annotation file")
    if args.data_root is not None and not Path(args.data_root).is_dir():
        raise CliError(f"--data-root {args.data_root} is not a folder; give the folder the listed videos are under")
    if args.workers < 0:
        raise CliError(f"--workers must be 0 or more, got {args.workers}")
    if not args.model and not args.checkpoint:
        raise CliError("--model NAME[.tag] is needed (or --checkpoint DIR, whose config.json names the model)")
    check_output(Path(args.output), data, Path(args.data_root) if args.data_root else None)


def run(args: argparse.Namespace) -> int:
    """Extract the features; returns the exit status (1 if some inputs could not be read)."""
    _check_args(args)
    apply_threads(args.threads, args.workers)
    import torch.distributed as dist
    from tqdm import tqdm

    from ..data.transforms import is_video_model
    from ..extraction import extract_files, find_sources, merge_index, read_index
    from .classify import load_model, resolve_decoder
    from .models import parse_model_kwargs
    from .trainer import init_distributed

    decoder = resolve_decoder(args.decoder)
    info, device = init_distributed(args.device)
    try:
        model, _, data_cfg = load_model(args.model, args.checkpoint, args.pretrained,
                                        parse_model_kwargs(args.model_kwargs))
        model.to(device)
        video = is_video_model(model)
        sources, missing = find_sources(args.data, args.data_root, args.format, videos=video)
        if not sources:
            raise CliError(f"no {'video or image' if video else 'image'} files in --data {args.data}"
                           + ("" if video else " (an image model reads images only)"))
        name = args.model or getattr(model, "pretrained_cfg", {}).get("architecture", "")
        settings = {"model": name.split(".")[0], "tag": name.split(".", 1)[1] if "." in name else None,
                    "checkpoint": str(Path(args.checkpoint).absolute()) if args.checkpoint else None,
                    "pretrained": bool(args.pretrained and not args.checkpoint), "amp": args.amp}
        if info.is_main and missing:
            print(f"note: {len(missing)} listed files are not there (the first: {printable(missing[0])})",
                  file=sys.stderr)
        bar = tqdm(total=len(range(info.rank, len(sources), info.world_size)), desc="extract", dynamic_ncols=True,
                   disable=not args.progress or not info.is_main)

        def progress(done: int, total: int) -> None:
            bar.n = done
            bar.refresh()

        try:
            summary = extract_files(
                model, sources, args.output, settings, layer=args.layer, spatial_pool=args.spatial_pool,
                views=args.views, window_stride=args.window_stride, data_cfg=data_cfg, batch_size=args.batch_size,
                workers=args.workers, amp=args.amp, decoder=decoder, fmt=args.format, overwrite=args.overwrite,
                rank=info.rank, world_size=info.world_size, progress=progress)
        finally:
            bar.close()
        if info.enabled:
            dist.barrier()
        if not info.is_main:
            return 0
        index = merge_index(args.output, sources)
    finally:
        if info.enabled and dist.is_initialized():
            dist.destroy_process_group()
    lines = read_index(args.output)
    failed = [(n, e["error"]) for n, e in lines.items() if "error" in e]
    for source, reason in failed:
        print(f"skipped {printable(source)}: {printable(reason)}", file=sys.stderr)
    print(f"{len(lines) - len(failed)} of {len(sources)} inputs extracted ({summary.written} now, "
          f"{summary.complete} kept from before{', in this process' if info.enabled else ''}); index: {index}")
    if failed:
        print(f"{len(failed)} inputs could not be read (listed above and in {index})", file=sys.stderr)
        return EXIT_FAILED
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`mvit-zoo extract ARGV`: the same parser and one-line errors as the `mvit-zoo` front."""
    from .cli import main as cli_main

    return cli_main(["extract", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
