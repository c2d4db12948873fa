"""Fine-tune an MViT model (or any timm classifier) on a folder of images or videos.

Usage::

    mvit-zoo finetune --model mvit_small.fb_in1k --data DIR --epochs 30 --output runs/flowers
    mvit-zoo finetune --resume runs/flowers        # after a Ctrl-C: continues exactly
    torchrun --nproc_per_node=4 -m mvit_zoo finetune --model mvit_v2_s_16x4.fb_k400 --data clips/ ...

`DIR` holds one folder per class (`DIR/<class>/<file>`), or `train/` and `val/`
trees of class folders. Image models read images; video models (`model.is_video`) read
video files decoded with PyAV and sample `T` frames every `tau` frames as in the
model's pretrained config.

The recipe is the standard transfer one: AdamW, warm-up then cosine decay per step,
layer-wise learning-rate decay from `group_matcher`, no weight decay on norms, biases and
position tables, label smoothing, optional mixup/cutmix and EMA, bf16 autocast, and a new
head sized to the class folders. The output folder holds `model.safetensors` and a
timm-style `config.json` (with `label_names`), per-epoch metrics (CSV and JSON), and the
training state that `--resume` continues from exactly: `train_state.json` names the last
complete checkpoint folder under `checkpoints/`, so a save cut short (Ctrl-C, a kill, a full
disk) leaves the previous one to resume from. A run removes only the step folders it wrote
(`step-N-<id>`, each holding a marker with the run's id), and refuses an output whose
`checkpoints/` is a link or holds anything else; it keeps the latest `--keep-checkpoints` of its
step folders (default 1). `model_best.safetensors` holds the weights of the best validation epoch
(a link to the published weights when that is the last one); a finished run prints (on stdout) where
its weights are and which epoch was best. One run at a time writes to an output folder: it holds the
lock `.mvit-zoo.lock` there, and a second run is refused. A first Ctrl-C finishes the step under way,
saves a checkpoint and prints the command that resumes it.

Determinism: augmentation is seeded per (seed, epoch, sample) and everything else per
(seed, step, rank), so a run gives the same numbers whatever the number of data workers,
and a resumed run gives the same numbers as an uninterrupted one.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

from .cli import CliError
from .options import DATA_FORMATS, RECIPE_NAMES, SLOWFAST_TARGET_FPS, VIDEO_BACKENDS
from .threads import add_threads_argument, apply_threads

__all__ = ["configure_parser", "prepare_parser", "run", "main"]

# Arguments that describe the run rather than the result; they may change on --resume
_RUNTIME_ARGS = frozenset({"resume", "output", "workers", "progress", "device", "save_every", "data", "data_root",
                           "val_data", "keep_checkpoints", "threads"})
# Where the data is: may change on --resume (the data moved), taken from the run when not given
_DATA_ARGS = ("data", "data_root", "val_data")
# Arguments a run cannot start without; `--resume DIR` alone takes them from the run
_RUN_ARGS = ("model", "data", "output")
# Set in the parsed arguments by prepare_parser when it made a --recipe the options' defaults (not saved)
_RECIPE_APPLIED = "_recipe_applied"


def _normalised(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists), or None where JSON cannot hold it."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        return None


def _check_resume_args(saved: Dict[str, Any], args: argparse.Namespace) -> None:
    current = _args_dict(args)
    changed = [k for k, v in saved.items() if k not in _RUNTIME_ARGS and current.get(k, v) != v]
    if changed:
        detail = ", ".join(f"{k}: {saved[k]!r} -> {current.get(k)!r}" for k in changed)
        print(f"warning: resuming with changed arguments ({detail}); the run will not match an uninterrupted one",
              file=sys.stderr)


def _args_dict(args: argparse.Namespace) -> Dict[str, Any]:
    return {k: _normalised(v) for k, v in vars(args).items() if not callable(v) and not k.startswith("_")}


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------

def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the `finetune` options to `parser`."""
    parser.description = __doc__.split("\n\n")[0]
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="model name, optionally with a pretrained tag: NAME[.tag] (required but with --resume)")
    g.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                   help="start from the pretrained weights of NAME[.tag] (default: yes)")
    g.add_argument("--pretrained-file", default=None, metavar="FILE",
                   help="start from the weights in this local file instead (safetensors or torch checkpoint)")
    g.add_argument("--model-kwargs", default=None, metavar="JSON",
                   help='architecture overrides, e.g. \'{"depths": [1,1,1,1], "embed_dim": 32}\'')
    g.add_argument("--img-size", type=int, default=None, metavar="SIZE",
                   help="input height and width (square) for model and data (default: the model's)")
    g.add_argument("--num-frames", type=int, default=None, metavar="T",
                   help="video models: frames per clip for model and data (default: the model's)")
    g.add_argument("--drop-path", type=float, default=None, help="stochastic depth rate (default: the model's)")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations to save memory")
    parser.add_argument("--recipe", choices=RECIPE_NAMES, default=None,
                        help="SlowFast's MViTv2-S training recipe (k400: Kinetics, ssv2: Something-Something v2) as "
                             "the defaults of the options below, learning rates scaled to the global batch; options "
                             "given explicitly override it; what it sets is printed (not applied with --resume)")
    d = parser.add_argument_group("data")
    d.add_argument("--data", default=None, metavar="FILE|DIR",
                   help="class folders DIR/<class>/<file> (or DIR/train/ and DIR/val/ trees of them), one annotation "
                        "file (path-label list, Kinetics CSV, SSv2 JSON), or a dataset folder with its train and val "
                        "annotation files as distributed (required but with --resume)")
    d.add_argument("--data-root", default=None, metavar="DIR",
                   help="the folder the listed video paths are relative to (default: the annotation file's folder)")
    d.add_argument("--data-format", choices=DATA_FORMATS, default=None,
                   help="the layout of --data (default: detected from the files)")
    d.add_argument("--val-data", default=None, metavar="FILE|DIR",
                   help="validation data: an annotation file or class folders (default: the dataset's own val split)")
    d.add_argument("--val-split", type=float, default=0.1,
                   help="fraction of each class held out for validation when the data has no val split "
                        "(default: %(default)s)")
    d.add_argument("--workers", type=int, default=0, help="data-loading processes (default: %(default)s)")
    d.add_argument("--sampling-rate", type=int, default=None, metavar="TAU",
                   help="video: stride between the T sampled frames (default: the model's pretrained config)")
    d.add_argument("--frame-sampling", choices=("stride", "segment"), default=None,
                   help="video: T frames TAU apart at a random start (stride, Kinetics) or one random frame in each "
                        "of T segments (segment, SSv2) (default: the model's pretrained config, else stride)")
    d.add_argument("--target-fps", type=float, default=SLOWFAST_TARGET_FPS, metavar="FPS",
                   help="video: TAU counts frames at this rate, whatever the file's (default: %(default)g)")
    d.add_argument("--clips-per-video", type=int, default=1, metavar="N",
                   help="video: SlowFast's repeated augmentation: each video is decoded once and augmented N times; "
                        "--batch-size counts videos, so each step trains on batch x N clips (default: %(default)s)")
    d.add_argument("--decoder", choices=("auto", *VIDEO_BACKENDS), default="auto",
                   help="video decoding library (default: auto, torchcodec if it works here, else pyav)")
    d.add_argument("--crop-mode", choices=("resized", "jitter"), default="resized",
                   help="video: random resized crop (--scale) or short-side jitter (--jitter-scales) + random crop "
                        "(default: %(default)s)")
    d.add_argument("--jitter-scales", type=int, nargs=2, default=(256, 320), metavar=("MIN", "MAX"),
                   help="video: short-side range of --crop-mode jitter; frames are decoded at short side MIN "
                        "(default: 256 320)")
    d.add_argument("--inverse-uniform", action=argparse.BooleanOptionalAction, default=False,
                   help="video: draw the jitter short side uniformly in 1/size (default: no)")
    d.add_argument("--channel-order", choices=("RGB", "BGR"), default=None,
                   help="video: channel order of the model's input (default: the model's pretrained config)")
    d.add_argument("--scale", type=float, nargs=2, default=(0.08, 1.0), metavar=("MIN", "MAX"),
                   help="random-resized-crop area range (default: 0.08 1.0)")
    d.add_argument("--hflip", type=float, default=0.5,
                   help="horizontal flip probability (the whole clip for video) (default: %(default)s)")
    d.add_argument("--color-jitter", type=float, default=0.4, help="images: colour jitter (default: %(default)s)")
    d.add_argument("--aa", default=None,
                   help="auto-augment policy, e.g. 'rand-m7-n4-mstd0.5-inc1'; images: any of timm's, video: "
                        "RandAugment, the same ops on every frame (default: none)")
    d.add_argument("--aa-interpolation", choices=("bilinear", "bicubic"), default="bicubic",
                   help="video: interpolation of RandAugment's geometric ops (default: %(default)s)")
    d.add_argument("--reprob", type=float, default=0.0,
                   help="random erasing probability (video: one box for the whole clip) (default: 0)")
    d.add_argument("--re-mode", choices=("pixel", "rand", "const"), default="pixel",
                   help="video: random erasing fill, per-pixel noise, a random colour or the mean "
                        "(default: %(default)s)")
    d.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (default: 0, off)")
    d.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (default: 0, off)")
    d.add_argument("--mixup-prob", type=float, default=1.0, help="probability of mixing a batch (default: 1)")
    o = parser.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=10, help="(default: %(default)s)")
    o.add_argument("--batch-size", type=int, default=32,
                   help="images or videos per process and step (default: %(default)s)")
    o.add_argument("--eval-batch-size", type=int, default=None, help="per process (default: --batch-size)")
    o.add_argument("--opt", choices=("adamw", "sgd"), default="adamw",
                   help="optimizer; sgd is SlowFast's, with --momentum and Nesterov (default: %(default)s)")
    o.add_argument("--momentum", type=float, default=0.9, help="--opt sgd: momentum (default: %(default)s)")
    o.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (default: %(default)s)")
    o.add_argument("--min-lr", type=float, default=1e-6, help="learning rate at the end (default: %(default)s)")
    o.add_argument("--warmup-epochs", type=float, default=1.0,
                   help="linear warm-up, may be fractional (default: %(default)s)")
    o.add_argument("--warmup-lr", type=float, default=1e-6, help="warm-up start (default: %(default)s)")
    o.add_argument("--weight-decay", type=float, default=0.05,
                   help="weight decay, not applied to norms, biases and position tables (default: %(default)s)")
    o.add_argument("--layer-decay", type=float, default=None,
                   help="layer-wise learning-rate decay; 1 turns it off (default: 0.75 from pretrained weights, "
                        "else 1)")
    o.add_argument("--smoothing", type=float, default=0.1, help="label smoothing (default: %(default)s)")
    o.add_argument("--clip-grad", type=float, default=None, metavar="NORM", help="gradient norm clipping")
    o.add_argument("--ema", action="store_true", help="also keep (and validate) an EMA of the weights")
    o.add_argument("--ema-decay", type=float, default=0.9998, help="(default: %(default)s)")
    o.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on with CUDA, off on CPU)")
    o.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    r = parser.add_argument_group("run")
    r.add_argument("--output", default=None, metavar="DIR",
                   help="where model.safetensors, config.json, metrics and the training state go "
                        "(required but with --resume)")
    r.add_argument("--resume", nargs="?", const="", default=None, metavar="DIR",
                   help="continue the run saved in DIR (default: --output) exactly where it stopped; options "
                        "not given take the run's values, so `--resume DIR` alone is enough")
    r.add_argument("--save-every", type=int, default=0, metavar="STEPS",
                   help="also save the training state every STEPS steps within epochs (default: epoch ends only)")
    r.add_argument("--keep-checkpoints", type=int, default=1, metavar="N",
                   help="resumable checkpoints (weights + optimizer state, about 3x the weights each) kept under "
                        "DIR/checkpoints/; older ones of this run are removed (default: %(default)s, the latest)")
    r.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: CUDA if available)")
    r.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="tqdm progress bars (default: yes)")
    add_threads_argument(r)


