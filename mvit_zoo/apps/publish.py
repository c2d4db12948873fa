"""`mvit-zoo publish`: every official checkpoint -> Hub-ready folders, optionally uploaded.

The library function is `mvit_zoo.weights.publish.publish`.
"""
from __future__ import annotations

import argparse

from .convert import add_model_arg, parse_model_args
from .options import DEFAULT_HUB_ORG, HUB_ORG_ENV

__all__ = ["configure_parser", "run"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """`mvit-zoo publish`."""
    parser.description = ("Convert every official MViT checkpoint whose tag points at this project's Hub "
                          f"organisation (${HUB_ORG_ENV}, default {DEFAULT_HUB_ORG!r}) into Hub-ready "
                          "folders OUTPUT/<arch.tag>/ (replacing folders it wrote there before, never other files), "
                          "and with --push upload them. A file from --source-dir is published as the official "
                          "weights (the paper's provenance and accuracy in its card) only if its SHA-256 matches "
                          "the published one, or the one recorded when this machine downloaded the official URL; "
                          "any other is refused unless --allow-unverified.")
    parser.add_argument("--output", "--out", dest="output", default="hub-models", metavar="DIR",
                        help="output folder (default: %(default)s; --out is the old spelling)")
    parser.add_argument("--only", default="*", metavar="PATTERN", help="fnmatch pattern of tags (default: all)")
    parser.add_argument("--source-dir", metavar="DIR",
                        help="folder with local copies of the official files (named as in their URLs); "
                             "missing ones are downloaded")
    parser.add_argument("--allow-unverified", action="store_true",
                        help="publish a --source-dir file that no known hash confirms, with a card that says it is "
                             "converted from an unverified file and claims no provenance or accuracy; never with "
                             "--push (the official repositories hold verified files only)")
    parser.add_argument("--push", action="store_true", help="upload each folder (needs a Hugging Face token)")
    parser.add_argument("--list", action="store_true", help="print the tags that would be published and exit")
    add_model_arg(parser)


def run(args: argparse.Namespace) -> int:
    from ..weights import hub
    from ..weights.publish import official_tags, publish, tag_config

    if args.list:
        for tag in official_tags(args.only):
            cfg = tag_config(tag)
            print(f"{tag}\t{hub.hub_repo_id(cfg['hf_hub_id'])[0]}\t{cfg['url']}")
        return 0
    folders = publish(args.output, only=args.only, source_dir=args.source_dir, push=args.push,
                      model_args=parse_model_args(args.model_arg), allow_unverified=args.allow_unverified)
    print(f"{len(folders)} folder(s) in {args.output}")
    return 0
