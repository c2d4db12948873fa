"""`mvit-zoo`, the command line: `mvit-zoo <command> [options]`.

Commands (each in its own module, which exposes `configure_parser(parser)` and `run(args) -> int`):

    convert   convert an upstream checkpoint into a Hub-ready folder      (mvit_zoo.apps.convert)
    publish   convert every official checkpoint, optionally upload them   (mvit_zoo.apps.publish)
    finetune  fine-tune a model on an image / video folder                (mvit_zoo.apps.finetune)
    predict   classify images or videos                                   (mvit_zoo.apps.predict)
    validate  top-1/top-5 on a folder of images or videos, multi-view       (mvit_zoo.apps.validate)
    extract   per-clip features of whole videos and images                (mvit_zoo.apps.extract)

A command's module is imported only when that command is named, so a command whose module cannot be
imported (a missing optional dependency, say) reports why, and the other commands keep working. The command
modules import no torch, timm or numpy at the top (their `run` imports what it needs), so `--help`, `--version`
and a usage error answer at once. A module's `prepare_parser(parser, argv)`, where it has one, sees the
command's arguments before they are parsed (`finetune --recipe` sets the other options' defaults).

A mistake in the input or the environment is printed as one line, `mvit-zoo CMD: error: ...`, with exit
code 2 (argparse's code for a usage error) and no traceback; `--debug`, before or after the command,
prints the traceback too. Any other exception is a bug and shows its traceback.

Output into a pipe that closes early (`mvit-zoo predict DIR | head`) ends the command quietly with exit
code 141 (128 + SIGPIPE, what a shell reports for a tool that the closed pipe stopped), no traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from types import ModuleType
from typing import NamedTuple, Optional, Sequence

__all__ = ["COMMANDS", "CliError", "EXIT_BROKEN_PIPE", "EXIT_USER_ERROR", "build_parser", "main"]

EXIT_USER_ERROR = 2  # a user error, as argparse exits on a bad argument
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: the reader of stdout closed it


class CliError(Exception):
    """A mistake in a command's input or environment: printed as one line (`mvit-zoo CMD: error: ...`,
    naming the problem and the fix), exit code 2, no traceback."""


class Command(NamedTuple):
    module: str
    configure: str  # name of the function that adds the command's arguments
    run: str  # name of the function that runs it
    help: str


_PREPARE = "prepare_parser"  # a command module's optional hook: prepare_parser(parser, argv) before parsing


COMMANDS: dict[str, Command] = {
    "convert": Command("mvit_zoo.apps.convert", "configure_parser", "run",
                       "convert a checkpoint (any upstream layout) into model.safetensors + config.json + README.md"),
    "publish": Command("mvit_zoo.apps.publish", "configure_parser", "run",
                       "convert every official checkpoint into Hub-ready folders (--push uploads them)"),
    "finetune": Command("mvit_zoo.apps.finetune", "configure_parser", "run",
                        "fine-tune a pretrained model on a folder of images or videos"),
    "predict": Command("mvit_zoo.apps.predict", "configure_parser", "run", "classify images or videos"),
    "validate": Command("mvit_zoo.apps.validate", "configure_parser", "run",
                        "top-1/top-5 on a class-folder tree, multi-view for video"),
    "extract": Command("mvit_zoo.apps.extract", "configure_parser", "run",
                       "per-clip features of every video (and image) of a folder or an annotation file"),
}


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("mvit-zoo")
    except Exception:  # noqa: BLE001 - running from a source tree
        return "unknown"


def _load(name: str) -> ModuleType:
    return importlib.import_module(COMMANDS[name].module)


def build_parser(command: Optional[str] = None, command_argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The `mvit-zoo` parser; only `command`'s module is imported to add its arguments, and its
    `prepare_parser`, if it has one, is given `command_argv` (the arguments after the command's name)."""
    parser = argparse.ArgumentParser(
        prog="mvit-zoo", description="Multiscale Vision Transformers (MViT v1, MViTv2) for images and video.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--debug", action="store_true", help="on an error, print its traceback too")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, spec in COMMANDS.items():
        p = sub.add_parser(name, help=spec.help, description=spec.help)
        # NOTE: SUPPRESS, so that a sub-parser without --debug keeps the front's value instead of resetting it
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="on an error, print its traceback too")
        if name == command:
            module = _load(name)
            getattr(module, spec.configure)(p)
            p.set_defaults(_run=getattr(module, spec.run))
            if hasattr(module, _PREPARE):
                getattr(module, _PREPARE)(p, command_argv)
    return parser


