"""mvit-zoo: Multiscale Vision Transformers (MViT v1, MViTv2) for images and video.

`import mvit_zoo` registers every model with timm: `timm.create_model('mvit_v2_s_16x4.fb_k400')`. It imports
neither torch nor timm (so that the `mvit-zoo` command line answers at once): the models are registered when
timm is imported, before or after mvit_zoo (:mod:`mvit_zoo._registration`), and the public names below load
on first use.

Layout: `model/` the architecture and its registered variants, `ops/` every acceleration behind one
dispatch, `weights/` download, cache, conversion and publishing, `data/` transforms, folders, video I/O
and label sets, `apps/` the command-line tools, `detection` detection backbones.
"""
from __future__ import annotations

import importlib
from typing import Any

from . import _registration

__version__ = "0.1.0"

# the public names, defined in submodules that `import mvit_zoo` does not load: name -> module
_LAZY = {
    "MViT": ".model.mvit", "MViTCfg": ".model.mvit", "MODEL_CFGS": ".model.mvit", "make_cfg": ".model.mvit",
    "create_model": ".model.registry", "list_models": ".model.registry", "list_pretrained": ".model.registry",
    "MViTPretrainedCfg": ".model.registry",
    "evaluate": ".evaluation", "Evaluation": ".evaluation", "extract_features": ".extraction",
    "CheckpointMismatchError": ".weights.convert", "convert_state_dict": ".weights.convert",
    "detect_layout": ".weights.convert",
    "CorruptCheckpointError": ".weights.hub", "HashMismatchError": ".weights.hub",
    "UnsafeCheckpointError": ".weights.hub", "WeightsUnavailableError": ".weights.hub",
    "read_checkpoint": ".weights.hub", "save_safetensors": ".weights.hub",
}

__all__ = [
    "MViT", "MViTCfg", "MODEL_CFGS", "make_cfg", "create_model", "list_models", "list_pretrained",
    "convert_state_dict", "detect_layout", "read_checkpoint", "save_safetensors", "MViTPretrainedCfg",
    "CheckpointMismatchError", "CorruptCheckpointError", "HashMismatchError", "UnsafeCheckpointError",
    "WeightsUnavailableError", "evaluate", "Evaluation", "extract_features",
]

_registration.install()


def __getattr__(name: str) -> Any:
    """The public names in `_LAZY`, imported on first use (with the models registered with timm first)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    _registration.register()
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
