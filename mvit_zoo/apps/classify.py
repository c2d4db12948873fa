"""Classifying images and videos with a model and its label names: what `mvit-zoo predict` runs
(:mod:`mvit_zoo.apps.predict` parses its options) and `mvit-zoo validate` loads its model with.

A bad input (a missing or unreadable file, a checkpoint that does not fit the model, a device that is not there)
raises `CliError`. Non-finite outputs are refused (`NonFiniteOutputError`) rather than printed as `nan%`. Label
names are printed through :func:`printable`, with control characters escaped.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

import timm

from ..data.config import CONFIG_FILE, find_config
from ..data.folders import IMAGE_EXTENSIONS
from ..data.transforms import DataConfig, build_transform, resolve_data_config
from ..data.reader import VideoInfo, probe, read_frames, resolve_backend
from ..data.video import VIDEO_EXTENSIONS, is_video_file
from ..data.views import ViewSampling, decode_views
from ..weights.hub import CorruptCheckpointError, check_build_size, read_weights
from .cli import CliError
from .models import check_model_name, parse_model_kwargs
from .options import printable

__all__ = ["DATA_DIR", "NonFiniteOutputError", "find_inputs", "label_names_for", "load_label_set", "load_input",
           "load_model", "predict", "ranked", "resolve_decoder", "short_video_note"]

DATA_DIR = Path(__file__).resolve().parent.parent / "data"  # the label sets shipped with the package
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model_best.safetensors")
_LABEL_SET_BY_CLASSES = {1000: "imagenet-1k", 400: "kinetics-400"}
INPUT_EXTENSIONS = IMAGE_EXTENSIONS + VIDEO_EXTENSIONS
_CHECKPOINT_HINT = "pass a folder written by `mvit-zoo finetune` or a weights file (.safetensors, .pth, .bin)"


class NonFiniteOutputError(ValueError):
    """The model gave NaN or Inf scores: its weights, not the input, are at fault."""


def load_label_set(label_set: str) -> Optional[List[str]]:
    """The shipped class names of a label set (`imagenet-1k`, `kinetics-400`), if any."""
    path = DATA_DIR / f"{label_set}.txt"
    if not path.is_file():
        return None
    return path.read_text(encoding="utf-8").splitlines()


def label_names_for(model: nn.Module, num_classes: int) -> List[str]:
    """Class names for `model`'s outputs: its pretrained_cfg's names or label set, else indices."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    names = cfg.get("label_names")
    if names and len(names) == num_classes:
        return list(names)
    label_set = cfg.get("label_set") or _LABEL_SET_BY_CLASSES.get(num_classes)
    names = load_label_set(label_set) if label_set else None
    if names and len(names) == num_classes:
        return names
    return [f"class {i}" for i in range(num_classes)]


def _read_config(folder: Path) -> Dict[str, Any]:
    config = find_config(folder)  # validated; a malformed file is a one-line ConfigError
    return config.to_dict() if config is not None else {}


def _weights_in(folder: Path) -> Path:
    for name in _WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise CliError(f'no weights ({", ".join(_WEIGHT_FILES)}) in the --checkpoint folder {folder}; {_CHECKPOINT_HINT}')


def _read_state_dict(checkpoint: Path) -> Dict[str, torch.Tensor]:
    """The tensors of a `--checkpoint` file or folder, read without running code from it."""
    if not checkpoint.exists():
        raise CliError(f"no checkpoint found at '{checkpoint}': {_CHECKPOINT_HINT}")
    weights = _weights_in(checkpoint) if checkpoint.is_dir() else checkpoint
    if weights.suffix.lower() in INPUT_EXTENSIONS:
        raise CliError(f"--checkpoint {weights} is an image or video, not a checkpoint: give it as an input "
                       f"(mvit-zoo predict {weights} ...), and to --checkpoint {_CHECKPOINT_HINT}")
    try:
        return read_weights(weights, forget_if_corrupt=False)
    except CorruptCheckpointError as e:  # its message quotes the reader's error, which can be a page long
        raise CliError(f"--checkpoint {weights} is not a checkpoint (neither safetensors nor a weights-only torch "
                       f"pickle), or a truncated one; {_CHECKPOINT_HINT}") from e


