"""mvit-zoo: Multiscale Vision Transformers (MViT v1, MViTv2) for images and video.

`import mvit_zoo` registers every model with timm: `timm.create_model('mvit_v2_s_16x4.fb_k400')`. It imports
only what that needs; `evaluate`, `Evaluation` and the checkpoint helpers load on first use.

Layout: `model/` the architecture and its registered variants, `ops/` every acceleration behind one
dispatch, `weights/` download, cache, conversion and publishing, `data/` transforms, folders, video I/O
and label sets, `apps/` the command-line tools, `detection` detection backbones.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public names defined in submodules that `import mvit_zoo` does not load: name -> module
_LAZY = {
    "evaluate": ".evaluation", "Evaluation": ".evaluation",
    "CheckpointMismatchError": ".weights.convert", "convert_state_dict": ".weights.convert",
    "detect_layout": ".weights.convert",
    "CorruptCheckpointError": ".weights.hub", "HashMismatchError": ".weights.hub",
    "UnsafeCheckpointError": ".weights.hub", "WeightsUnavailableError": ".weights.hub",
    "read_checkpoint": ".weights.hub", "save_safetensors": ".weights.hub",
}

_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _check_torchvision() -> None:
    """Import torchvision (timm needs it), turning the error of a torchvision built for another torch
    (`operator torchvision::nms does not exist`) into one line with the fix."""
    try:
        import torchvision  # noqa: F401
    except RuntimeError as e:
        if "torchvision::nms does not exist" not in str(e):
            raise
        from importlib.metadata import version

        import torch

        build = "a CPU build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        index = f" --index-url {_CPU_INDEX}" if torch.version.cuda is None else ""
        raise ImportError(
            f"torchvision {version('torchvision')} was built for another torch than this torch "
            f"{torch.__version__} ({build}), so its compiled ops do not load ('torchvision::nms does not exist'); "
            f"install the two from one place: pip install --force-reinstall torch=={torch.__version__.split('+')[0]} "
            f"torchvision{index}") from None


_check_torchvision()

from .model.mvit import MODEL_CFGS, MViT, MViTCfg, make_cfg  # noqa: E402 - after the torchvision check
from .model.registry import MViTPretrainedCfg, create_model, list_models, list_pretrained  # noqa: E402

__all__ = [
    "MViT", "MViTCfg", "MODEL_CFGS", "make_cfg", "create_model", "list_models", "list_pretrained",
    "convert_state_dict", "detect_layout", "read_checkpoint", "save_safetensors", "MViTPretrainedCfg",
    "CheckpointMismatchError", "CorruptCheckpointError", "HashMismatchError", "UnsafeCheckpointError",
    "WeightsUnavailableError", "evaluate", "Evaluation",
]


def __getattr__(name: str) -> Any:
    """The public names in `_LAZY`, imported on first use."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
