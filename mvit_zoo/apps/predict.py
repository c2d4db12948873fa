"""Classify an image or a video and print the top-5 classes.

Usage::

    mvit-zoo predict                                   # the shipped sample photo, mvit_small.fb_in1k
    mvit-zoo predict cat.jpg --model mvit_base.fb_in1k
    mvit-zoo predict clip.mp4 --model mvit_v2_s_16x4.fb_k400
    mvit-zoo predict photos/                           # every image and video in a folder and its subfolders
    mvit-zoo predict photo.png --checkpoint runs/flowers   # a folder written by `mvit-zoo finetune`

Label names come from a fine-tuned folder's `config.json` (`label_names`), or from the
label set of the model's pretrained config (ImageNet-1k and Kinetics-400 lists ship with the
package). Of a video only the frames used are decoded (:mod:`mvit_zoo.data.reader`, `--decoder`): a video
model classifies its centre clip of `T` frames every `tau` frames at 30 fps, and an image model its
middle frame; an image given to a video model is repeated over time. A video whose header declares
frames or a frame count beyond the reader's limits is refused before anything is decoded.

A bad input (a missing or unreadable file, a checkpoint that does not fit the model, a device that is
not there) raises `CliError`, which `mvit-zoo` prints as one line; of several inputs, one that cannot
be read is skipped and listed, and the exit status is 1 at the end. Non-finite outputs are refused
rather than printed as `nan%` or written as JSON `NaN`. Label names are printed with control
characters escaped (`\x1b`), so a config.json cannot clear the terminal or fake output.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from .cli import CliError
from .options import add_decoder_argument, add_weight_arguments, positive_int
from .threads import add_threads_argument, apply_threads

__all__ = ["DATA_DIR", "DEFAULT_MODEL", "EXIT_SKIPPED", "SAMPLE_IMAGE", "configure_parser", "run", "main"]

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
SAMPLE_IMAGE = DATA_DIR / "chelsea.jpg"
DEFAULT_MODEL = "mvit_small.fb_in1k"
EXIT_SKIPPED = 1  # some inputs could not be read (the others were classified)



def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the `predict` options to `parser`."""
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("inputs", nargs="*", metavar="PATH",
                        help="image or video files, or folders of them (searched recursively; default: the shipped "
                             f"sample photo {SAMPLE_IMAGE.name})")
    parser.add_argument("--model", default=None,
                        help=f"NAME[.tag] (default: from --checkpoint's config.json, else {DEFAULT_MODEL})")
    add_weight_arguments(parser)
    parser.add_argument("--views", default=None, metavar="TxS",
                        help="video: average the scores of T clips x S crops (S = 1 or 3), as `validate` does")
    parser.add_argument("--top-k", type=positive_int, default=5, help="(default: %(default)s)")
    parser.add_argument("--device", default="auto", help="'cpu', 'cuda', ... (auto: CUDA if available)")
    add_threads_argument(parser)
    add_decoder_argument(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object per input")


def run(args: argparse.Namespace) -> int:
    """Print the top-k classes of each input; returns the exit status."""
    from ..evaluation import video_scores, view_sampling
    from ..data.reader import probe
    from ..data.video import is_video_file
    from .classify import (
        NonFiniteOutputError, _device, _video_error, find_inputs, load_input, load_model, predict, printable, ranked,
        resolve_decoder, short_video_note,
    )
    from .models import parse_model_kwargs

    apply_threads(args.threads)
    inputs = find_inputs(args.inputs) if args.inputs else [SAMPLE_IMAGE]
    decoder = resolve_decoder(args.decoder)
    device = _device(args.device)
    name = args.model or (None if args.checkpoint else DEFAULT_MODEL)
    model, labels, data_cfg = load_model(name, args.checkpoint, args.pretrained, parse_model_kwargs(args.model_kwargs))
    model.to(device)
    if not args.pretrained and not args.checkpoint:
        print(f"note: --no-pretrained: {name} has random weights, so its classes below mean nothing", file=sys.stderr)
    sampling = view_sampling(model, args.views or "1x1", data_cfg) if data_cfg.is_video else None
    one_view = view_sampling(model, "1x1", data_cfg) if data_cfg.is_video else None
    skipped: List[Tuple[Path, str]] = []
    for path in inputs:
        info = None  # a video's probe, read once for its input and its short-video note
        try:
            if is_video_file(path):
                try:
                    info = probe(path, decoder)
                except ValueError as e:  # the reader's VideoError: not a video, no frames, refused by its limits
                    raise CliError(_video_error(path, e)) from e
            if args.views and data_cfg.is_video and info is not None:
                try:
                    scores = video_scores(model, path, args.views, data_cfg=data_cfg, decoder=decoder, info=info)
                except ValueError as e:
                    raise CliError(_video_error(path, e)) from e
                top = ranked(scores, args.top_k)
            else:
                top = predict(model, load_input(path, data_cfg, decoder, one_view, info), args.top_k)
        except NonFiniteOutputError as e:  # the model's fault: every input would give the same
            raise CliError(f"{printable(path)}: {e}") from e
        except (CliError, ValueError, OSError) as e:  # this input cannot be read
            reason = str(e).removeprefix(f"{path}: ")
            if len(inputs) == 1:
                raise e if isinstance(e, CliError) else CliError(f"{printable(path)}: {printable(reason)}") from e
            skipped.append((path, reason))
            print(f"skipped {printable(path)}: {printable(reason)}", file=sys.stderr)
            continue
        note = short_video_note(path, sampling, info) if sampling is not None and info is not None else None
        if note:
            print(f"note: {note}", file=sys.stderr)
        if args.json:
            print(json.dumps({"input": str(path), "top": [
                {"index": i, "label": labels[i], "probability": p} for i, p in top]}, allow_nan=False))
        else:
            print(f"{printable(path)}:")
            for rank, (i, p) in enumerate(top, 1):
                print(f"  {rank}. {100 * p:6.2f}%  {printable(labels[i])}  ({i})")
    if skipped:
        print(f"{len(skipped)} of {len(inputs)} inputs could not be read (listed above); the others were classified",
              file=sys.stderr)
        return EXIT_SKIPPED
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`mvit-zoo predict ARGV`: the same parser and one-line errors as the `mvit-zoo` front."""
    from .cli import main as cli_main

    return cli_main(["predict", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