def _load_weights(model: nn.Module, state_dict: Dict[str, torch.Tensor], checkpoint: str, name: str) -> None:
    """`model.load_state_dict(state_dict)`, or one line naming the keys and shapes that disagree."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    resized = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
               for k, v in own.items() if k in state_dict and state_dict[k].shape != v.shape]
    problems = [f'{len(keys)} {what} ({", ".join(keys[:3])}{", ..." if len(keys) > 3 else ""})'
                for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                   ("shapes differ: checkpoint vs model", resized)) if keys]
    if problems:
        raise CliError(f'checkpoint {checkpoint} does not fit {name}: {"; ".join(problems)}. Pass the --model and '
                       f'--model-kwargs it was trained with, or the folder written with it (its config.json '
                       f'names them)')
    model.load_state_dict(state_dict)


def load_model(
        name: Optional[str],
        checkpoint: Optional[str] = None,
        pretrained: bool = True,
        model_kwargs: Optional[Dict[str, Any]] = None,
) -> Tuple[nn.Module, List[str], DataConfig]:
    """Model (eval mode), its class names and its preprocessing.

    `checkpoint` is a folder written by `mvit-zoo finetune` (config.json + weights) or a
    weights file (safetensors or torch); with a folder the architecture, its arguments and the
    class names come from its `config.json`.
    """
    model_kwargs = dict(model_kwargs or {})
    config: Dict[str, Any] = {}
    state_dict = None
    if checkpoint:
        path = Path(checkpoint)
        state_dict = _read_state_dict(path)
        config = _read_config(path if path.is_dir() else path.parent)
        name = name or config.get("architecture")
        if not name:
            raise CliError(f"--model is needed: no {CONFIG_FILE} with an architecture next to {checkpoint}")
        model_kwargs = {**parse_model_kwargs(json.dumps(config.get("model_args", {}))), **model_kwargs}
        model_kwargs["num_classes"] = _num_classes(name, state_dict, config)
        pretrained = False
    assert name is not None
    check_model_name(name)
    if model_kwargs:
        # the arguments are tried on a weightless copy first: an error there is theirs, where a failure to
        # fetch the weights (the Hub, a download setting) is not
        try:
            with torch.device("meta"):
                timm.create_model(name, pretrained=False, **model_kwargs)
        except (TypeError, ValueError, RuntimeError) as e:  # an argument the model does not take, or a bad value
            source = f"--model-kwargs or {CONFIG_FILE}'s model_args" if config else "--model-kwargs"
            raise CliError(f"cannot build {name} with {source} {json.dumps(model_kwargs)} ({e}); pass only fields "
                           f"of its config, with values it accepts") from e
    if state_dict is not None:
        check_build_size(name, model_kwargs, state_dict, source=f"--model-kwargs / {CONFIG_FILE}'s model_args")
    tag_cfg = timm.models.get_pretrained_cfg(name) if state_dict is None and "num_classes" not in model_kwargs else None
    if tag_cfg is not None and not tag_cfg.num_classes:  # refused before its weights are downloaded
        raise CliError(f"{name} holds backbone weights only (no classifier), so there is nothing to predict: "
                       f"fine-tune it first (mvit-zoo finetune --model {name} ...), or take its features "
                       f"(mvit-zoo extract, features_only=True)")
    model = timm.create_model(name, pretrained=pretrained, **model_kwargs)
    if not getattr(model, "num_classes", 0):
        raise CliError(f"{name} has no classifier (num_classes=0), so there is nothing to predict; drop num_classes "
                       f"from --model-kwargs, or pass a checkpoint with a head")
    if state_dict is not None:
        _load_weights(model, state_dict, str(checkpoint), name)
    model.eval()
    labels = config.get("label_names") or label_names_for(model, model.num_classes)
    if len(labels) != model.num_classes:
        labels = [f"class {i}" for i in range(model.num_classes)]
    data_cfg = resolve_data_config(model, config.get("data_config", {}).get("sampling_rate"))
    if config.get("pretrained_cfg"):
        saved = config["pretrained_cfg"]
        data_cfg = DataConfig(
            input_size=data_cfg.input_size,
            mean=tuple(saved.get("mean", data_cfg.mean)), std=tuple(saved.get("std", data_cfg.std)),
            crop_pct=float(saved.get("crop_pct", data_cfg.crop_pct)),
            interpolation=saved.get("interpolation", data_cfg.interpolation),
            sampling_rate=data_cfg.sampling_rate,
            channel_order=config.get("data_config", {}).get("channel_order", data_cfg.channel_order),
        )
    return model, list(labels), data_cfg


def _num_classes(name: str, state_dict: Dict[str, torch.Tensor], config: Dict[str, Any]) -> int:
    """Class count of a checkpoint: from its config, else from the classifier's weight."""
    if config.get("num_classes"):
        return int(config["num_classes"])
    classifier = timm.models.get_pretrained_cfg_value(name.split(".")[0], "classifier") or "head"
    for key in (f"{classifier}.weight", "head.fc.weight", "head.weight", "fc.weight"):
        if key in state_dict:
            return int(state_dict[key].shape[0])
    raise CliError(f'cannot tell the class count of the checkpoint (no {classifier}.weight): pass the folder '
                   f'written with it (its {CONFIG_FILE} has num_classes), or --model-kwargs \'{{"num_classes": N}}\'')


