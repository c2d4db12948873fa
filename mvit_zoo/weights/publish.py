"""`mvit-zoo convert` and `mvit-zoo publish`: upstream checkpoints -> Hub-ready folders.

A Hub-ready folder holds

* `model.safetensors`: the weights in mvit-zoo's layout, loadable with no conversion;
* `config.json`: timm-style (`architecture`, `num_classes`, `num_features`, `global_pool`, `model_args`,
  `pretrained_cfg`, `label_names`), plus `data_config` with the video settings timm's PretrainedCfg
  has no field for (as `mvit-zoo finetune` writes), so `timm.create_model('hf-hub:<org>/<name>',
  pretrained=True)` and `mvit_zoo.create_model('<name>', pretrained=True)` both rebuild the model;
* `README.md`: the model card (Hub metadata header, data, licence, source and its hash, usage, citation).

`publish` does this for every official checkpoint whose tag points at this project's Hub organisation
(`mvit_zoo.weights.hub.hub_org()`), and with `--push` uploads each folder with huggingface_hub.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import re
import sys
import tempfile
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
from torch import nn

from . import hub
from .convert import ConversionReport, fit_state_dict, to_native

__all__ = [
    "official_tags", "convert_checkpoint", "publish", "push_folder", "model_config", "model_card",
    "configure_parser", "run", "configure_convert_parser", "run_convert",
]

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
_VIDEO_KEYS = ("num_frames", "sampling_rate", "frame_sampling", "channel_order", "test_views")
_EXTRA_KEYS = ("label_set", "top1", "top5", "file_sha256")
_TIMM_KEYS = ("url", "hf_hub_id", "tag", "custom_load", "input_size", "test_input_size", "min_input_size",
              "fixed_input_size", "interpolation", "crop_pct", "test_crop_pct", "crop_mode", "mean", "std",
              "num_classes", "label_offset", "pool_size", "test_pool_size", "first_conv", "classifier", "license",
              "description", "origin_url", "paper_name", "paper_ids", "notes")
CITATION_V1 = """@inproceedings{fan2021multiscale,
  title={Multiscale Vision Transformers},
  author={Fan, Haoqi and Xiong, Bo and Mangalam, Karttikeya and Li, Yanghao and Yan, Zhicheng and Malik, Jitendra and Feichtenhofer, Christoph},
  booktitle={ICCV},
  year={2021}
}"""
CITATION_V2 = """@inproceedings{li2022mvitv2,
  title={MViTv2: Improved Multiscale Vision Transformers for Classification and Detection},
  author={Li, Yanghao and Wu, Chao-Yuan and Fan, Haoqi and Mangalam, Karttikeya and Xiong, Bo and Malik, Jitendra and Feichtenhofer, Christoph},
  booktitle={CVPR},
  year={2022}
}"""


# --------------------------------------------------------------------------------------------------
# Tags
# --------------------------------------------------------------------------------------------------

_DATA_KEYS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std", "first_conv", "classifier",
              "paper_name", "paper_ids", "label_set") + _VIDEO_KEYS


def _pcfg_dict(name: str) -> dict[str, Any]:
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


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: list(v) if isinstance(v, (tuple, set)) else str(v)))


def model_config(model: nn.Module, name: str, pcfg: Mapping[str, Any], model_args: Mapping[str, Any]) -> dict:
    """timm-style config.json for converted weights (see the module docstring)."""
    pretrained_cfg = {k: pcfg[k] for k in _TIMM_KEYS if pcfg.get(k) is not None}
    for key in ("url", "hf_hub_id", "tag"):
        pretrained_cfg.pop(key, None)
    pretrained_cfg["num_classes"] = model.num_classes
    pretrained_cfg["input_size"] = (model.in_chans,) + tuple(model.img_size[-2:])  # the model as built
    config: dict[str, Any] = {
        "architecture": name.split(".")[0],
        "num_classes": model.num_classes,
        "num_features": int(model.num_features),
        "global_pool": model.global_pool,
        "model_args": dict(model_args),
        "pretrained_cfg": pretrained_cfg,
    }
    label_set = pcfg.get("label_set")
    if label_set:
        path = Path(__file__).resolve().parent.parent / "data" / f"{label_set}.txt"  # shipped label lists
        labels = path.read_text(encoding="utf-8").splitlines() if path.is_file() else None
        if labels and len(labels) == model.num_classes:
            config["label_names"] = list(labels)
    data = {k: pcfg[k] for k in _VIDEO_KEYS + _EXTRA_KEYS if pcfg.get(k) is not None}
    if model.is_video:
        data["num_frames"] = model.img_size[0]
    if data:
        config["data_config"] = data
    return _json(config)


def _upstream(url: Optional[str]) -> tuple[str, str]:
    for part, project, licence in UPSTREAM:
        if url and part in url:
            return project, licence
    return "a local checkpoint", "see its source"


def model_card(name: str, config: Mapping[str, Any], *, source: str, source_sha256: Optional[str],
               layout: str, num_params: int, upstream_url: Optional[str] = None) -> str:
    """README.md for a converted model (Hub metadata header + card). `upstream_url`, the tag's official
    URL, names the upstream project when `source` is a local copy."""
    pcfg, data = config["pretrained_cfg"], config.get("data_config", {})
    arch = config["architecture"]
    label_set = data.get("label_set")
    video = "num_frames" in data
    project, licence = _upstream(upstream_url or source)
    hub_licence = (pcfg.get("license") or "apache-2.0").lower()
    v1 = "arXiv:2104.11227" in str(pcfg.get("paper_ids", "")) or arch.startswith(("mvit_b", "mvit_v1"))
    lines = ["---", "tags:", f"- {'video-classification' if video else 'image-classification'}", "- timm",
             "- mvit-zoo", "library_name: timm", f"license: {hub_licence}"]
    if label_set in HF_DATASETS:
        lines += ["datasets:", f"- {HF_DATASETS[label_set]}"]
    lines += ["---", f"# Model card for {name}", ""]
    what = f"{'MViT v1' if v1 else 'MViTv2'} {'video' if video else 'image'} classifier"
    lines += [f"{what} trained on {DATASETS.get(label_set, 'its dataset')} by the paper's authors, converted "
              f"from the {project} checkpoint to mvit-zoo's safetensors layout. The weights are unchanged: only "
              f"tensor names (and fused q/k/v projections) differ from the source file.", ""]
    lines += ["## Model details", f"- **Architecture:** `{arch}` (mvit-zoo; registered with timm on `import mvit_zoo`)",
              f"- **Parameters (M):** {num_params / 1e6:.1f}",
              f"- **Classes:** {config['num_classes']} ({DATASETS.get(label_set, label_set or 'unknown label set')})"]
    if video:
        lines.append(f"- **Input:** {data['num_frames']} frames x {pcfg['input_size'][1]} x {pcfg['input_size'][2]}"
                     + (f", sampling rate {data['sampling_rate']}" if data.get("sampling_rate") else "")
                     + (f", {data['frame_sampling']} sampling" if data.get("frame_sampling") else ""))
    else:
        lines.append(f"- **Input:** {pcfg['input_size'][1]} x {pcfg['input_size'][2]}")
    lines.append(f"- **Normalisation:** mean {tuple(pcfg.get('mean', ()))}, std {tuple(pcfg.get('std', ()))}, "
                 f"{data.get('channel_order', 'RGB')} channel order")
    if data.get("top1"):
        views = data.get("test_views")
        lines.append(f"- **Published accuracy:** top-1 {data['top1']}%" + (f", top-5 {data['top5']}%" if data.get(
            "top5") else "") + (f" ({views[0]} clips x {views[1]} crops)" if views else ""))
    lines.append(f"- **Papers:** {pcfg.get('paper_name', '')} ({pcfg.get('paper_ids', '')})")
    lines.append(f"- **Source:** {source} ({project}, {layout} layout)"
                 + (f", SHA-256 `{source_sha256}`" if source_sha256 else ""))
    lines.append(f"- **Licence:** {hub_licence}, as the upstream project ({project}, {licence}) publishes "
                 f"these weights; the training data has its own terms (see below).")
    lines += ["", "## Usage", "```python", "import torch, mvit_zoo  # registers the models with timm",
              f"model = mvit_zoo.create_model('{name}', pretrained=True).eval()",
              f"x = torch.randn(1, 3, {data['num_frames']}, {pcfg['input_size'][1]}, {pcfg['input_size'][2]})"
              if video else f"x = torch.randn(1, 3, {pcfg['input_size'][1]}, {pcfg['input_size'][2]})",
              "probs = model(x).softmax(-1)", "```", ""]
    lines += ["## Intended use and limitations",
              f"Research on {'action recognition' if video else 'image classification'} and as a pretrained "
              f"backbone for fine-tuning. The model predicts only the {config['num_classes']} classes of its "
              "training set, inherits that data's biases (web videos / photos, mostly Western, English labels), "
              "and reaches the published accuracy only with the published preprocessing and test views. "
              "Not for surveillance or decisions about people.", ""]
    lines += ["## Data and licence notes",
              "The weights are released by the upstream project under the licence above. The datasets they were "
              "trained on have their own terms (Kinetics: YouTube videos, annotations CC BY 4.0; "
              "Something-Something v2 and ImageNet: research licences of their owners); check them for your use.",
              ""]
    lines += ["## Citation", "```bibtex", CITATION_V1 if v1 else CITATION_V2, "```", ""]
    return "\n".join(lines)


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
    path = Path(src).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {src}")
    digest = hub.sha256_file(path)
    if sha256 and not digest.startswith(sha256.lower()):
        raise hub.HashMismatchError(f"{path} has SHA-256 {digest[:16]}..., expected {sha256[:16]}...")
    return hub.read_checkpoint(path, forget_if_corrupt=False), str(path), digest


def convert_checkpoint(
        src: str,
        name: str,
        out_dir: str | Path,
        *,
        model_args: Optional[Mapping[str, Any]] = None,
        source_url: Optional[str] = None,
        sha256: Optional[str] = None,
) -> tuple[Path, ConversionReport]:
    """Convert checkpoint `src` (file or URL, any supported layout) for model `name` (`arch` or
    `arch.tag`) into a Hub-ready folder `out_dir`; returns the folder and the conversion report.

    The tag supplies the data settings and any architecture fields its weights need; `model_args`
    overrides architecture fields (e.g. `img_size` for a checkpoint fine-tuned at another size) and
    the class count is read from the checkpoint's classifier. The written file is read back and
    compared tensor by tensor, so the folder is known to be lossless.
    """
    from ..model.registry import create_model

    from ..model.mvit import MODEL_CFGS, MViTCfg, make_cfg

    out_dir = Path(out_dir)
    pcfg = _pcfg_dict(name)
    arch = name.split(".")[0]
    arch_args = {**(pcfg.get("arch") or {}), **dict(model_args or {})}
    cfg_fields = {f.name for f in fields(MViTCfg)} | {"num_frames"}
    structure = make_cfg(MODEL_CFGS[arch], **{k: v for k, v in arch_args.items() if k in cfg_fields})
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, origin, digest = _read_source(src, Path(tmp), sha256)
    native, layout = to_native(checkpoint, structure)
    num_classes = int(arch_args.pop("num_classes", _head_classes(native)))
    model = create_model(arch, num_classes=num_classes, **arch_args)
    fitted = fit_state_dict(native, model, layout=layout, head="strict", strict=True)
    model.load_state_dict(fitted)

    config = model_config(model, name, {**pcfg, "license": pcfg.get("license") or "apache-2.0"},
                          {**arch_args, "num_classes": num_classes})
    source = source_url or origin
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = hub.save_safetensors(fitted, out_dir / hub.WEIGHTS_NAME, metadata={
        "architecture": name, "source": source, "source_sha256": digest, "source_layout": layout})
    back = hub.read_checkpoint(weights, forget_if_corrupt=False)
    if set(back) != set(fitted) or any(not torch.equal(back[k], fitted[k]) for k in fitted):
        raise RuntimeError(f"{weights}: the written file does not read back identically")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    card = model_card(name, config, source=source, source_sha256=digest, layout=layout,
                      num_params=sum(p.numel() for p in model.parameters()), upstream_url=pcfg.get("url"))
    (out_dir / "README.md").write_text(card)
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


def publish(
        out_dir: str | Path,
        *,
        only: str = "*",
        source_dir: Optional[str | Path] = None,
        push: bool = False,
        token: Optional[str] = None,
        model_args: Optional[Mapping[str, Any]] = None,
        log: Any = print,
) -> list[Path]:
    """Convert every official checkpoint (tags matching `only`) into `out_dir/<arch.tag>/`.

    Each source is `source_dir/<file name of its URL>` when present there, else downloaded (with the
    hash check where one is known). With `push`, each folder is uploaded to the tag's Hub repository
    (this project's organisation, `MVIT_ZOO_HUB_ORG`), which needs a token.
    """
    tags = official_tags(only)
    if not tags:
        raise ValueError(f"no official checkpoint matches {only!r}; known: {', '.join(official_tags())}")
    if push:
        token = _require_token(token)
    out_dir = Path(out_dir)
    folders = []
    for tag in tags:
        pcfg = _pcfg_dict(tag)
        url = pcfg["url"]
        local = Path(source_dir) / url.rsplit("/", 1)[-1] if source_dir else None
        src = str(local) if local is not None and local.is_file() else url
        expected = hub._expected_hash(url, pcfg.get("file_sha256"))
        log(f"{tag}: converting {src}")
        folder, report = convert_checkpoint(src, tag, out_dir / tag, model_args=model_args, source_url=url,
                                            sha256=expected)
        log(f"{tag}: {report.summary()} -> {folder}")
        if push:
            repo, _ = hub.hub_repo_id(pcfg["hf_hub_id"])
            log(f"{tag}: pushed to {repo}: {push_folder(folder, repo, token)}")
        folders.append(folder)
    return folders


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------

def _parse_model_args(items: Optional[Sequence[str]]) -> dict[str, Any]:
    """KEY=VALUE pairs; VALUE is JSON when it parses (numbers, lists), else a string."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--model-arg expects KEY=VALUE, got {item!r}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out[key.strip().replace("-", "_")] = tuple(parsed) if isinstance(parsed, list) else parsed
    return out


def _add_model_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-arg", action="append", metavar="KEY=VALUE", default=[],
                        help="architecture override, repeatable, VALUE as JSON: img_size=[32,288,288], "
                             "depths=[1,2,11,2], num_classes=10, pool_norm_eps=1e-5")


