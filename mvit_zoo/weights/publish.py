"""Upstream checkpoints -> Hub-ready folders (the library behind `mvit-zoo convert` and `mvit-zoo publish`).

A Hub-ready folder holds

* `model.safetensors`: the weights in mvit-zoo's layout, loadable with no conversion;
* `config.json`: timm-style, written by `mvit_zoo.data.config` (architecture, `model_args` including the
  architecture fields the source layout implies, data settings, label names, where the file came
  from), so `timm.create_model('hf-hub:<org>/<name>', pretrained=True)` and
  `timm.create_model('local-dir:<folder>', pretrained=True)` rebuild the model;
* `README.md`: the model card of that file (Hub metadata header, data, licence, source and its hash,
  usage, citation). Provenance and accuracy of a tag are claimed only for the tag's official file.

`publish` does this for every official checkpoint whose tag points at this project's Hub organisation
(`mvit_zoo.weights.hub.hub_org()`), and with `push` uploads each folder with huggingface_hub.

A folder is written whole: built in a staging folder beside it (`.<name>.convert-<random>.part`, holding
a `.mvit-zoo-convert` marker while it is written), then swapped in by two renames (the previous folder
aside to `.<name>.convert-<random>.old`, the new one in) and the previous one removed. An existing folder
is replaced only when asked (`overwrite`) and only if convert wrote it (its three files, the weights'
metadata naming their source); staging folders a killed convert left are removed by the next run.
"""
from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import socket
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from ..data.config import CONFIG_FILE, DATA_FIELDS, ModelConfig, config_for_model, find_config, write_config
from . import hub
from .convert import (ArchitectureMismatchWarning, ConversionReport, architecture_mismatches, architecture_overrides,
                      checkpoint_img_size, fit_state_dict, layout_architecture, to_native)

__all__ = ["OutputExistsError", "UnverifiedSourceError", "convert_checkpoint", "is_official_file", "model_card",
           "official_tags", "publish", "push_folder", "tag_config"]

DATASETS = {
    "imagenet-1k": "ImageNet-1k", "imagenet-21k-winter": "ImageNet-21k (winter 2021)",
    "kinetics-400": "Kinetics-400", "kinetics-600": "Kinetics-600", "ssv2": "Something-Something v2",
}
HF_DATASETS = {"imagenet-1k": "imagenet-1k", "kinetics-400": "kinetics-400", "kinetics-600": "kinetics-600",
               "ssv2": "something-something-v2", "imagenet-21k-winter": "imagenet-21k"}
UPSTREAM = [  # (URL part, project, licence of the project that publishes the file)
    ("download.pytorch.org", "torchvision (pytorch/vision)", "BSD-3-Clause"),
    ("/pytorchvideo/", "PyTorchVideo (facebookresearch/pytorchvideo)", "Apache-2.0"),
    ("/pyslowfast/", "PySlowFast (facebookresearch/SlowFast)", "Apache-2.0"),
    ("/mvit/", "facebookresearch/mvit", "Apache-2.0"),
]
# data_config fields that describe a tag's official file, not other weights of the same architecture
_OFFICIAL_ONLY = ("top1", "top5", "test_views", "file_sha256")
CITATION_V1 = """@inproceedings{fan2021multiscale,
  title={Multiscale Vision Transformers},
  author={Fan, Haoqi and Xiong, Bo and Mangalam, Karttikeya and Li, Yanghao and Yan, Zhicheng and Malik, Jitendra and Feichtenhofer, Christoph},
  booktitle={ICCV},
  year={2021}
}"""  # noqa: E501
CITATION_V2 = """@inproceedings{li2022mvitv2,
  title={MViTv2: Improved Multiscale Vision Transformers for Classification and Detection},
  author={Li, Yanghao and Wu, Chao-Yuan and Fan, Haoqi and Mangalam, Karttikeya and Xiong, Bo and Malik, Jitendra and Feichtenhofer, Christoph},
  booktitle={CVPR},
  year={2022}
}"""  # noqa: E501