def find_inputs(paths: Sequence[str]) -> List[Path]:
    """The files to classify: each file as given, and for a folder every image and video in it and its
    subfolders (sorted)."""
    found: List[Path] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            files = sorted(f for f in path.rglob("*") if f.suffix.lower() in INPUT_EXTENSIONS and f.is_file())
            if not files:
                raise CliError(f'no image or video files in the folder {path} (nor its subfolders); predict reads '
                               f'{", ".join(INPUT_EXTENSIONS)}')
            found += files
        elif path.is_file():
            found.append(path)
        else:
            raise CliError(f"no such file or folder: {path}; pass image or video files, or folders of them")
    return found


def resolve_decoder(name: str) -> Optional[str]:
    """The video backend of `--decoder`: None for 'auto' (the first that works here), else the one named,
    which must be installed (CliError naming its install command if not)."""
    if name == "auto":
        return None
    try:
        return resolve_backend(name)
    except ImportError as e:
        raise CliError(f"--decoder {name}: {e}; or pass --decoder auto") from e


def load_input(path: Path, data_cfg: DataConfig, decoder: Optional[str] = None,
               sampling: Optional[ViewSampling] = None, info: Optional[VideoInfo] = None) -> torch.Tensor:
    """One preprocessed input, `(C, H, W)` or `(C, T, H, W)` as the model expects.

    A video model sees its one test view, `sampling` (the model's `view_sampling(model, '1x1')`: the frames,
    resize and crop that `validate --views 1x1` scores; default: stride sampling from `data_cfg`), and an
    image given to it held for the whole clip. An image model sees a video's middle frame. Of a video only
    the frames used are decoded, with the backend `decoder` ('pyav', 'torchcodec'; None: the first available);
    `info` is a video's :func:`~mvit_zoo.data.reader.probe`, where the caller has it.
    """
    from PIL import Image, UnidentifiedImageError

    if data_cfg.is_video and sampling is None:
        sampling = ViewSampling(num_frames=data_cfg.num_frames, crop_size=tuple(data_cfg.input_size[-2:]),
                                sampling_rate=data_cfg.sampling_rate, crop_pct=data_cfg.crop_pct,
                                mean=tuple(data_cfg.mean), std=tuple(data_cfg.std),
                                channel_order=data_cfg.channel_order, interpolation=data_cfg.interpolation)
    if sampling is not None and len(sampling.views) != 1:
        raise ValueError(f"load_input makes one view; got sampling with views {sampling.views}")
    if is_video_file(path):
        try:
            if sampling is not None:
                frames, clips, _ = decode_views(path, sampling, backend=decoder, info=info)
                return next(sampling.iter_views(frames, clips))
            info = info or probe(path, decoder)
            frames, _ = read_frames(path, [info.num_frames // 2], backend=decoder, info=info)
        except ValueError as e:  # the reader's VideoError: not a video, no frames, refused by its limits
            raise CliError(_video_error(path, e)) from e
        return build_transform(data_cfg, is_training=False)(Image.fromarray(frames[0]))
    try:
        with open(path, "rb") as f:
            img = Image.open(f).convert("RGB")
    except UnidentifiedImageError as e:
        raise CliError(f'{path} is not an image Pillow can read, nor a video ({", ".join(VIDEO_EXTENSIONS)}); '
                       f'pass image or video files') from e
    except Image.DecompressionBombError as e:
        raise CliError(f"{path} is refused as a possible decompression bomb ({e}); pass a smaller image") from e
    except OSError as e:  # a truncated or damaged image file
        raise CliError(f"cannot read the image {path} ({e}); pass an intact image file") from e
    if sampling is not None:
        import numpy as np
        return next(sampling.iter_views(np.array(img)[None], [[0] * sampling.num_frames]))  # (a writable copy)
    return build_transform(data_cfg, is_training=False)(img)


def _video_error(path: Path, e: ValueError) -> str:
    """The one-line message for a video the reader could not or would not read: the problem and its fix."""
    reason = str(e).removeprefix(f"{path}: ")
    # NOTE: the reader's refusals (sizes, frame counts, durations over its limits) end with their own fix
    fix = "" if "; " in reason else "; pass a video with at least one decodable frame"
    return f"cannot read the video {path}: {reason}{fix}"


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, top_k: int = 5) -> List[Tuple[int, float]]:
    """Top-`k` (class index, probability) for one preprocessed input; ValueError if the outputs are
    not finite (NaN or Inf)."""
    device = next(model.parameters()).device
    logits = model(x.unsqueeze(0).to(device)).float()[0]
    return ranked(logits.softmax(-1), top_k)


def ranked(probs: torch.Tensor, k: int) -> List[Tuple[int, float]]:
    """Top-`k` (class index, probability) of class probabilities `(num_classes,)`; ValueError if they
    are not finite (NaN or Inf)."""
    if not torch.isfinite(probs).all():
        raise NonFiniteOutputError(f"the model gave non-finite outputs ({int((~torch.isfinite(probs)).sum())} of "
                         f"{probs.numel()} are NaN or Inf): its weights hold NaN/Inf, or the forward overflows; "
                         f"check the checkpoint and --model-kwargs")
    values, indices = probs.topk(min(k, probs.numel()))
    return [(int(i), float(v)) for i, v in zip(indices, values, strict=True)]


def _device(spec: str) -> torch.device:
    """The `--device`: 'auto' is CUDA when torch sees a GPU, else the CPU; others must work here."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:  # AssertionError: a torch built without that backend
        reason = str(e).strip().split(". ")[0] or type(e).__name__  # torch's first sentence says it
        raise CliError(f"--device {spec} cannot be used here ({reason}); pass --device cpu, or auto (a GPU when "
                       f"torch sees one)") from e
    return device


def short_video_note(path: Path, sampling: Any, info: VideoInfo) -> Optional[str]:
    """A note for a video with fewer frames than one clip spans (the clip repeats its last frame), as
    `validate` counts them; None for a long enough one. `sampling` is the model's
    :class:`~mvit_zoo.data.views.ViewSampling`, `info` the video's :func:`~mvit_zoo.data.reader.probe`."""
    count = info.num_frames
    if not sampling.is_short(count, info.fps):
        return None
    return (f"{printable(path)} has {count} frames, fewer than one clip of {sampling.num_frames} frames spans; "
            "its last frame is repeated")