def _defaults() -> Dict[str, Any]:
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    return vars(parser.parse_args([]))


# (low, high or None, (low included, high included)) of the numeric options, and what the range means
_RANGES: Dict[str, Tuple[float, Optional[float], Tuple[bool, bool]]] = {
    "val_split": (0.0, 1.0, (True, False)),
    "hflip": (0.0, 1.0, (True, True)),
    "color_jitter": (0.0, None, (True, False)),
    "reprob": (0.0, 1.0, (True, True)),
    "mixup": (0.0, None, (True, False)),
    "cutmix": (0.0, None, (True, False)),
    "mixup_prob": (0.0, 1.0, (True, True)),
    "lr": (0.0, None, (False, False)),
    "min_lr": (0.0, None, (True, False)),
    "warmup_epochs": (0.0, None, (True, False)),
    "warmup_lr": (0.0, None, (True, False)),
    "weight_decay": (0.0, None, (True, False)),
    "layer_decay": (0.0, 1.0, (False, True)),
    "smoothing": (0.0, 1.0, (True, False)),
    "clip_grad": (0.0, None, (False, False)),
    "ema_decay": (0.0, 1.0, (True, False)),
    "drop_path": (0.0, 1.0, (True, False)),
    "target_fps": (0.0, None, (False, False)),
    "momentum": (0.0, 1.0, (True, False)),
}
_RANGE_NOTES = {
    "val_split": "the fraction of each class held out; 0 for none",
    "hflip": "a probability", "color_jitter": "a jitter strength", "reprob": "a probability",
    "mixup": "a Beta alpha; 0 turns it off", "cutmix": "a Beta alpha; 0 turns it off", "mixup_prob": "a probability",
    "lr": "a learning rate", "min_lr": "a learning rate", "warmup_epochs": "epochs; 0 for no warm-up",
    "warmup_lr": "a learning rate", "weight_decay": "a decay factor",
    "layer_decay": "the factor per layer; 1 turns it off", "smoothing": "the probability mass spread over the classes",
    "clip_grad": "a gradient norm; leave it out for no clipping",
    "ema_decay": "the weight of the old average per step, e.g. 0.9998",
    "drop_path": "the stochastic depth rate of the last block",
    "target_fps": "frames per second", "momentum": "the SGD momentum, e.g. 0.9",
}