FOLDER_FILES = (hub.WEIGHTS_NAME, CONFIG_FILE, "README.md")  # what a converted folder holds
STAGING_MARKER = ".mvit-zoo-convert"  # in a staging folder while convert writes it: {"pid", "host", "time"}
STALE_STAGING_SECONDS = 24 * 3600.0  # a marked staging folder of another host untouched this long is stale
# NOTE: the metadata keys convert writes into model.safetensors: with the file names, what marks a folder as its own
_CONVERT_METADATA = ("source", "source_sha256", "source_layout")


class OutputExistsError(hub.WeightsError):
    """The output path exists and convert may not replace it (a file, a folder without `overwrite`, or a
    folder convert did not write)."""


class UnverifiedSourceError(hub.WeightsError):
    """A file offered as a tag's official checkpoint matches no hash known for it."""


# --------------------------------------------------------------------------------------------------
# Tags
# --------------------------------------------------------------------------------------------------

_DATA_KEYS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std", "first_conv", "classifier",
              "paper_name", "paper_ids", "label_set", "num_frames", "sampling_rate", "frame_sampling", "channel_order")


def tag_config(name: str) -> dict[str, Any]:
    """The pretrained cfg of `arch.tag` as a dict. For a bare `arch`, only the data settings of its
    default tag (the weights being converted are not that tag's: no source, accuracy or `arch`)."""
    import timm

    from ..model.mvit import MODEL_CFGS
    from ..model.registry import create_model  # noqa: F401 - registers the models

    arch, _, tag = name.partition(".")
    if arch not in MODEL_CFGS:
        raise ValueError(f"unknown mvit-zoo model {arch!r}; known: {', '.join(MODEL_CFGS)}")
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError:
        tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{arch}.*")]
        raise ValueError(f"unknown pretrained tag {tag!r} for {arch}; available: {', '.join(tags) or 'none'}") from None
    data = asdict(cfg) if cfg is not None and is_dataclass(cfg) else dict(cfg or {})
    return data if tag else {k: data[k] for k in _DATA_KEYS if data.get(k) is not None}


def official_tags(pattern: str = "*") -> list[str]:
    """Tags whose weights this project publishes: an official checkpoint URL, and a Hub repository in
    this project's organisation (the 2-D ImageNet tags load timm's repositories instead)."""
    import timm

    from ..model.registry import list_pretrained

    out = []
    for name in list_pretrained():
        cfg = timm.models.get_pretrained_cfg(name)
        repo = getattr(cfg, "hf_hub_id", None) or ""
        if getattr(cfg, "url", None) and repo.split("/")[0] in (hub.DEFAULT_HUB_ORG, hub.hub_org()):
            if fnmatch.fnmatch(name, pattern):
                out.append(name)
    return out


# --------------------------------------------------------------------------------------------------
# Converting one checkpoint
# --------------------------------------------------------------------------------------------------

def _head_classes(sd: Mapping[str, torch.Tensor]) -> int:
    return int(sd["head.fc.weight"].shape[0]) if "head.fc.weight" in sd else 0


def _upstream(url: Optional[str]) -> tuple[str, str]:
    for part, project, licence in UPSTREAM:
        if url and part in url:
            return project, licence
    return "a local checkpoint", "see its source"


@dataclass(frozen=True)
class _Provenance:
    """What the card may say about the converted file."""

    source: str  # file path or URL it was read from
    sha256: str
    layout: str
    official: bool  # the tag's official file (publish, the tag's URL, or a matching published hash)
    changed: tuple[str, ...] = ()  # what conversion did beyond renaming (resized tables, adapted stem)
    base: Optional[ModelConfig] = None  # the config.json found beside the source file


