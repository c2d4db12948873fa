"""What the commands share that imports no torch: option vocabularies, parser helpers, `printable`.

`mvit-zoo --help` and every `mvit-zoo COMMAND --help` build their parsers from modules that import no torch,
timm or numpy; the modules that define these names do.
"""
from __future__ import annotations

import argparse
from typing import Any

__all__ = [
    "DATA_FORMATS", "DEFAULT_HUB_ORG", "HUB_ORG_ENV", "RECIPE_NAMES", "SLOWFAST_TARGET_FPS", "VIDEO_BACKENDS",
    "add_decoder_argument", "add_weight_arguments", "positive_int", "printable",
]

# NOTE: copies of names defined in modules that import torch; tests/apps/test_cli.py checks that they agree
DATA_FORMATS: tuple[str, ...] = ("folders", "list", "kinetics", "ssv2")  # mvit_zoo.data.sources.FORMATS
VIDEO_BACKENDS: tuple[str, ...] = ("torchcodec", "pyav")  # mvit_zoo.data.reader.BACKENDS
RECIPE_NAMES: tuple[str, ...] = ("k400", "ssv2")  # sorted(mvit_zoo.data.recipes.RECIPES)
SLOWFAST_TARGET_FPS = 30.0  # mvit_zoo.data.views.SLOWFAST_TARGET_FPS
HUB_ORG_ENV = "MVIT_ZOO_HUB_ORG"  # mvit_zoo.weights.hub.HUB_ORG_ENV
DEFAULT_HUB_ORG = "mvit-zoo"  # mvit_zoo.weights.hub.DEFAULT_HUB_ORG


def positive_int(text: str) -> int:
    """An argparse `type`: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_weight_arguments(parser: argparse.ArgumentParser) -> None:
    """--checkpoint, --pretrained and --model-kwargs: what `load_model` takes besides the name."""
    parser.add_argument("--checkpoint", default=None, metavar="PATH",
                        help="a folder written by `mvit-zoo finetune` (config.json + model.safetensors: the weights "
                             "of the last epoch; give DIR/model_best.safetensors for the best epoch's) or a weights "
                             "file")
    parser.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                        help="load the pretrained weights of NAME[.tag] (default: yes; --no-pretrained: random init)")
    parser.add_argument("--model-kwargs", default=None, metavar="JSON", help="architecture overrides (JSON object)")


def add_decoder_argument(parser: argparse.ArgumentParser) -> None:
    """--decoder auto|pyav|torchcodec: the video backend of :mod:`mvit_zoo.data.reader`."""
    parser.add_argument("--decoder", choices=("auto", *VIDEO_BACKENDS), default="auto",
                        help="video decoding backend (default: auto, torchcodec where it works here, else pyav)")


def printable(text: Any) -> str:
    """`str(text)` with control and other non-printing characters (terminal escape sequences, carriage
    returns, bidirectional overrides) written as Python escapes, e.g. `\\x1b`."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(text))
