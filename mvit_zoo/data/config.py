"""`config.json`: what a folder of weights is, read and written in one place.

The file is timm's (`timm.create_model('hf-hub:...')` and `'local-dir:...'` rebuild the model from it)
plus the data settings timm's PretrainedCfg has no field for::

    {
      "architecture": "mvit_v2_s_16x4",          # registered architecture (no tag)
      "num_classes": 174,
      "num_features": 768, "global_pool": "token",
      "model_args": {"img_size": [16, 224, 224], "num_classes": 174, ...},   # create_model overrides
      "pretrained_cfg": {"input_size": [3, 224, 224], "mean": [...], "std": [...], "crop_pct": 1.0,
                         "interpolation": "bilinear", ...},                     # timm PretrainedCfg fields
      "label_names": ["..."],                     # optional, one per class
      "data_config": {"num_frames": 16, "sampling_rate": 4, "frame_sampling": "segment",
                      "channel_order": "RGB", "test_views": [1, 3], "label_set": "ssv2", ...},
      "source": {"tag": "mvit_v2_s_16x4.fb_ssv2", "file": "...", "sha256": "...", "layout": "slowfast",
                 "description": "fine-tuned by mvit-zoo finetune"}           # optional provenance
    }

`frame_sampling` absent means 'stride' (T frames `sampling_rate` apart) and `channel_order` absent
means 'RGB'. `mvit-zoo finetune` and `mvit-zoo convert` / `publish` write it with `write_config`;
`mvit-zoo predict` and `convert` read it with `read_config`, which also reads the files those
commands wrote before `source` existed.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from ..files import atomic_write

__all__ = ["CONFIG_FILE", "DATA_FIELDS", "FRAME_SAMPLINGS", "INTERPOLATIONS", "LABEL_SET_CLASSES", "ConfigError",
           "ModelConfig", "check_model_args", "config_for_model", "data_fields", "find_config", "read_config",
           "write_config"]

CONFIG_FILE = "config.json"
# Data settings of MViTPretrainedCfg that timm's PretrainedCfg has no field for, kept in `data_config`
DATA_FIELDS = ("num_frames", "sampling_rate", "frame_sampling", "channel_order", "test_views", "label_set",
               "top1", "top5", "file_sha256")
FRAME_SAMPLINGS = ("stride", "segment")
CHANNEL_ORDERS = ("RGB", "BGR")
# resize filters: timm's image transforms take all of them, the video clip transforms the first three
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "box", "hamming", "lanczos")
VIDEO_INTERPOLATIONS = INTERPOLATIONS[:3]
# class count of each label set: a config whose head has another count (a fine-tuned one) is not that set's
LABEL_SET_CLASSES = {"imagenet-1k": 1000, "imagenet-21k-winter": 19168, "kinetics-400": 400, "kinetics-600": 600,
                     "ssv2": 174}
# architecture arguments that are sizes or counts (each number >= 1), and those that may be 0
_POSITIVE_ARGS = ("depths", "embed_dim", "num_heads", "img_size", "num_frames", "patch_kernel", "patch_stride",
                  "kernel_qkv", "stride_q", "stride_kv_adaptive", "mlp_ratio")
_NON_NEGATIVE_ARGS = ("num_classes", "patch_padding")
_SOURCE_FIELDS = ("tag", "file", "sha256", "layout", "description")


class ConfigError(ValueError):
    """A config.json that cannot be used; the message names the file, the field and what it should be."""


def _numbers(value: Any) -> Optional[list[Any]]:
    """The numbers of a number or a (nested) list of them; None if `value` holds anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return [value]
    if isinstance(value, (list, tuple)):
        out: list[Any] = []
        for v in value:
            inner = _numbers(v)
            if inner is None:
                return None
            out += inner
        return out
    return None