def model_card(name: str, config: ModelConfig, provenance: _Provenance, *, num_params: int,
               upstream_url: Optional[str] = None) -> str:
    """README.md for a converted folder (Hub metadata header + card) that describes the file it was made
    from: a tag's provenance and published accuracy only for that tag's official file, and a usage
    snippet that loads this folder unless the folder is that official file."""
    pcfg, data = config.pretrained_cfg, config.data_config
    arch = config.architecture
    label_set = data.get("label_set")
    video = config.num_frames is not None
    tag_project, tag_licence = _upstream(upstream_url or provenance.source)  # who publishes the tag's file
    project = tag_project if provenance.official else _upstream(provenance.source)[0]
    hub_licence = (pcfg.get("license") or "apache-2.0").lower()
    v1 = "arXiv:2104.11227" in str(pcfg.get("paper_ids", "")) or arch.startswith(("mvit_b", "mvit_v1"))
    tag = name if "." in name else None
    lines = ["---", "tags:", f"- {'video-classification' if video else 'image-classification'}", "- timm",
             "- mvit-zoo", "library_name: timm", f"license: {hub_licence}"]
    if label_set in HF_DATASETS:
        lines += ["datasets:", f"- {HF_DATASETS[label_set]}"]
    lines += ["---", f"# Model card for {name}", ""]
    what = f"{'MViT v1' if v1 else 'MViTv2'} {'video' if video else 'image'} classifier"
    dataset = DATASETS.get(label_set, "its dataset")
    if provenance.official:
        lines.append(f"{what} trained on {dataset} by the paper's authors, converted from the {project} checkpoint "
                     f"to mvit-zoo's safetensors layout.")
    else:
        base = provenance.base
        origin = (f" Its config.json says: {base.source['description']}." if base and base.source.get("description")
                  else "")
        lines.append(f"{what} converted from `{provenance.source}`, a {provenance.layout}-layout checkpoint, to "
                     f"mvit-zoo's safetensors layout.{origin} It is not a verified copy of an official checkpoint"
                     f"{f' of {tag}' if tag else ''}, so how it was trained and how accurate it is are not known "
                     f"to this card" + (f"; it uses the data settings of {tag}." if tag else "."))
    if provenance.changed:
        lines += ["", f"Conversion changed the weights: {'; '.join(provenance.changed)}."]
    else:
        lines += ["", "The weights are unchanged: only tensor names (and fused q/k/v projections) differ from the "
                  "source file."]
    lines += ["", "## Model details",
              f"- **Architecture:** `{arch}` (mvit-zoo; registered with timm on `import mvit_zoo`)",
              f"- **Parameters (M):** {num_params / 1e6:.1f}",
              f"- **Classes:** {config.num_classes} ({DATASETS.get(label_set, label_set or 'unknown label set')})"
              + (", names in config.json" if config.label_names else "")]
    if video:
        lines.append(f"- **Input:** {config.num_frames} frames x {pcfg['input_size'][1]} x {pcfg['input_size'][2]}"
                     + (f", sampling rate {data['sampling_rate']}" if data.get("sampling_rate") else "")
                     + f", {config.frame_sampling} sampling")
    else:
        lines.append(f"- **Input:** {pcfg['input_size'][1]} x {pcfg['input_size'][2]}")
    lines.append(f"- **Normalisation:** mean {tuple(pcfg.get('mean', ()))}, std {tuple(pcfg.get('std', ()))}, "
                 f"{config.channel_order} channel order")
    if data.get("top1"):
        views = data.get("test_views")
        lines.append(f"- **Published accuracy:** top-1 {data['top1']}%" + (f", top-5 {data['top5']}%" if data.get(
            "top5") else "") + (f" ({views[0]} clips x {views[1]} crops)" if views else ""))
    if pcfg.get("paper_name"):
        lines.append(f"- **Papers:** {pcfg.get('paper_name', '')} ({pcfg.get('paper_ids', '')})")
    lines.append(f"- **Source:** {provenance.source} ({project}, {provenance.layout} layout), "
                 f"SHA-256 `{provenance.sha256}`")
    if provenance.official:
        lines.append(f"- **Licence:** {hub_licence}, as the upstream project ({project}, {tag_licence}) publishes "
                     f"these weights; the training data has its own terms (see below).")
    elif tag:
        lines.append(f"- **Licence:** {hub_licence}, as {tag_project} ({tag_licence}) publishes the official {tag} "
                     f"file; this file is not verified to be that one, so its owner's terms apply.")
    else:
        lines.append(f"- **Licence:** {hub_licence} as declared in config.json; the terms of the source file and of "
                     f"its training data are its owner's.")
    shape = (f"1, 3, {config.num_frames}, {pcfg['input_size'][1]}, {pcfg['input_size'][2]}" if video
             else f"1, 3, {pcfg['input_size'][1]}, {pcfg['input_size'][2]}")
    load = (f"model = mvit_zoo.create_model('{tag}', pretrained=True).eval()" if provenance.official and tag else
            "model = timm.create_model('local-dir:path/to/this/folder', pretrained=True).eval()  # this file")
    lines += ["", "## Usage", "```python", "import timm, torch, mvit_zoo  # importing mvit_zoo registers the models",
              load, f"x = torch.randn({shape})", "probs = model(x).softmax(-1)", "```", ""]
    lines += ["## Intended use and limitations",
              f"Research on {'action recognition' if video else 'image classification'} and as a pretrained "
              f"backbone for fine-tuning. The model predicts only the {config.num_classes} classes of its "
              "training set, inherits that data's biases (web videos / photos, mostly Western, English labels), "
              "and reaches its accuracy only with its preprocessing and test views. "
              "Not for surveillance or decisions about people.", ""]
    if provenance.official:
        lines += ["## Data and licence notes",
                  "The weights are released by the upstream project under the licence above. The datasets they were "
                  "trained on have their own terms (Kinetics: YouTube videos, annotations CC BY 4.0; "
                  "Something-Something v2 and ImageNet: research licences of their owners); check them for your use.",
                  ""]
    lines += ["## Citation", "```bibtex", CITATION_V1 if v1 else CITATION_V2, "```", ""]
    return "\n".join(lines)