def _errors() -> tuple[type[BaseException], ...]:
    """Errors that mean 'the input or the environment is wrong': reported in one line, no traceback."""
    from ..weights.convert import CheckpointMismatchError
    from ..weights.hub import WeightsError

    return (CliError, WeightsError, CheckpointMismatchError, FileNotFoundError, NotADirectoryError,
            IsADirectoryError, PermissionError, ValueError)


def _message(command: str, e: BaseException) -> str:
    """A user error's message on one line (the type's name when it has none)."""
    text = str(e.code) if isinstance(e, SystemExit) else _describe(command, e)
    text = " ".join(text.split()).removeprefix("error: ")  # a command's SystemExit("error: ...")
    return text or f"{type(e).__name__} (run with --debug for its traceback)"


# where each command takes a local weight file instead of downloading the pretrained one
_LOCAL_WEIGHTS_FLAG = {"predict": "--checkpoint PATH", "finetune": "--pretrained-file FILE"}


def _describe(command: str, e: BaseException) -> str:
    """The one-line message of an error; missing weights get their fix in this command's flags (the
    error's own text gives it as create_model arguments)."""
    from ..weights.hub import WeightsUnavailableError

    flag = _LOCAL_WEIGHTS_FLAG.get(command)
    if not isinstance(e, WeightsUnavailableError) or not e.tag or flag is None:
        return str(e)
    fix = f"pass a weight file with {flag}, or --no-pretrained for random weights"
    if e.reason == "offline":
        fix += ", or unset HF_HUB_OFFLINE to download them"
    elif e.reason == "unreachable" and "Hub" in e.summary:
        fix += ", or set HF_ENDPOINT to a mirror you can reach"
    head = f"{e.tag} {e.summary}" if e.summary.startswith("has ") else f"{e.tag}: {e.summary}"
    return f"{head}; {fix}" + (f" ({e.details})" if e.details else "")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run `mvit-zoo ARGV` (default: sys.argv[1:]); returns the exit status."""
    try:
        try:
            return _main(argv)
        finally:
            # NOTE: a closed pipe shows when buffered output is flushed: here, not at interpreter exit
            sys.stdout.flush()
    except BrokenPipeError:
        # as Python's signal docs advise: point stdout at devnull, so that the flush at exit cannot fail again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


def _main(argv: Optional[Sequence[str]]) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command in COMMANDS:
        try:
            _load(command)
        except Exception as e:  # noqa: BLE001 - any import failure of that command's module
            print(f"mvit-zoo {command}: unavailable: cannot import {COMMANDS[command].module} "
                  f"({type(e).__name__}: {e})", file=sys.stderr)
            return 1
    if command not in COMMANDS:
        command = None
    parser = build_parser(command, argv[argv.index(command) + 1:] if command else ())
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:
        if not isinstance(e.code, str):  # sys.exit(status): the command's own exit status
            raise
        return _user_error(args, e)
    except _errors() as e:
        return _user_error(args, e)


def _user_error(args: argparse.Namespace, e: BaseException) -> int:
    if args.debug:
        traceback.print_exception(e)
    print(f"mvit-zoo {args.command}: error: {_message(args.command, e)}", file=sys.stderr)
    return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