def check_model_args(model_args: Mapping[str, Any], where: str) -> None:
    """Refuse sizes and counts below their range in architecture arguments (`model_args` of a config.json,
    `--model-kwargs`): `ValueError` naming `where`, the key and the range, instead of a traceback from deep
    inside the model's constructor."""
    for key, value in model_args.items():
        low = 1 if key in _POSITIVE_ARGS else 0 if key in _NON_NEGATIVE_ARGS else None
        if low is None or value is None:
            continue
        numbers = _numbers(value)
        if numbers is None or not numbers or any(n < low or (key == "mlp_ratio" and n <= 0) for n in numbers):
            what = "above 0" if key == "mlp_ratio" else f">= {low}"
            raise ValueError(f"{where}: {key} must be a number or list of numbers {what}, got {value!r}")


def _plain(value: Any) -> Any:
    """JSON-ready: tuples -> lists, nested."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class ModelConfig:
    """The content of a config.json. `pretrained_cfg['input_size']` is `(C, H, W)`; a video model's
    frame count is `data_config['num_frames']`."""

    architecture: str
    num_classes: int
    model_args: Mapping[str, Any] = field(default_factory=dict)
    pretrained_cfg: Mapping[str, Any] = field(default_factory=dict)
    data_config: Mapping[str, Any] = field(default_factory=dict)
    label_names: Optional[tuple[str, ...]] = None
    num_features: Optional[int] = None
    global_pool: Optional[str] = None
    source: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check("config")

    # -- the fields readers need ---------------------------------------------------------------------

    @property
    def frame_sampling(self) -> str:
        return self.data_config.get("frame_sampling") or "stride"

    @property
    def channel_order(self) -> str:
        return self.data_config.get("channel_order") or "RGB"

    @property
    def num_frames(self) -> Optional[int]:
        return self.data_config.get("num_frames")

    @property
    def sampling_rate(self) -> Optional[int]:
        return self.data_config.get("sampling_rate")

    @property
    def mean(self) -> Optional[tuple[float, ...]]:
        return tuple(self.pretrained_cfg["mean"]) if "mean" in self.pretrained_cfg else None

    @property
    def std(self) -> Optional[tuple[float, ...]]:
        return tuple(self.pretrained_cfg["std"]) if "std" in self.pretrained_cfg else None

    @property
    def tag(self) -> Optional[str]:
        """The pretrained tag (`arch.tag`) the weights are, or were fine-tuned from, if recorded."""
        return self.source.get("tag")

    # -- validation and (de)serialisation ------------------------------------------------------------

    def _check(self, where: str) -> None:
        def bad(name: str, problem: str) -> ConfigError:
            return ConfigError(f"{where}: {name} {problem}; rewrite the file with `mvit-zoo convert` or fix that field")

        if not isinstance(self.architecture, str) or not self.architecture or "." in self.architecture:
            raise bad("architecture", f"must be a registered architecture name without tag, got {self.architecture!r}")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise bad("num_classes", f"must be an integer >= 0, got {self.num_classes!r}")
        for name in ("model_args", "pretrained_cfg", "data_config", "source"):
            if not isinstance(getattr(self, name), Mapping):
                raise bad(name, f"must be an object, got {type(getattr(self, name)).__name__}")
        if self.label_names is not None and (
                len(self.label_names) != self.num_classes or not all(isinstance(n, str) for n in self.label_names)):
            raise bad("label_names", f"must be {self.num_classes} strings (one per class), got {len(self.label_names)}")
        size = self.pretrained_cfg.get("input_size")
        if size is not None and (not isinstance(size, (list, tuple)) or len(size) != 3):
            raise bad("pretrained_cfg.input_size", f"must be [C, H, W], got {size!r}")
        channels = size[0] if isinstance(size, (list, tuple)) and size else 3
        for name in ("mean", "std"):
            value = self.pretrained_cfg.get(name)
            if value is not None and (not isinstance(value, (list, tuple)) or len(value) != channels or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
                raise bad(f"pretrained_cfg.{name}", f"must be a list of {channels} numbers (one per input channel), "
                                                    f"got {value!r}")
        if any(v <= 0 for v in self.pretrained_cfg.get("std") or ()):
            raise bad("pretrained_cfg.std", f"must be above 0, got {self.pretrained_cfg['std']!r}")
        crop_pct = self.pretrained_cfg.get("crop_pct")
        if crop_pct is not None and (isinstance(crop_pct, bool) or not isinstance(crop_pct, (int, float))
                                     or not 0 < crop_pct <= 1):
            raise bad("pretrained_cfg.crop_pct", f"must be a number in (0, 1], got {crop_pct!r}")
        interpolation = self.pretrained_cfg.get("interpolation")
        allowed = VIDEO_INTERPOLATIONS if self.data_config.get("num_frames") else INTERPOLATIONS
        if interpolation is not None and interpolation not in allowed:
            raise bad("pretrained_cfg.interpolation", f"must be one of {', '.join(allowed)}, got {interpolation!r}")
        try:
            check_model_args(self.model_args, "model_args")
        except ValueError as e:
            raise ConfigError(f"{where}: {e}; rewrite the file with `mvit-zoo convert` or fix that field") from None
        sampling = self.data_config.get("frame_sampling")
        if sampling is not None and sampling not in FRAME_SAMPLINGS:
            raise bad("data_config.frame_sampling", f"must be one of {FRAME_SAMPLINGS}, got {sampling!r}")
        order = self.data_config.get("channel_order")
        if order is not None and order not in CHANNEL_ORDERS:
            raise bad("data_config.channel_order", f"must be one of {CHANNEL_ORDERS}, got {order!r}")
        for name in ("num_frames", "sampling_rate"):
            value = self.data_config.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise bad(f"data_config.{name}", f"must be an integer >= 1, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON object (key order as timm writes it; empty optional parts left out)."""
        out: dict[str, Any] = {"architecture": self.architecture, "num_classes": self.num_classes}
        if self.num_features is not None:
            out["num_features"] = self.num_features
        if self.global_pool:
            out["global_pool"] = self.global_pool
        if self.label_names is not None:
            out["label_names"] = list(self.label_names)
        out["model_args"] = _plain(self.model_args)
        out["pretrained_cfg"] = _plain(self.pretrained_cfg)
        if self.data_config:
            out["data_config"] = _plain(self.data_config)
        if self.source:
            out["source"] = _plain(self.source)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "config.json") -> ModelConfig:
        """Parse and validate a config.json object; `where` names it in errors."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"{where}: expected a JSON object, got {type(d).__name__}")
        if "architecture" not in d:
            raise ConfigError(f"{where}: no 'architecture'; a config.json names the model it is for")
        pcfg = d.get("pretrained_cfg") or {}
        num_classes = d.get("num_classes", pcfg.get("num_classes") if isinstance(pcfg, Mapping) else None)
        if num_classes is None:
            raise ConfigError(f"{where}: no 'num_classes'")
        labels = d.get("label_names")
        source = d.get("source") or {}
        if isinstance(source, Mapping):
            source = {k: source[k] for k in _SOURCE_FIELDS if source.get(k) is not None}
        try:
            cfg = cls(
                architecture=d["architecture"], num_classes=num_classes, model_args=d.get("model_args") or {},
                pretrained_cfg=pcfg, data_config=d.get("data_config") or {},
                label_names=tuple(labels) if isinstance(labels, (list, tuple)) else labels,
                num_features=d.get("num_features"), global_pool=d.get("global_pool"), source=source,
            )
        except ConfigError as e:
            raise ConfigError(str(e).replace("config:", f"{where}:", 1)) from None
        except TypeError as e:
            raise ConfigError(f"{where}: {e}") from None
        return cfg



def _config_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path / CONFIG_FILE if path.is_dir() or path.suffix != ".json" else path


def read_config(path: str | os.PathLike) -> ModelConfig:
    """Read `path` (a config.json, or a folder holding one); `ConfigError` names what is wrong."""
    file = _config_path(path)
    if not file.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} at {file}")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{file}: not valid JSON ({e}); rewrite it or remove it") from None
    return ModelConfig.from_dict(data, where=str(file))


def find_config(weights: str | os.PathLike) -> Optional[ModelConfig]:
    """The config.json beside a weights file (or in a folder), or None if there is none."""
    path = Path(weights)
    file = path / CONFIG_FILE if path.is_dir() else path.with_name(CONFIG_FILE)
    return read_config(file) if file.is_file() else None


def write_config(path: str | os.PathLike, config: ModelConfig | Mapping[str, Any]) -> Path:
    """Write `config` to `path` (a config.json, or a folder) atomically: a temporary file, then a rename.
    A mapping is validated as `ModelConfig.from_dict` first."""
    file = _config_path(path)
    if not isinstance(config, ModelConfig):
        config = ModelConfig.from_dict(config, where=str(file))
    text = json.dumps(config.to_dict(), indent=2) + "\n"
    return atomic_write(file, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def data_fields(pretrained_cfg: Mapping[str, Any], keys: Sequence[str] = DATA_FIELDS) -> dict[str, Any]:
    """The `data_config` part of a (MViT)PretrainedCfg dict: the set fields among `keys`."""
    return {k: pretrained_cfg[k] for k in keys if pretrained_cfg.get(k) is not None}


# timm PretrainedCfg fields that describe where the weights of a tag live or how it was evaluated:
# not part of a config.json for other weights
_SOURCE_ONLY = ("url", "hf_hub_id", "hf_hub_filename", "tag", "file", "source", "state_dict", "architecture",
                "label_names", "label_descriptions", "label_offset", "test_input_size", "test_crop_pct",
                "pool_size", "test_pool_size", "custom_load", "hf_hub_revision")


def config_for_model(
        model: Any,
        *,
        model_args: Mapping[str, Any],
        pretrained_cfg: Mapping[str, Any],
        data_config: Mapping[str, Any],
        label_names: Optional[Sequence[str]] = None,
        source: Optional[Mapping[str, Any]] = None,
) -> ModelConfig:
    """The config of `model` (an mvit-zoo MViT as built): timm fields of `pretrained_cfg` (the data
    settings the weights expect), `input_size` and the class count from the model, the data fields
    `data_config` (None values and the default 'stride' frame sampling left out), `model_args` as
    `create_model` overrides."""
    import timm

    timm_fields = set(timm.models.PretrainedCfg.__dataclass_fields__) - set(_SOURCE_ONLY)
    pcfg = {k: v for k, v in pretrained_cfg.items() if k in timm_fields and v is not None}
    pcfg["input_size"] = (model.in_chans,) + tuple(model.img_size[-2:])
    pcfg["num_classes"] = model.num_classes
    data = {k: v for k, v in data_config.items() if v is not None}
    if data.get("frame_sampling") == "stride":
        del data["frame_sampling"]
    if LABEL_SET_CLASSES.get(data.get("label_set"), model.num_classes) != model.num_classes:
        del data["label_set"]  # the set the weights were fine-tuned from, not the classes of this head
    if getattr(model, "is_video", False):
        data["num_frames"] = int(model.img_size[0])
    pool = getattr(model, "global_pool", None)
    return ModelConfig(
        architecture=str(model.pretrained_cfg.get("architecture") or type(model).__name__),
        num_classes=int(model.num_classes), model_args=_plain(dict(model_args)), pretrained_cfg=_plain(pcfg),
        data_config=_plain(data), label_names=tuple(label_names) if label_names is not None else None,
        num_features=int(model.num_features), global_pool=pool if isinstance(pool, str) and pool else None,
        source={k: v for k, v in (source or {}).items() if v is not None},
    )
