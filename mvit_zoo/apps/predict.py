"""Classify an image or a video and print the top-5 classes.

Usage::

    mvit-zoo predict                                   # the shipped sample photo, mvit_base.fb_in1k
    mvit-zoo predict cat.jpg --model mvit_small.fb_in1k
    mvit-zoo predict clip.mp4 --model mvit_v2_s_16x4.fb_k400
    mvit-zoo predict photo.png --checkpoint runs/flowers   # a folder written by `mvit-zoo finetune`

Label names come from a fine-tuned folder's ``config.json`` (``label_names``), or from the
label set of the model's pretrained config (ImageNet-1k and Kinetics-400 lists ship with the
package). A video is read with PyAV and one centred clip of ``T`` frames every ``tau`` frames
is classified; an image given to a video model is repeated over time, and a video given to
an image model is reduced to its middle frame.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

import timm

from .finetune import DataConfig, build_transform, parse_model_kwargs, resolve_data_config
from ..data.config import CONFIG_FILE, find_config
from ..data.video import is_video_file, load_clip, read_video

__all__ = ['DATA_DIR', 'SAMPLE_IMAGE', 'label_names_for', 'load_label_set', 'load_model', 'predict',
           'configure_parser', 'run', 'main']

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
SAMPLE_IMAGE = DATA_DIR / 'chelsea.jpg'
DEFAULT_MODEL = 'mvit_base.fb_in1k'
_WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin', 'model_best.safetensors')
_LABEL_SET_BY_CLASSES = {1000: 'imagenet-1k', 400: 'kinetics-400'}


def load_label_set(label_set: str) -> Optional[List[str]]:
    """The shipped class names of a label set (``imagenet-1k``, ``kinetics-400``), if any."""
    path = DATA_DIR / f'{label_set}.txt'
    if not path.is_file():
        return None
    return path.read_text(encoding='utf-8').splitlines()


def label_names_for(model: nn.Module, num_classes: int) -> List[str]:
    """Class names for ``model``'s outputs: its pretrained_cfg's names or label set, else indices."""
    cfg = dict(getattr(model, 'pretrained_cfg', None) or {})
    names = cfg.get('label_names')
    if names and len(names) == num_classes:
        return list(names)
    label_set = cfg.get('label_set') or _LABEL_SET_BY_CLASSES.get(num_classes)
    names = load_label_set(label_set) if label_set else None
    if names and len(names) == num_classes:
        return names
    return [f'class {i}' for i in range(num_classes)]


def _read_config(folder: Path) -> Dict[str, Any]:
    config = find_config(folder)  # validated; a malformed file is a one-line ConfigError
    return config.to_dict() if config is not None else {}


def _weights_in(folder: Path) -> Path:
    for name in _WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f'no weights ({", ".join(_WEIGHT_FILES)}) in {folder}')


def load_model(
        name: Optional[str],
        checkpoint: Optional[str] = None,
        pretrained: bool = True,
        model_kwargs: Optional[Dict[str, Any]] = None,
) -> Tuple[nn.Module, List[str], DataConfig]:
    """Model (eval mode), its class names and its preprocessing.

    ``checkpoint`` is a folder written by ``mvit-zoo finetune`` (config.json + weights) or a
    weights file (safetensors or torch); with a folder the architecture, its arguments and the
    class names come from its ``config.json``.
    """
    model_kwargs = dict(model_kwargs or {})
    config: Dict[str, Any] = {}
    state_dict = None
    if checkpoint:
        path = Path(checkpoint)
        folder = path if path.is_dir() else path.parent
        config = _read_config(folder)
        weights = _weights_in(path) if path.is_dir() else path
        state_dict = timm.models.load_state_dict(str(weights))
        name = name or config.get('architecture')
        if not name:
            raise SystemExit(f'error: --model is needed: no {CONFIG_FILE} with an architecture next to {checkpoint}')
        model_kwargs = {**parse_model_kwargs(json.dumps(config.get('model_args', {}))), **model_kwargs}
        model_kwargs['num_classes'] = _num_classes(name, state_dict, config)
        pretrained = False
    assert name is not None
    model = timm.create_model(name, pretrained=pretrained, **model_kwargs)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    model.eval()
    labels = config.get('label_names') or label_names_for(model, model.num_classes)
    if len(labels) != model.num_classes:
        labels = [f'class {i}' for i in range(model.num_classes)]
    data_cfg = resolve_data_config(model, config.get('data_config', {}).get('sampling_rate'))
    if config.get('pretrained_cfg'):
        saved = config['pretrained_cfg']
        data_cfg = DataConfig(
            input_size=data_cfg.input_size,
            mean=tuple(saved.get('mean', data_cfg.mean)), std=tuple(saved.get('std', data_cfg.std)),
            crop_pct=float(saved.get('crop_pct', data_cfg.crop_pct)),
            interpolation=saved.get('interpolation', data_cfg.interpolation),
            sampling_rate=data_cfg.sampling_rate,
            channel_order=config.get('data_config', {}).get('channel_order', data_cfg.channel_order),
        )
    return model, list(labels), data_cfg


def _num_classes(name: str, state_dict: Dict[str, torch.Tensor], config: Dict[str, Any]) -> int:
    """Class count of a checkpoint: from its config, else from the classifier's weight."""
    if config.get('num_classes'):
        return int(config['num_classes'])
    classifier = timm.models.get_pretrained_cfg_value(name.split('.')[0], 'classifier') or 'head'
    for key in (f'{classifier}.weight', 'head.fc.weight', 'head.weight', 'fc.weight'):
        if key in state_dict:
            return int(state_dict[key].shape[0])
    raise SystemExit(f'error: cannot tell the class count of the checkpoint (no {classifier}.weight)')


