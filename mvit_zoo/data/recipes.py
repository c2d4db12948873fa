"""Named training recipes: SlowFast's MViTv2-S data, augmentation and optimisation settings.

`k400` is `configs/Kinetics/MVITv2_S_16x4.yaml`, `ssv2` is `configs/SSv2/MVITv2_S_16x4.yaml` (SSv2 is
fine-tuned from Kinetics weights), with `slowfast/config/defaults.py` for the keys a config leaves out.
Each field's comment names its config key; "default" marks a value from defaults.py.

Learning rates are SlowFast's for `TRAIN.BATCH_SIZE` (16) videos per step; with
`SOLVER.BASE_LR_SCALE_NUM_SHARDS` SlowFast multiplies `BASE_LR`, `WARMUP_START_LR` and
`COSINE_END_LR` by the number of machines, each of which takes `TRAIN.BATCH_SIZE` videos: the rates
grow linearly with the global batch in videos (:meth:`Recipe.learning_rates`). Each video gives
`AUG.NUM_SAMPLE` clips per step (Kinetics: 2, the same frames augmented twice).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Optional, Tuple

from .views import SLOWFAST_TARGET_FPS, Views

__all__ = ["RECIPES", "Recipe", "apply_recipe", "finetune_options", "get_recipe"]


@dataclass(frozen=True)
class Recipe:
    """A SlowFast training recipe (see the module's docstring); values as the config writes them."""

    name: str
    config: str  # the SlowFast config file
    # -- data: sampling
    num_frames: int  # DATA.NUM_FRAMES
    sampling_rate: int  # DATA.SAMPLING_RATE (frames at target_fps; unused by segment sampling)
    frame_sampling: str  # TRAIN.DATASET: kinetics 'stride' (decoder.py), ssv2 'segment' (ssv2.py)
    clips_per_video: int  # AUG.NUM_SAMPLE: augmented copies of one sampled clip per video and step
    target_fps: float = SLOWFAST_TARGET_FPS  # DATA.TARGET_FPS (default)
    # -- data: spatial
    crop_size: int = 224  # DATA.TRAIN_CROP_SIZE
    crop_mode: str = "resized"  # 'resized' if DATA.TRAIN_JITTER_SCALES_RELATIVE is set, else 'jitter'
    scale: Optional[Tuple[float, float]] = (0.08, 1.0)  # DATA.TRAIN_JITTER_SCALES_RELATIVE
    ratio: Optional[Tuple[float, float]] = (0.75, 1.3333)  # DATA.TRAIN_JITTER_ASPECT_RELATIVE
    jitter_scales: Tuple[int, int] = (256, 320)  # DATA.TRAIN_JITTER_SCALES (crop_mode 'jitter')
    inverse_uniform: bool = False  # DATA.INV_UNIFORM_SAMPLE (crop_mode 'jitter')
    hflip: float = 0.5  # DATA.RANDOM_FLIP (default True): transform.horizontal_flip(0.5, ...)
    channel_order: str = "RGB"  # DATA.REVERSE_INPUT_CHANNEL (default False)
    mean: Tuple[float, float, float] = (0.45, 0.45, 0.45)  # DATA.MEAN (default)
    std: Tuple[float, float, float] = (0.225, 0.225, 0.225)  # DATA.STD (default)
    # -- augmentation
    auto_augment: str = "rand-m7-n4-mstd0.5-inc1"  # AUG.AA_TYPE
    interpolation: str = "bicubic"  # AUG.INTERPOLATION (RandAugment's geometric ops)
    re_prob: float = 0.25  # AUG.RE_PROB
    re_mode: str = "pixel"  # AUG.RE_MODE
    re_count: int = 1  # AUG.RE_COUNT
    mixup_alpha: float = 0.8  # MIXUP.ALPHA
    cutmix_alpha: float = 1.0  # MIXUP.CUTMIX_ALPHA
    mixup_prob: float = 1.0  # MIXUP.PROB
    mixup_switch_prob: float = 0.5  # MIXUP.SWITCH_PROB
    label_smoothing: float = 0.1  # MIXUP.LABEL_SMOOTH_VALUE
    # -- model regularisation
    drop_path: float = 0.2  # MVIT.DROPPATH_RATE
    head_dropout: float = 0.5  # MODEL.DROPOUT_RATE
    # -- optimisation
    optimizer: str = "adamw"  # SOLVER.OPTIMIZING_METHOD
    momentum: float = 0.9  # SOLVER.MOMENTUM (SGD)
    nesterov: bool = True  # SOLVER.NESTEROV (default; SGD)
    betas: Tuple[float, float] = (0.9, 0.999)  # SOLVER.BETAS (default; AdamW)
    base_lr: float = 1e-4  # SOLVER.BASE_LR
    base_batch_size: int = 16  # TRAIN.BATCH_SIZE: videos per machine (NUM_GPUS: 8), the batch of base_lr
    lr_scale_num_shards: bool = True  # SOLVER.BASE_LR_SCALE_NUM_SHARDS: the rates x machines (linear in batch)
    warmup_epochs: float = 30.0  # SOLVER.WARMUP_EPOCHS
    warmup_start_lr: float = 1e-6  # SOLVER.WARMUP_START_LR
    cosine_end_lr: float = 1e-6  # SOLVER.COSINE_END_LR (SOLVER.LR_POLICY: cosine, COSINE_AFTER_WARMUP: True)
    weight_decay: float = 0.05  # SOLVER.WEIGHT_DECAY
    zero_wd_1d: bool = True  # SOLVER.ZERO_WD_1D_PARAM: no weight decay on norms and biases
    zero_wd_pos_cls: bool = False  # MVIT.ZERO_DECAY_POS_CLS: position tables and class token decay
    layer_decay: float = 1.0  # SOLVER.LAYER_DECAY (default: off)
    epochs: int = 200  # SOLVER.MAX_EPOCH
    clip_grad: Optional[float] = 1.0  # SOLVER.CLIP_GRAD_L2NORM
    # -- evaluation
    test_crop_size: int = 224  # DATA.TEST_CROP_SIZE
    views: Views = field(default_factory=Views)  # TEST.NUM_ENSEMBLE_VIEWS x TEST.NUM_SPATIAL_CROPS

    def learning_rates(self, global_batch_size: Optional[int] = None) -> Tuple[float, float, float]:
        """(peak, warm-up start, end) learning rates for `global_batch_size` videos per step.

        SlowFast scales all three by the machine count (`lr_scale_num_shards`), i.e. by
        `global_batch_size / base_batch_size`; `None` gives the rates of `base_batch_size`.
        """
        rates = (self.base_lr, self.warmup_start_lr, self.cosine_end_lr)
        if global_batch_size is None or not self.lr_scale_num_shards:
            return rates
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be at least 1 video, got {global_batch_size}")
        factor = global_batch_size / self.base_batch_size
        return tuple(rate * factor for rate in rates)  # type: ignore[return-value]

    def to_dict(self) -> Dict[str, Any]:
        return {f.name: (str(v) if isinstance(v := getattr(self, f.name), Views) else v) for f in fields(self)}


RECIPES: Dict[str, Recipe] = {
    "k400": Recipe(
        name="k400", config="configs/Kinetics/MVITv2_S_16x4.yaml",
        num_frames=16, sampling_rate=4, frame_sampling="stride", clips_per_video=2,
        views=Views(5, 1),
    ),
    "ssv2": Recipe(
        name="ssv2", config="configs/SSv2/MVITv2_S_16x4.yaml",
        num_frames=16, sampling_rate=4, frame_sampling="segment", clips_per_video=1,
        # NOTE: the SSv2 config sets no TRAIN_JITTER_SCALES_RELATIVE: SlowFast's short-side jitter + random crop
        crop_mode="jitter", scale=None, ratio=None, inverse_uniform=True, hflip=0.0, channel_order="BGR",
        drop_path=0.4, optimizer="sgd", base_lr=0.0025, warmup_epochs=3.0, warmup_start_lr=1e-4,
        weight_decay=1e-4, epochs=100, clip_grad=None, views=Views(1, 3),
    ),
}


def get_recipe(name: str) -> Recipe:
    """The recipe called `name` (`k400`, `ssv2`)."""
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}") from None