def _check_args(args: argparse.Namespace) -> None:
    missing = [f"--{name}" for name in _RUN_ARGS if getattr(args, name) is None]
    if missing:
        raise CliError(f'{", ".join(missing)} required (or --resume DIR to continue a run)')
    for name in ("epochs", "batch_size", "eval_batch_size", "img_size", "num_frames", "save_every",
                 "keep_checkpoints", "sampling_rate", "clips_per_video"):
        value = getattr(args, name)
        if value is not None and (value < 1 if name != "save_every" else value < 0):
            flag = "--" + name.replace("_", "-")
            raise CliError(f'{flag} {value}: must be {"at least 1" if name != "save_every" else "0 or more"}')
    for name, (low, high, closed) in _RANGES.items():
        value = getattr(args, name)
        if value is None:
            continue
        above = value >= low if closed[0] else value > low
        below = high is None or (value <= high if closed[1] else value < high)
        if not (math.isfinite(value) and above and below):
            interval = (f'{"[" if closed[0] else "("}{low:g}, {"inf)" if high is None else f"{high:g}"}'
                        f'{"" if high is None else "]" if closed[1] else ")"}')
            raise CliError(f'--{name.replace("_", "-")} {value:g}: must be in {interval} ({_RANGE_NOTES[name]})')
    scale_min, scale_max = args.scale
    if not 0 < scale_min <= scale_max <= 1:
        raise CliError(f"--scale {scale_min:g} {scale_max:g}: give MIN MAX with 0 < MIN <= MAX <= 1 (fractions of the "
                       "image area)")
    low, high = args.jitter_scales
    if not 1 <= low <= high:
        raise CliError(f"--jitter-scales {low} {high}: give MIN MAX with 1 <= MIN <= MAX (short sides in pixels)")
    if args.recipe is not None and args.resume is None and not getattr(args, _RECIPE_APPLIED, False):
        raise CliError(f"--recipe {args.recipe} was not applied: it is read before the other options, so give it in "
                       f"full (--recipe {args.recipe}) to `mvit-zoo finetune`")