def load_input(path: Path, data_cfg: DataConfig) -> torch.Tensor:
    """One preprocessed input, ``(C, H, W)`` or ``(C, T, H, W)`` as the model expects."""
    transform = build_transform(data_cfg, is_training=False)
    if is_video_file(path):
        if data_cfg.is_video:
            return load_clip(path, data_cfg.num_frames, data_cfg.sampling_rate, random_start=False,
                             transform=transform)
        from PIL import Image
        frames = read_video(path)
        return transform(Image.fromarray(frames[len(frames) // 2]))
    from PIL import Image
    with open(path, 'rb') as f:
        img = Image.open(f).convert('RGB')
    if data_cfg.is_video:
        import numpy as np
        frame = np.asarray(img)
        return transform(np.repeat(frame[None], data_cfg.num_frames, axis=0))
    return transform(img)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, top_k: int = 5) -> List[Tuple[int, float]]:
    """Top-``k`` (class index, probability) for one preprocessed input."""
    device = next(model.parameters()).device
    probs = model(x.unsqueeze(0).to(device)).float().softmax(-1)[0]
    values, indices = probs.topk(min(top_k, probs.numel()))
    return [(int(i), float(v)) for i, v in zip(indices, values)]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``predict`` options to ``parser``."""
    parser.description = __doc__.split('\n\n')[0]
    parser.add_argument('inputs', nargs='*', metavar='PATH',
                        help=f'image or video files (default: the shipped sample photo {SAMPLE_IMAGE.name})')
    parser.add_argument('--model', default=None,
                        help=f'NAME[.tag] (default: from --checkpoint\'s config.json, else {DEFAULT_MODEL})')
    parser.add_argument('--checkpoint', default=None, metavar='PATH',
                        help='a folder written by `mvit-zoo finetune` (config.json + model.safetensors) or a weights '
                             'file')
    parser.add_argument('--pretrained', action=argparse.BooleanOptionalAction, default=True,
                        help='load the pretrained weights of NAME[.tag] (default: yes; --no-pretrained: random init)')
    parser.add_argument('--model-kwargs', default=None, metavar='JSON', help='architecture overrides (JSON object)')
    parser.add_argument('--top-k', type=int, default=5, help='(default: %(default)s)')
    parser.add_argument('--device', default='auto', help="'cpu', 'cuda', ... (auto: CUDA if available)")
    parser.add_argument('--json', action='store_true', help='print one JSON object per input')


def run(args: argparse.Namespace) -> int:
    """Print the top-k classes of each input; returns the exit status."""
    name = args.model or (None if args.checkpoint else DEFAULT_MODEL)
    model, labels, data_cfg = load_model(name, args.checkpoint, args.pretrained, parse_model_kwargs(args.model_kwargs))
    device = args.device if args.device != 'auto' else ('cuda' if torch.cuda.is_available() else 'cpu')
    model.to(device)
    inputs = [Path(p) for p in args.inputs] or [SAMPLE_IMAGE]
    for path in inputs:
        if not path.is_file():
            print(f'error: no such file: {path}', file=sys.stderr)
            return 2
        top = predict(model, load_input(path, data_cfg), args.top_k)
        if args.json:
            print(json.dumps({'input': str(path), 'top': [
                {'index': i, 'label': labels[i], 'probability': p} for i, p in top]}))
        else:
            print(f'{path}:')
            for rank, (i, p) in enumerate(top, 1):
                print(f'  {rank}. {100 * p:6.2f}%  {labels[i]}  ({i})')
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='mvit-zoo predict')
    configure_parser(parser)
    return run(parser.parse_args(argv))


if __name__ == '__main__':
    sys.exit(main())