def finetune_options(recipe: Recipe, global_batch_size: Optional[int] = None) -> Dict[str, Any]:
    """`mvit-zoo finetune` option values (argparse dests) of `recipe`.

    Learning rates are scaled to `global_batch_size` videos (:meth:`Recipe.learning_rates`). The
    clip geometry (frames, sampling rate, crop size) is left to the model's own configuration. The
    dests `opt`, `momentum`, `clips_per_video`, `crop_mode`, `jitter_scales`, `inverse_uniform`,
    `target_fps`, `frame_sampling`, `re_mode`, `aa_interpolation` and `channel_order` are included
    for the options finetune may offer; :func:`apply_recipe` sets only those its parser has.
    """
    lr, warmup_lr, min_lr = recipe.learning_rates(global_batch_size)
    options: Dict[str, Any] = {
        "drop_path": recipe.drop_path,
        "hflip": recipe.hflip,
        "aa": recipe.auto_augment,
        "reprob": recipe.re_prob,
        "mixup": recipe.mixup_alpha,
        "cutmix": recipe.cutmix_alpha,
        "mixup_prob": recipe.mixup_prob,
        "smoothing": recipe.label_smoothing,
        "opt": recipe.optimizer,
        "lr": lr,
        "warmup_lr": warmup_lr,
        "min_lr": min_lr,
        "warmup_epochs": recipe.warmup_epochs,
        "weight_decay": recipe.weight_decay,
        "layer_decay": recipe.layer_decay,
        "epochs": recipe.epochs,
        "clip_grad": recipe.clip_grad,
        "clips_per_video": recipe.clips_per_video,
        "crop_mode": recipe.crop_mode,
        "jitter_scales": recipe.jitter_scales,
        "inverse_uniform": recipe.inverse_uniform,
        "target_fps": recipe.target_fps,
        "frame_sampling": recipe.frame_sampling,
        "re_mode": recipe.re_mode,
        "aa_interpolation": recipe.interpolation,
        "channel_order": recipe.channel_order,
    }
    if recipe.scale is not None:
        options["scale"] = recipe.scale
    if recipe.optimizer == "sgd":
        options["momentum"] = recipe.momentum
    return options


def apply_recipe(parser: argparse.ArgumentParser, recipe: Recipe | str,
                 global_batch_size: Optional[int] = None) -> Dict[str, Any]:
    """Make `recipe`'s values the defaults of `parser`'s options, so that flags given explicitly override them.

    Returns the `{dest: value}` it set (the options `parser` has). Raises `ValueError` if the recipe
    needs an optimizer other than AdamW and `parser` has no `--opt` to choose it: its learning rates
    and weight decay mean nothing for AdamW.
    """
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    dests = {action.dest for action in parser._actions}
    options = finetune_options(recipe, global_batch_size)
    if "opt" not in dests and recipe.optimizer != "adamw":
        raise ValueError(f"recipe {recipe.name!r} trains with {recipe.optimizer.upper()} (SOLVER.OPTIMIZING_METHOD in "
                         f"{recipe.config}), and this command has no --opt option (it trains with AdamW); its learning "
                         f"rate {recipe.base_lr} and weight decay {recipe.weight_decay} are wrong for AdamW: give "
                         f"--lr/--weight-decay/--warmup-epochs yourself instead of --recipe {recipe.name}")
    chosen = {dest: value for dest, value in options.items() if dest in dests}
    parser.set_defaults(**chosen)
    return chosen