def _restore_run_args(args: argparse.Namespace) -> None:
    """`--resume`: options not given (left at their defaults) take the values of the run being resumed;
    the output folder defaults to the run's folder."""
    if not (args.resume or args.output):
        raise CliError("--resume needs the folder of the run: --resume DIR")
    folder = Path(args.resume or args.output)
    from .run_folder import read_state

    state = read_state(folder)
    defaults = _defaults()
    for key, value in state.get("args", {}).items():
        if key not in defaults or key in ("resume", "output"):
            continue
        current = getattr(args, key, None)
        if ((key in _RUN_ARGS or key in _DATA_ARGS) and current is None) or (
                key not in _RUNTIME_ARGS and _normalised(current) == _normalised(defaults[key])):
            setattr(args, key, value)
    if args.output is None:
        args.output = str(folder)
    args.resume = str(folder)


def run(args: argparse.Namespace) -> int:
    """Fine-tune as described by parsed `args`; returns the exit status (130 after a Ctrl-C)."""
    if args.resume is not None:
        _restore_run_args(args)
    _check_args(args)
    apply_threads(args.threads, args.workers)
    for name in _DATA_ARGS:  # saved with the run, for `--resume DIR` from anywhere
        if getattr(args, name) is not None:
            setattr(args, name, str(Path(getattr(args, name)).absolute()))
    # NOTE: the training code (torch, timm) is imported here, so that the parser and its checks answer at once
    import torch.distributed as dist

    from .run_folder import output_lock, start_from, summary
    from .trainer import Trainer

    trainer = Trainer(args)
    try:
        with output_lock(trainer.output, trainer.info.is_main):
            trainer.setup()
            if trainer.finished:
                if trainer.info.is_main:
                    print(f"the run in {args.resume} is finished ({trainer.start_epoch} of {args.epochs} epochs, "
                          f"global step {trainer.global_step}): nothing to resume. To train further, start a new run "
                          f"from its weights: {start_from(Path(args.resume))}", file=sys.stderr)
                return 0
            trainer.train()
    finally:
        if trainer.info.enabled and dist.is_initialized():
            dist.destroy_process_group()
    if trainer.interrupted:
        if trainer.info.is_main:
            launcher = (f"torchrun --nproc_per_node={trainer.info.world_size} -m mvit_zoo"
                        if trainer.info.enabled else "mvit-zoo")
            print(f"saved a checkpoint at global step {trainer.global_step} in {trainer.output}; resume with:\n"
                  f"  {launcher} finetune --resume {shlex.quote(str(trainer.output))}", file=sys.stderr)
        return 130
    if trainer.info.is_main:
        print(summary(trainer.output, trainer.history, trainer.best))
    return 0


