"""mvit-zoo: Multiscale Vision Transformers (MViT v1, MViTv2) for images and video.

`import mvit_zoo` registers every model with timm: `timm.create_model('mvit_v2_s_16x4.fb_k400')`.

Layout: `model/` the architecture and its registered variants, `ops/` every acceleration behind one
dispatch, `weights/` download, cache, conversion and publishing, `data/` transforms, folders, video I/O
and label sets, `apps/` the command-line tools, `detection` detection backbones.
"""
from .evaluation import Evaluation, evaluate
from .model.mvit import MODEL_CFGS, MViT, MViTCfg, make_cfg
from .model.registry import MViTPretrainedCfg, create_model, list_models, list_pretrained
from .weights.convert import CheckpointMismatchError, convert_state_dict, detect_layout
from .weights.hub import (CorruptCheckpointError, HashMismatchError, UnsafeCheckpointError, WeightsUnavailableError,
                          read_checkpoint, save_safetensors)

__version__ = "0.1.0"

__all__ = [
    "MViT", "MViTCfg", "MODEL_CFGS", "make_cfg", "create_model", "list_models", "list_pretrained",
    "convert_state_dict", "detect_layout", "read_checkpoint", "save_safetensors", "MViTPretrainedCfg",
    "CheckpointMismatchError", "CorruptCheckpointError", "HashMismatchError", "UnsafeCheckpointError",
    "WeightsUnavailableError", "evaluate", "Evaluation",
]
