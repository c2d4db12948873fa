"""`mvit-zoo convert SRC [--model NAME] --output DIR [--overwrite]`: one checkpoint -> a Hub-ready folder.

The library function is `mvit_zoo.weights.publish.convert_checkpoint`.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

from .cli import CliError

__all__ = ["add_model_arg", "configure_parser", "parse_model_args", "run"]


def parse_model_args(items: Optional[Sequence[str]]) -> dict[str, Any]:
    """`--model-arg` KEY=VALUE pairs; VALUE is JSON when it parses (numbers, lists), else a string."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError(f"--model-arg expects KEY=VALUE, got {item!r} (e.g. --model-arg img_size=[16,224,224])")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out[key.strip().replace("-", "_")] = tuple(parsed) if isinstance(parsed, list) else parsed
    return out


def add_model_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-arg", action="append", metavar="KEY=VALUE", default=[],
                        help="architecture override, repeatable, VALUE as JSON: img_size=[32,288,288], "
                             "depths=[1,2,11,2], num_classes=10, pool_norm_eps=1e-5")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """`mvit-zoo convert SRC [--model NAME] --output DIR [--overwrite]`."""
    parser.description = ("Convert an MViT checkpoint (mvit-zoo/timm safetensors or a `mvit-zoo finetune` folder, "
                          "torchvision .pth, PySlowFast / pytorchvideo / facebookresearch/mvit .pyth, a file or URL) "
                          "into a Hub-ready folder: model.safetensors, config.json, README.md. The model is built "
                          "from the checkpoint (its config.json, the fields its layout implies, the input size of "
                          "its position tables) unless --model-arg says otherwise. The folder is built beside "
                          "DIR and moved into place whole; an existing DIR is replaced only with --overwrite, "
                          "and only if convert wrote it.")
    parser.add_argument("src", help="checkpoint file, folder with model.safetensors (+ config.json), or http(s) URL; "
                                    "a finetune run folder gives its last epoch's weights (model.safetensors); pass "
                                    "RUN/model_best.safetensors for the best epoch's")
    parser.add_argument("--model", default=None, metavar="NAME",
                        help="mvit-zoo architecture or pretrained tag (arch.tag): mvit_v2_s_16x4.fb_k400 (default: "
                             "the architecture named by the config.json beside SRC, as in a `mvit-zoo finetune` "
                             "folder)")
    parser.add_argument("--output", "--out", dest="output", required=True, metavar="DIR",
                        help="output folder, new or empty (--out is the old spelling)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace DIR if it exists; only a folder written by mvit-zoo convert (model.safetensors, "
                             "config.json, README.md and nothing else) is replaced, never other files")
    parser.add_argument("--sha256", help="expected SHA-256 (or prefix) of SRC")
    add_model_arg(parser)


def run(args: argparse.Namespace) -> int:
    from ..data.config import CONFIG_FILE
    from ..weights import hub
    from ..weights.convert import ArchitectureMismatchWarning
    from ..weights.publish import convert_checkpoint

    model_args = parse_model_args(args.model_arg)
    if not re.match(r"^https?://", args.src) and not Path(args.src).expanduser().exists():
        raise CliError(f"checkpoint not found: {args.src}; pass a checkpoint file, a folder or an http(s) URL")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ArchitectureMismatchWarning)
        folder, report = convert_checkpoint(args.src, args.model, args.output, model_args=model_args,
                                            sha256=args.sha256, overwrite=args.overwrite)
    for warning in caught:
        print(f"mvit-zoo convert: warning: {warning.message}", file=sys.stderr)
    print(f"{args.src}: {report.summary()}")
    print(f"wrote {folder / hub.WEIGHTS_NAME}, {folder / CONFIG_FILE}, {folder / 'README.md'}")
    return 0