def _weights_file(path: Path) -> Path:
    """A weights file, or the `model.safetensors` of a folder (e.g. a `mvit-zoo finetune` run)."""
    if path.is_dir():
        if not (path / hub.WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"checkpoint not found: {path} is a folder without {hub.WEIGHTS_NAME}")
        return path / hub.WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


def _read_source(src: str, workdir: Path, sha256: Optional[str]) -> tuple[dict[str, Any], str, str]:
    """(checkpoint, where it came from, its SHA-256) for a local path or an http(s) URL."""
    if re.match(r"^https?://", src):
        dest = workdir / src.rstrip("/").rsplit("/", 1)[-1]
        try:
            digest = hub.download_url(src, dest, hub._expected_hash(src, sha256))
        except hub.DownloadError as e:
            raise hub.WeightsUnavailableError(f"cannot download {src} ({e}); download it yourself and pass the "
                                              f"file") from None
        return hub.read_checkpoint(dest, forget_if_corrupt=True), src, digest
    path = _weights_file(Path(src).expanduser())
    digest = hub.sha256_file(path)
    if sha256 and not digest.startswith(sha256.lower()):
        raise hub.HashMismatchError(f"{path} has SHA-256 {digest[:16]}..., expected {sha256[:16]}...")
    return hub.read_checkpoint(path, forget_if_corrupt=False), str(path), digest


def _label_names(label_set: Optional[str], num_classes: int) -> Optional[list[str]]:
    path = Path(__file__).resolve().parent.parent / "data" / f"{label_set}.txt"  # shipped label lists
    labels = path.read_text(encoding="utf-8").splitlines() if label_set and path.is_file() else None
    return labels if labels and len(labels) == num_classes else None


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


# --------------------------------------------------------------------------------------------------
# Whether a file is a tag's official checkpoint
# --------------------------------------------------------------------------------------------------

def _recorded_download_hash(pcfg: Mapping[str, Any]) -> Optional[str]:
    """The SHA-256 of the official file as downloaded by this machine's URL fallback, which the converted
    copy in mvit-zoo's cache records in its metadata (None if there is no such copy)."""
    from safetensors import safe_open

    url = pcfg.get("url")
    path = hub._converted_path(pcfg, url) if url else None
    if path is None or not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001 - an unreadable cache file records nothing
        return None
    return meta.get("source_sha256") if meta.get("source_url") == url else None


