"""torch.hub entrypoints for mvit-zoo: works from a clone, without `pip install`.

From a clone (no network needed for the code; `source="local"` is an argument of torch.hub.load only):

    import torch
    model = torch.hub.load("path/to/mvit-zoo", "mvit_small", source="local", pretrained=True)
    video = torch.hub.load("path/to/mvit-zoo", "mvit_v2_s_16x4", source="local", pretrained="fb_ssv2")
    backbone = torch.hub.load("path/to/mvit-zoo", "mvit_backbone", "mvit_base", source="local")

From GitHub ("owner/name:ref"; the ":ref" spares torch.hub a request that looks up the default
branch, so a cached copy also works offline):

    torch.hub.list("mvit-zoo/mvit-zoo:main")  # every registered model, plus mvit_backbone
    print(torch.hub.help("mvit-zoo/mvit-zoo:main", "mvit_v2_s_16x4"))
    model = torch.hub.load("mvit-zoo/mvit-zoo:main", "mvit_small", pretrained=True)

torch.hub.list and torch.hub.help read GitHub repositories only: they take no `source` argument and
refuse a local path. From a clone the same list is `mvit_zoo.list_models() + ["mvit_backbone"]`, and
the help is each entrypoint's docstring.

torch.hub puts the repository on sys.path while it imports this file, so `import mvit_zoo` finds the
package next to it. There is one entrypoint per registered model (generated from
`mvit_zoo.list_models()`); each takes `pretrained` (False, True for the default tag, or a tag name
such as 'fb_k400') and the keyword arguments of `timm.create_model` (num_classes, img_size, in_chans,
drop_path_rate, pretrained_cfg_overlay=dict(file=...), ...).

Everything here that is not an entrypoint starts with '_': torch.hub lists every public callable of
this module as a model.
"""
from __future__ import annotations

from typing import Any as _Any
from typing import Callable as _Callable

import torch.nn as _nn

import mvit_zoo as _mvit_zoo

# import names that torch.hub checks before it calls an entrypoint
dependencies = ["torch", "timm", "safetensors", "huggingface_hub"]


def _resolve(name: str, pretrained: bool | str) -> tuple[str, bool]:
    """(name for create_model, whether to load weights). `name` is `arch` or `arch.tag`; a string
    `pretrained` picks the tag ('fb_k400' or 'mvit_v2_s_16x4.fb_k400') and means True."""
    if isinstance(pretrained, str):
        arch = name.split(".", 1)[0]
        tag = pretrained[len(arch) + 1:] if pretrained.startswith(arch + ".") else pretrained
        return f"{arch}.{tag}", True
    return name, bool(pretrained)


def _make_entrypoint(arch: str) -> _Callable[..., _nn.Module]:
    def entrypoint(pretrained: bool | str = False, **kwargs: _Any) -> _nn.Module:
        name, load = _resolve(arch, pretrained)
        model: _nn.Module = _mvit_zoo.create_model(name, pretrained=load, **kwargs)
        return model

    entrypoint.__name__ = entrypoint.__qualname__ = arch
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = (
        f"MViT `{arch}` (mvit_zoo.MODEL_CFGS['{arch}']), the same model as timm.create_model('{arch}', ...).\n\n"
        f"pretrained: False (random init), True (the default pretrained tag) or a tag name; the tags are\n"
        f"mvit_zoo.list_pretrained('{arch}.*'). Other keyword arguments go to timm.create_model.")
    return entrypoint


for _arch in _mvit_zoo.list_models():
    globals()[_arch] = _make_entrypoint(_arch)
del _arch


def mvit_backbone(name: str = "mvit_small", pretrained: bool | str = False,
                  out_indices: tuple[int, ...] = (0, 1, 2, 3), **kwargs: _Any) -> _nn.Module:
    """The feature extractor of model `name` (`arch` or `arch.tag`): timm's features_only wrapper.

    Called on images (B, C, H, W), or video (B, C, T, H, W) for a video model, it returns one map per
    stage in `out_indices`, (B, C_i, ceil(H / r_i), ceil(W / r_i)) with C_i and r_i as in its
    `feature_info` (reductions 4, 8, 16, 32; time keeps the patch stride). `pretrained` as for the
    model entrypoints; other keyword arguments go to timm.create_model.
    """
    model_name, load = _resolve(name, pretrained)
    backbone: _nn.Module = _mvit_zoo.create_model(model_name, pretrained=load, features_only=True,
                                                  out_indices=out_indices, **kwargs)
    return backbone