def configure_convert_parser(parser: argparse.ArgumentParser) -> None:
    """`mvit-zoo convert SRC --model NAME --out DIR`."""
    parser.description = ("Convert an MViT checkpoint (mvit-zoo/timm safetensors, torchvision .pth, PySlowFast / "
                          "pytorchvideo / facebookresearch/mvit .pyth, a file or URL) into a Hub-ready folder: "
                          "model.safetensors, config.json, README.md.")
    parser.add_argument("src", help="checkpoint file or http(s) URL")
    parser.add_argument("--model", required=True, metavar="NAME",
                        help="mvit-zoo architecture or pretrained tag (arch.tag): mvit_v2_s_16x4.fb_k400")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--sha256", help="expected SHA-256 (or prefix) of SRC")
    _add_model_arg(parser)


def run_convert(args: argparse.Namespace) -> int:
    folder, report = convert_checkpoint(args.src, args.model, args.out, model_args=_parse_model_args(args.model_arg),
                                        sha256=args.sha256)
    print(f"{args.src}: {report.summary()}")
    print(f"wrote {folder / hub.WEIGHTS_NAME}, {folder / 'config.json'}, {folder / 'README.md'}")
    return 0


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """`mvit-zoo publish`."""
    parser.description = ("Convert every official MViT checkpoint whose tag points at this project's Hub "
                          f"organisation (${hub.HUB_ORG_ENV}, default {hub.DEFAULT_HUB_ORG!r}) into Hub-ready "
                          "folders OUT/<arch.tag>/, and with --push upload them.")
    parser.add_argument("--out", default="hub-models", metavar="DIR", help="output folder (default: %(default)s)")
    parser.add_argument("--only", default="*", metavar="PATTERN", help="fnmatch pattern of tags (default: all)")
    parser.add_argument("--source-dir", metavar="DIR",
                        help="folder with local copies of the official files (named as in their URLs); "
                             "missing ones are downloaded")
    parser.add_argument("--push", action="store_true", help="upload each folder (needs a Hugging Face token)")
    parser.add_argument("--list", action="store_true", help="print the tags that would be published and exit")
    _add_model_arg(parser)


def run(args: argparse.Namespace) -> int:
    if args.list:
        for tag in official_tags(args.only):
            cfg = _pcfg_dict(tag)
            print(f"{tag}\t{hub.hub_repo_id(cfg['hf_hub_id'])[0]}\t{cfg['url']}")
        return 0
    folders = publish(args.out, only=args.only, source_dir=args.source_dir, push=args.push,
                      model_args=_parse_model_args(args.model_arg))
    print(f"{len(folders)} folder(s) in {args.out}")
    return 0


def main(argv: Optional[Iterable[str]] = None) -> int:  # pragma: no cover - `mvit-zoo publish` is the entry
    parser = argparse.ArgumentParser(prog="mvit-zoo publish")
    configure_parser(parser)
    return run(parser.parse_args(list(argv) if argv is not None else sys.argv[1:]))
