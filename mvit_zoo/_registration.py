"""Registering the models with timm without importing timm first.

`import timm` alone loads torch, torchvision and torch._dynamo (about 3-4 s), and `import mvit_zoo` runs before
every `mvit-zoo` command, `--help` included. So `import mvit_zoo` imports neither: it registers the models

* at once, when timm is already imported;
* else right after timm's module has executed, wherever that import comes from (`import timm`, `from timm
  import create_model`), through the small finder `install` puts on `sys.meta_path`, which removes itself then;
* and in any case when one of mvit_zoo's own model names (`mvit_zoo.create_model`, ...) is first used.

Registering is importing :mod:`mvit_zoo.model.registry` (its `@register_model` functions run).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from typing import Optional, Sequence

__all__ = ["install", "register"]

_REGISTRY = "mvit_zoo.model.registry"
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


def register() -> None:
    """Register the models with timm (imports torch and timm; a no-op once done)."""
    if _REGISTRY not in sys.modules:
        _check_torchvision()
        importlib.import_module(_REGISTRY)


class _AfterTimm(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for the top-level name `timm` it asks the finders after it for the spec and wraps
    the loader's `exec_module`, so that the models are registered right after timm's module has executed."""

    def find_spec(self, fullname: str, path: Optional[Sequence[str]],
                  target: Optional[types.ModuleType] = None) -> Optional[importlib.machinery.ModuleSpec]:
        if fullname != "timm":
            return None
        _uninstall()  # before anything else: the registry's own `import timm` must not come back here
        spec = importlib.util.find_spec(fullname)  # the other finders' answer
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_timm = spec.loader.exec_module

        def exec_module(module: types.ModuleType) -> None:
            _check_torchvision()
            exec_timm(module)
            # NOTE: timm is in sys.modules and fully executed here, so the registry's `import timm` finds it
            register()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


_FINDER = _AfterTimm()


def _uninstall() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


def install() -> None:
    """Register the models now if timm is imported, else once it is."""
    if "timm" in sys.modules:
        register()
    elif _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
