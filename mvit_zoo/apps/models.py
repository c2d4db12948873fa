"""`--model` and `--model-kwargs` of the commands: checked with clear messages, and the model `finetune` trains."""
from __future__ import annotations

import argparse
import difflib
import inspect
import json
from dataclasses import fields
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

import timm

from ..data.config import check_model_args
from ..data.transforms import is_video_model
from ..weights.convert import CheckpointMismatchError
from ..weights.hub import check_build_size
from .cli import CliError
from .run_folder import start_from

__all__ = ["check_model_name", "create_finetune_model", "parse_model_kwargs", "resolve_model_kwargs"]


def _tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def parse_model_kwargs(text: Optional[str]) -> Dict[str, Any]:
    """`--model-kwargs` JSON object -> keyword arguments (JSON lists become tuples)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as e:
        raise CliError(f'--model-kwargs is not valid JSON ({e}); give an object, e.g. \'{{"img_size": 64}}\'') from e
    if not isinstance(value, dict):
        raise CliError(f'--model-kwargs must be a JSON object, got {text!r}; e.g. \'{{"img_size": 64}}\'')
    try:
        check_model_args(value, "--model-kwargs")
    except ValueError as e:
        raise CliError(str(e)) from None
    return _tuples(value)


def check_model_name(name: str) -> None:
    """A clear error for an unknown architecture (with close names) or pretrained tag; the one message of
    every command that takes `--model`."""
    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f'did you mean {", ".join(close)}?' if close else "see `timm.list_models('mvit*')`"
        raise CliError(f"--model {name}: unknown model; {hint}")
    if tag:
        tags = [n.partition(".")[2] for n in timm.list_pretrained(f"{arch}.*")]
        if tag not in tags:
            raise CliError(f'--model {name}: {arch} has no pretrained tag {tag!r}; available: '
                           f'{", ".join(tags) or f"none (name the architecture alone: --model {arch})"}')


def _valid_fields(arch: str) -> str:
    """The architecture arguments an mvit-zoo model accepts, for error messages."""
    from ..model.mvit import MViT, MViTCfg
    from ..model.registry import list_models

    if arch not in list_models():
        return f"see the constructor of the class behind timm.create_model({arch!r})"
    params = set(inspect.signature(MViT.__init__).parameters) - {"self", "cfg", "cfg_overrides"}
    return "valid fields: " + ", ".join(sorted(params | {f.name for f in fields(MViTCfg)} | {"num_frames"}))


def _meta_model(name: str, kwargs: Dict[str, Any]) -> nn.Module:
    """A weightless copy of the model (meta device), built to check `kwargs` and read the input kind."""
    arch = name.partition(".")[0]
    try:
        with torch.device("meta"):
            return timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:
        raise CliError(f"--model-kwargs {json.dumps(kwargs, default=list)}: {e}; {_valid_fields(arch)}") from e
    except ValueError as e:
        raise CliError(f"--model-kwargs {json.dumps(kwargs, default=list)}: {e}") from e


def resolve_model_kwargs(args: argparse.Namespace) -> Tuple[Dict[str, Any], bool]:
    """Architecture overrides of the run (`--model-kwargs` with `--img-size`/`--num-frames` merged
    in), checked on a weightless copy of the model; also whether the model takes video clips."""
    check_model_name(args.model)
    kwargs = parse_model_kwargs(args.model_kwargs)
    if (args.img_size or args.num_frames) and "img_size" in kwargs:
        raise CliError("the input size is given twice (--img-size/--num-frames and --model-kwargs img_size); "
                       "give it once")
    size = kwargs.pop("img_size", None)
    model = _meta_model(args.model, kwargs)  # at its own size: a too small one may not even build
    is_video = is_video_model(model)
    if args.num_frames and not is_video:
        raise CliError(f"--num-frames is for video models and {args.model} is an image model; drop it")
    if args.img_size or args.num_frames:
        if is_video:
            frames, height, width = tuple(model.img_size)
            size = (args.num_frames or frames, args.img_size or height, args.img_size or width)
        else:
            size = args.img_size
    if size is not None:
        _check_input_size(args.model, model, size)
        kwargs["img_size"] = size
        _meta_model(args.model, kwargs)
    return kwargs, is_video


def _check_input_size(name: str, model: nn.Module, size: Any) -> None:
    """A clear error for an input size below the model's `min_input_size` (its total stride)."""
    low = getattr(model, "min_input_size", None)
    if low is None:
        return
    grid = (size, size) if isinstance(size, int) else tuple(size)
    low = tuple(low)[-len(grid):]
    if any(s < m for s, m in zip(grid, low)):
        axes = ("T", "H", "W")[-len(grid):]
        what = ", ".join(f"{a}={s} (min {m})" for a, s, m in zip(axes, grid, low))
        m = max(low[-2:])
        raise CliError(f'input size {grid} is too small for {name}: {what}, its total stride; fix: a size of '
                       f'{m} or more (--img-size {m}, or "img_size": {m} in --model-kwargs)')


def _architecture_hint(weights: Path) -> str:
    """How to build the model that `weights` fit: the arguments its config.json records, if there is one."""
    from ..data.config import ConfigError, find_config

    try:
        config = find_config(weights)
    except (ConfigError, OSError):
        config = None
    if config is None:
        return "pass the --model and --model-kwargs the weights were trained with"
    return f"pass the arguments of the run that wrote it: {start_from(weights.parent)}"


def create_finetune_model(
        name: str,
        num_classes: int,
        pretrained: bool,
        model_kwargs: Dict[str, Any],
        pretrained_file: Optional[str] = None,
        drop_path_rate: Optional[float] = None,
) -> nn.Module:
    """The model with pretrained weights (if asked) and a `num_classes` head.

    The head of a pretrained tag is always new (freshly initialised). The head of a
    `pretrained_file` is kept when its class count matches (continuing a fine-tune),
    otherwise left out for a new one.
    """
    kwargs = dict(model_kwargs, num_classes=num_classes)
    if drop_path_rate is not None:
        kwargs["drop_path_rate"] = drop_path_rate
    if pretrained_file:
        # an unknown class count: the loader keeps a fitting classifier and leaves out another
        kwargs["pretrained_cfg_overlay"] = dict(file=str(pretrained_file), num_classes=None)
        fits = (f"--pretrained-file {pretrained_file} does not fit {name}"
                f"{' with these --model-kwargs' if model_kwargs else ''}")
        hint = _architecture_hint(Path(pretrained_file))
        try:
            check_build_size(name, {k: v for k, v in kwargs.items() if k != "pretrained_cfg_overlay"}, pretrained_file,
                             source="--model-kwargs")
        except CheckpointMismatchError as e:
            raise CliError(f"{fits} ({e}); {hint}") from e
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except CheckpointMismatchError as e:
            detail = str(e).split(": ", 1)[-1]  # after the loader's title, which names the tag, not the file
            raise CliError(f"{fits} ({detail}); {hint}") from e
    model = timm.create_model(name, pretrained=pretrained, **kwargs)
    if pretrained and model.pretrained_cfg.get("num_classes") == num_classes:
        model.reset_classifier(num_classes)  # the tag's own head was loaded: start a new one
    return model