def is_official_file(pcfg: Mapping[str, Any], src: str, digest: str) -> bool:
    """Whether the file `src` with SHA-256 `digest` is the official checkpoint of tag `pcfg`: its hash
    matches the published one (`file_sha256`, torchvision's name rule), or, where none is published, `src`
    is the tag's URL itself (downloaded over HTTPS by this call) or the hash equals the one this machine
    recorded when it downloaded that URL. A same-named local file is not enough."""
    url = pcfg.get("url")
    if not url or not pcfg.get("tag"):
        return False
    expected = hub._expected_hash(url, pcfg.get("file_sha256"))
    if expected:
        return digest.startswith(expected)
    return src == url or digest == _recorded_download_hash(pcfg)


# --------------------------------------------------------------------------------------------------
# The output folder: checked, staged, swapped in whole
# --------------------------------------------------------------------------------------------------

def _written_by_convert(folder: Path) -> bool:
    """Whether `folder` is what convert writes: only `FOLDER_FILES`, as plain files, and weights whose
    metadata names their source as convert records it."""
    from safetensors import safe_open

    try:
        entries = list(folder.iterdir())
    except OSError:
        return False
    names = {e.name for e in entries}
    if hub.WEIGHTS_NAME not in names or not names <= set(FOLDER_FILES):
        return False
    if any(e.is_symlink() or not e.is_file() for e in entries):
        return False
    try:
        with safe_open(str(folder / hub.WEIGHTS_NAME), "pt") as f:
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001 - not a readable safetensors file: not convert's
        return False
    return all(k in meta for k in _CONVERT_METADATA)


def _check_output(out_dir: Path, overwrite: bool) -> None:
    """Refuse an output that is a file (or lies below one), an existing non-empty folder unless
    `overwrite`, and, even then, a folder convert did not write."""
    blocker = hub._file_in_the_way(out_dir)
    if blocker is not None or (out_dir.exists() and not out_dir.is_dir()):
        raise OutputExistsError(f"the output {out_dir} cannot be a folder: {blocker or out_dir} is a file; choose "
                                f"a new folder name (convert writes {', '.join(FOLDER_FILES)} into it)")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise OutputExistsError(f"the output folder {out_dir} already exists; pass --overwrite to replace it (only "
                                f"a folder written by mvit-zoo convert is replaced), or choose a new folder")
    if out_dir.is_symlink() or not _written_by_convert(out_dir):
        found = ", ".join(sorted(p.name for p in out_dir.iterdir())[:8])
        raise OutputExistsError(f"the output folder {out_dir} was not written by mvit-zoo convert (it holds: {found}; "
                                f"convert writes only {', '.join(FOLDER_FILES)}), so it is not replaced even with "
                                f"--overwrite; choose a new folder, or move those files away")


def _staging_pattern(out_dir: Path) -> re.Pattern[str]:
    return re.compile(rf"\.{re.escape(out_dir.name)}\.convert-[A-Za-z0-9_]+\.(part|old)")


def _writer_alive(marker: Path) -> bool:
    """Whether the convert that wrote staging marker `marker` may still be running."""
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
        pid, host, started = int(info["pid"]), str(info["host"]), float(info["time"])
    except (OSError, ValueError, KeyError, TypeError):
        return False  # a marker cut short: its writer died while writing it
    if host != socket.gethostname():
        return time.time() - started < STALE_STAGING_SECONDS
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _clean_stale_staging(out_dir: Path) -> None:
    """Remove what a killed convert into `out_dir` left beside it: a staging folder (recognised by its
    name and its marker of a dead process, or by convert's files), and a previous folder set aside
    (convert's files): moved back if the new one never arrived, else removed."""
    pattern = _staging_pattern(out_dir)
    try:
        entries = list(out_dir.parent.iterdir())
    except OSError:
        return
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m is None or entry.is_symlink() or not entry.is_dir():
            continue
        if m.group(1) == "part":
            marker = entry / STAGING_MARKER
            # without its marker, a staging folder is one that was about to be swapped in: convert's files
            stale = not _writer_alive(marker) if marker.is_file() else _written_by_convert(entry)
            if stale:
                shutil.rmtree(entry, ignore_errors=True)
        elif _written_by_convert(entry):
            if out_dir.exists():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                os.rename(entry, out_dir)