def _flag_text(dest: str, value: Any) -> str:
    """`--option value` as it would be typed (`--scale 0.08 1`, `--inverse-uniform`, `--no-inverse-uniform`)."""
    flag = "--" + dest.replace("_", "-")
    if value is None:
        return f"{flag} off"
    if isinstance(value, bool):
        return flag if value else f"--no-{flag[2:]}"
    values = value if isinstance(value, tuple) else (value,)
    return " ".join([flag, *(f"{v:g}" if isinstance(v, float) else str(v) for v in values)])


def prepare_parser(parser: argparse.ArgumentParser, argv: Sequence[str]) -> Dict[str, Any]:
    """Before `parser` (configured by :func:`configure_parser`) reads `argv`: make the options of its `--recipe`
    their defaults, so that options given explicitly override them, and print (stderr, main process) what it
    set. Learning rates are scaled to the global batch (`--batch-size` x the torchrun processes). Nothing is
    applied with `--resume`: a resumed run keeps its own arguments. Returns `{dest: value}` of what was set."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--recipe", default=None)
    pre.add_argument("--batch-size", default=None)
    pre.add_argument("--resume", nargs="?", const="", default=None)
    known, _ = pre.parse_known_args(list(argv))
    if known.recipe not in RECIPE_NAMES or known.resume is not None:
        return {}  # an unknown name is refused by the parser itself
    try:
        batch = int(known.batch_size) if known.batch_size is not None else parser.get_default("batch_size")
    except ValueError:
        return {}  # the parser refuses the value
    from ..data.recipes import apply_recipe, get_recipe

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    chosen = apply_recipe(parser, known.recipe, batch * world_size)
    parser.set_defaults(**{_RECIPE_APPLIED: True})
    if int(os.environ.get("RANK", "0")) == 0:
        recipe = get_recipe(known.recipe)
        flags = " ".join(_flag_text(dest, value) for dest, value in chosen.items())
        print(f"--recipe {recipe.name} (SlowFast {recipe.config}; learning rates for a global batch of "
              f"{batch * world_size} videos) sets, unless given explicitly:\n  {flags}", file=sys.stderr)
    return chosen


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="mvit-zoo finetune")
    configure_parser(parser)
    prepare_parser(parser, argv)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
