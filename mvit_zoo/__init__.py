"""mvit-zoo: Multiscale Vision Transformers (MViT v1, MViTv2) for images and video."""
from .mvit import MODEL_CFGS, MViT, MViTCfg, make_cfg

__version__ = "0.1.0"