def _swap_in(staging: Path, out_dir: Path) -> None:
    """Make the finished `staging` folder `out_dir`: the previous folder (checked by `_check_output`) is
    renamed aside, the new one renamed in, the previous one removed; an interruption between the two
    renames puts the previous folder back."""
    (staging / STAGING_MARKER).unlink()
    aside = staging.with_name(staging.name[:-len(".part")] + ".old") if out_dir.exists() else None
    if aside is not None:
        os.rename(out_dir, aside)
    try:
        os.rename(staging, out_dir)
    except BaseException:
        if aside is not None:
            os.rename(aside, out_dir)
        raise
    if aside is not None:
        if _written_by_convert(aside) or not any(aside.iterdir()):
            shutil.rmtree(aside, ignore_errors=True)
        else:  # files appeared in it since it was checked: they are the user's, kept
            warnings.warn(f"the previous {out_dir} gained files while convert ran; it was kept as {aside}",
                          stacklevel=3)


def convert_checkpoint(
        src: str,
        name: Optional[str],
        out_dir: str | Path,
        *,
        model_args: Optional[Mapping[str, Any]] = None,
        source_url: Optional[str] = None,
        sha256: Optional[str] = None,
        overwrite: bool = False,
) -> tuple[Path, ConversionReport]:
    """Convert checkpoint `src` (file, folder with model.safetensors, or URL; any supported layout) for
    model `name` (`arch` or `arch.tag`; None: the architecture the config.json beside `src` names) into
    a Hub-ready folder `out_dir`; returns the folder and the conversion report.

    The model is built from the checkpoint: architecture fields from a config.json beside `src` (a
    fine-tuned run's), those the source layout implies (`layout_architecture`: pytorchvideo's
    `pool_norm_eps=1e-5`), and the input size its position tables were made for; then from the tag,
    and `model_args` overrides all of them (a stated field that differs from what the layout implies
    warns). The class count and label names come from the checkpoint and its config.json. `source_url`
    names the official URL a local `src` claims to be a copy of (`publish`): the card names it only if
    `is_official_file` confirms the claim. Tensors that are not floating point or not finite are refused,
    and a model far larger than the checkpoint is refused before it is built (`hub.check_build_size`).

    An existing `out_dir` is refused (`OutputExistsError`) unless it is empty, or `overwrite` is set and
    convert wrote it. The folder is written in a staging folder beside `out_dir`, read back and compared
    tensor by tensor, then swapped in whole (see the module docstring): a failure leaves nothing behind.
    """
    from ..model.mvit import MODEL_CFGS, MViTCfg, make_cfg
    from ..model.registry import create_model

    out_dir = Path(out_dir)
    _clean_stale_staging(out_dir)
    _check_output(out_dir, overwrite)
    local = not re.match(r"^https?://", src)
    base = find_config(_weights_file(Path(src).expanduser())) if local else None
    if name is None:
        if base is None:
            raise ValueError(f"{src}: no {CONFIG_FILE} beside it names the architecture; pass --model NAME")
        name = base.architecture
    pcfg = tag_config(name)
    arch, _, tag = name.partition(".")
    stated = dict(model_args or {})
    if base is not None and base.architecture != arch:
        raise ValueError(f"{src}: its {CONFIG_FILE} is for {base.architecture}, not {arch}; pass --model "
                         f"{base.architecture}")
    known = {**(pcfg.get("arch") or {}), **({k: v for k, v in base.model_args.items() if k != "num_classes"}
                                            if base else {})}
    cfg_fields = {f.name for f in fields(MViTCfg)} | {"num_frames"}
    structure = make_cfg(MODEL_CFGS[arch], **{k: v for k, v in {**known, **stated}.items() if k in cfg_fields})
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, origin, digest = _read_source(src, Path(tmp), sha256)
    native, layout = to_native(checkpoint, structure)
    hub.check_state_dict(native, source=str(src))

    # the architecture the checkpoint implies, where nothing stated it
    implied = layout_architecture(native, layout)
    from_checkpoint = {k: v for k, v in architecture_overrides(implied, structure).items() if k not in stated}
    size = checkpoint_img_size(native, structure)
    if size is not None and not {"img_size", "num_frames"} & set(stated) and size != tuple(structure.img_size):
        from_checkpoint["img_size"] = size
    arch_args = {**known, **from_checkpoint, **stated}
    num_classes = int(arch_args.pop("num_classes", _head_classes(native)))
    hub.check_build_size(arch, {**arch_args, "num_classes": num_classes}, native,
                         source=f"{CONFIG_FILE} beside {src} and --model-arg" if base else "--model-arg")
    model = create_model(arch, num_classes=num_classes, **arch_args)
    for message in architecture_mismatches(implied, model, layout):
        warnings.warn(ArchitectureMismatchWarning(message), stacklevel=2)
    fitted = fit_state_dict(native, model, layout=layout, head="strict", strict=True)
    model.load_state_dict(fitted)

    official = bool(tag) and is_official_file(pcfg, src, digest)
    timm_cfg = {**pcfg, **(base.pretrained_cfg if base else {})}
    data = {k: pcfg[k] for k in DATA_FIELDS
            if k in pcfg and (official or k not in _OFFICIAL_ONLY) and (k != "label_set" or base is None)}
    if base is not None:
        data.update(base.data_config)
    labels = (base.label_names if base and base.label_names and len(base.label_names) == num_classes
              else _label_names(data.get("label_set"), num_classes))
    source = source_url if source_url is not None and official else origin
    base_source = dict(base.source) if base else {}
    config = config_for_model(
        model, model_args={**arch_args, "num_classes": num_classes},
        pretrained_cfg={**timm_cfg, "license": timm_cfg.get("license") or "apache-2.0"}, data_config=data,
        label_names=labels, source={
            "tag": name if official else base_source.get("tag"), "file": source, "sha256": digest, "layout": layout,
            "description": ("official checkpoint" if official else base_source.get("description")
                            or "converted by mvit-zoo convert")})
    changed = tuple(f"{what} {', '.join(keys)}" for what, keys in (
        ("resized", fitted.report.resized), ("adapted", fitted.report.adapted)) if keys)
    provenance = _Provenance(source, digest, layout, official, changed, base)
    card = model_card(name, config, provenance, num_params=sum(p.numel() for p in model.parameters()),
                      upstream_url=pcfg.get("url"))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.convert-", suffix=".part"))
    try:
        marker = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
        (staging / STAGING_MARKER).write_text(json.dumps(marker), encoding="utf-8")
        weights = hub.save_safetensors(fitted, staging / hub.WEIGHTS_NAME, metadata={
            "architecture": name, "source": source, "source_sha256": digest, "source_layout": layout},
            env="the output folder (--output)")
        back = hub.read_checkpoint(weights, forget_if_corrupt=False)
        if set(back) != set(fitted) or any(not torch.equal(back[k], fitted[k]) for k in fitted):
            raise RuntimeError(f"{out_dir / hub.WEIGHTS_NAME}: the written file does not read back identically")
        write_config(staging, config)
        (staging / "README.md").write_text(card, encoding="utf-8")
        mode = _umask_mode()
        for file in FOLDER_FILES:
            os.chmod(staging / file, mode)
        os.chmod(staging, mode | ((mode & 0o444) >> 2))  # a folder: x wherever r (mkdtemp gives 0700)
        _check_output(out_dir, overwrite)  # (files may have appeared in it meanwhile)
        _swap_in(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir, fitted.report


# --------------------------------------------------------------------------------------------------
# Publishing every official checkpoint
# --------------------------------------------------------------------------------------------------

def push_folder(folder: str | Path, repo_id: str, token: Optional[str] = None) -> str:
    """Upload a Hub-ready folder to `repo_id` (created if needed); returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                             commit_message=f"mvit-zoo publish: {Path(folder).name}")
    return str(getattr(info, "commit_url", info))


def _require_token(token: Optional[str]) -> str:
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise hub.WeightsError("--push needs a Hugging Face token with write access: run `hf auth login` or set "
                               "HF_TOKEN (nothing was converted)")
    return token


def _source_of(tag: str, pcfg: Mapping[str, Any], source_dir: Optional[str | Path],
               allow_unverified: bool, push: bool) -> tuple[str, bool]:
    """(source, verified) of a tag: its copy in `source_dir` if there is one, else its URL (verified: the
    download is the official file, checked against its hash where one is published). A local copy that
    `is_official_file` cannot confirm is refused unless `allow_unverified`, and never pushed."""
    url = pcfg["url"]
    local = Path(source_dir) / url.rsplit("/", 1)[-1] if source_dir else None
    if local is None or not local.is_file():
        return url, True
    digest = hub.sha256_file(local)
    if is_official_file(pcfg, str(local), digest):
        return str(local), True
    expected = hub._expected_hash(url, pcfg.get("file_sha256"))
    why = (f"its SHA-256 is {digest[:16]}..., expected {expected[:16]}..." if expected else
           f"the tag publishes no SHA-256 and this machine has not downloaded {url} to compare (its SHA-256 is "
           f"{digest[:16]}...)")
    if not allow_unverified:
        error = hub.HashMismatchError if expected else UnverifiedSourceError
        raise error(f"{tag}: {local} is not known to be the official file: {why}. Publishing it would give it the "
                    f"paper's provenance and accuracy. Remove it from --source-dir to download the official file, "
                    f"or pass --allow-unverified to publish it as converted from an unverified file (no provenance "
                    f"or accuracy claims, not pushed). Nothing was converted")
    if push:
        raise UnverifiedSourceError(f"{tag}: {local} is not known to be the official file ({why}), and --push "
                                    f"uploads only verified files to the official repository {pcfg['hf_hub_id']}; "
                                    f"publish it without --push, or remove it from --source-dir. Nothing was "
                                    f"converted")
    return str(local), False


def publish(
        out_dir: str | Path,
        *,
        only: str = "*",
        source_dir: Optional[str | Path] = None,
        push: bool = False,
        token: Optional[str] = None,
        model_args: Optional[Mapping[str, Any]] = None,
        allow_unverified: bool = False,
        log: Any = print,
) -> list[Path]:
    """Convert every official checkpoint (tags matching `only`) into `out_dir/<arch.tag>/`, replacing
    folders that convert wrote there before (never others).

    Each source is `source_dir/<file name of its URL>` when present there, else downloaded (with the
    hash check where one is known). A local copy gets the tag's provenance (source, accuracy) only if its
    hash confirms it (`is_official_file`); any other is refused (`UnverifiedSourceError`, or
    `HashMismatchError` against a published hash) before anything is converted, unless `allow_unverified`,
    which converts it with a card that makes no claims about it. With `push`, each folder is uploaded to
    the tag's Hub repository (this project's organisation, `MVIT_ZOO_HUB_ORG`), which needs a token;
    unverified files are never pushed.
    """
    tags = official_tags(only)
    if not tags:
        raise ValueError(f"no official checkpoint matches {only!r}; known: {', '.join(official_tags())}")
    if push:
        token = _require_token(token)
    out_dir = Path(out_dir)
    plans = [(tag, pcfg, *_source_of(tag, pcfg, source_dir, allow_unverified, push))
             for tag, pcfg in ((t, tag_config(t)) for t in tags)]
    folders = []
    for tag, pcfg, src, verified in plans:
        url = pcfg["url"]
        log(f"{tag}: converting {src}" + ("" if verified else " (unverified: no provenance or accuracy claims)"))
        folder, report = convert_checkpoint(
            src, tag, out_dir / tag, model_args=model_args, source_url=url if verified else None,
            sha256=hub._expected_hash(url, pcfg.get("file_sha256")) if verified else None, overwrite=True)
        log(f"{tag}: {report.summary()} -> {folder}")
        if push:
            repo, _ = hub.hub_repo_id(pcfg["hf_hub_id"])
            log(f"{tag}: pushed to {repo}: {push_folder(folder, repo, token)}")
        folders.append(folder)
    return folders
