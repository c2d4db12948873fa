"""mvit_zoo.data.recipes: the values of SlowFast's MViTv2-S configs and their mapping onto finetune's options."""
from __future__ import annotations

import argparse
import json

import pytest

from mvit_zoo.apps.finetune import configure_parser
from mvit_zoo.data.recipes import RECIPES, Recipe, apply_recipe, finetune_options, get_recipe
from mvit_zoo.data.views import Views

# The keys of SlowFast's configs/Kinetics/MVITv2_S_16x4.yaml and configs/SSv2/MVITv2_S_16x4.yaml, and of
# slowfast/config/defaults.py where a config leaves one out ("default"), as the files write them.
SLOWFAST = {
    "k400": {
        "DATA.NUM_FRAMES": 16, "DATA.SAMPLING_RATE": 4, "DATA.TARGET_FPS (default)": 30, "AUG.NUM_SAMPLE": 2,
        "DATA.TRAIN_CROP_SIZE": 224, "DATA.TRAIN_JITTER_SCALES": [256, 320],
        "DATA.TRAIN_JITTER_SCALES_RELATIVE": [0.08, 1.0], "DATA.TRAIN_JITTER_ASPECT_RELATIVE": [0.75, 1.3333],
        "DATA.INV_UNIFORM_SAMPLE (default)": False, "DATA.RANDOM_FLIP (default)": True,
        "DATA.REVERSE_INPUT_CHANNEL (default)": False,
        "AUG.AA_TYPE": "rand-m7-n4-mstd0.5-inc1", "AUG.INTERPOLATION": "bicubic", "AUG.RE_PROB": 0.25,
        "AUG.RE_MODE": "pixel", "AUG.RE_COUNT": 1, "MIXUP.ALPHA": 0.8, "MIXUP.CUTMIX_ALPHA": 1.0, "MIXUP.PROB": 1.0,
        "MIXUP.SWITCH_PROB": 0.5, "MIXUP.LABEL_SMOOTH_VALUE": 0.1, "MVIT.DROPPATH_RATE": 0.2,
        "MODEL.DROPOUT_RATE": 0.5, "SOLVER.OPTIMIZING_METHOD": "adamw", "SOLVER.BASE_LR": 0.0001,
        "TRAIN.BATCH_SIZE": 16, "SOLVER.BASE_LR_SCALE_NUM_SHARDS": True, "SOLVER.WARMUP_EPOCHS": 30.0,
        "SOLVER.WARMUP_START_LR": 1e-6, "SOLVER.COSINE_END_LR": 1e-6, "SOLVER.WEIGHT_DECAY": 0.05,
        "SOLVER.ZERO_WD_1D_PARAM": True, "MVIT.ZERO_DECAY_POS_CLS": False, "SOLVER.LAYER_DECAY (default)": 1.0,
        "SOLVER.MAX_EPOCH": 200, "SOLVER.CLIP_GRAD_L2NORM": 1.0, "TEST.NUM_ENSEMBLE_VIEWS": 5,
        "TEST.NUM_SPATIAL_CROPS": 1,
    },
    "ssv2": {
        "DATA.NUM_FRAMES": 16, "DATA.SAMPLING_RATE": 4, "DATA.TARGET_FPS (default)": 30, "AUG.NUM_SAMPLE": 1,
        "DATA.TRAIN_CROP_SIZE": 224, "DATA.TRAIN_JITTER_SCALES": [256, 320],
        "DATA.TRAIN_JITTER_SCALES_RELATIVE (default)": [], "DATA.TRAIN_JITTER_ASPECT_RELATIVE (default)": [],
        "DATA.INV_UNIFORM_SAMPLE": True, "DATA.RANDOM_FLIP": False, "DATA.REVERSE_INPUT_CHANNEL": True,
        "AUG.AA_TYPE": "rand-m7-n4-mstd0.5-inc1", "AUG.INTERPOLATION": "bicubic", "AUG.RE_PROB": 0.25,
        "AUG.RE_MODE": "pixel", "AUG.RE_COUNT": 1, "MIXUP.ALPHA": 0.8, "MIXUP.CUTMIX_ALPHA": 1.0, "MIXUP.PROB": 1.0,
        "MIXUP.SWITCH_PROB": 0.5, "MIXUP.LABEL_SMOOTH_VALUE": 0.1, "MVIT.DROPPATH_RATE": 0.4,
        "MODEL.DROPOUT_RATE": 0.5, "SOLVER.OPTIMIZING_METHOD": "sgd", "SOLVER.BASE_LR": 0.0025,
        "TRAIN.BATCH_SIZE": 16, "SOLVER.BASE_LR_SCALE_NUM_SHARDS": True, "SOLVER.WARMUP_EPOCHS": 3.0,
        "SOLVER.WARMUP_START_LR": 1e-4, "SOLVER.COSINE_END_LR": 1e-6, "SOLVER.WEIGHT_DECAY": 1e-4,
        "SOLVER.ZERO_WD_1D_PARAM": True, "MVIT.ZERO_DECAY_POS_CLS": False, "SOLVER.LAYER_DECAY (default)": 1.0,
        "SOLVER.MAX_EPOCH": 100, "SOLVER.CLIP_GRAD_L2NORM (default)": None, "TEST.NUM_ENSEMBLE_VIEWS": 1,
        "TEST.NUM_SPATIAL_CROPS": 3,
    },
}


def from_slowfast(cfg: dict) -> dict:
    """The Recipe fields a SlowFast config gives (how SlowFast's datasets and solver read each key)."""
    relative = cfg.get("DATA.TRAIN_JITTER_SCALES_RELATIVE", cfg.get("DATA.TRAIN_JITTER_SCALES_RELATIVE (default)"))
    aspect = cfg.get("DATA.TRAIN_JITTER_ASPECT_RELATIVE", cfg.get("DATA.TRAIN_JITTER_ASPECT_RELATIVE (default)"))

    def get(key: str):
        return cfg[key] if key in cfg else cfg[f"{key} (default)"]

    return {
        "num_frames": cfg["DATA.NUM_FRAMES"], "sampling_rate": cfg["DATA.SAMPLING_RATE"],
        "target_fps": get("DATA.TARGET_FPS"), "clips_per_video": cfg["AUG.NUM_SAMPLE"],
        "crop_size": cfg["DATA.TRAIN_CROP_SIZE"], "crop_mode": "resized" if relative else "jitter",
        "scale": tuple(relative) if relative else None, "ratio": tuple(aspect) if aspect else None,
        "jitter_scales": tuple(cfg["DATA.TRAIN_JITTER_SCALES"]), "inverse_uniform": get("DATA.INV_UNIFORM_SAMPLE"),
        "hflip": 0.5 if get("DATA.RANDOM_FLIP") else 0.0,
        "channel_order": "BGR" if get("DATA.REVERSE_INPUT_CHANNEL") else "RGB",
        "auto_augment": cfg["AUG.AA_TYPE"], "interpolation": cfg["AUG.INTERPOLATION"], "re_prob": cfg["AUG.RE_PROB"],
        "re_mode": cfg["AUG.RE_MODE"], "re_count": cfg["AUG.RE_COUNT"], "mixup_alpha": cfg["MIXUP.ALPHA"],
        "cutmix_alpha": cfg["MIXUP.CUTMIX_ALPHA"], "mixup_prob": cfg["MIXUP.PROB"],
        "mixup_switch_prob": cfg["MIXUP.SWITCH_PROB"], "label_smoothing": cfg["MIXUP.LABEL_SMOOTH_VALUE"],
        "drop_path": cfg["MVIT.DROPPATH_RATE"], "head_dropout": cfg["MODEL.DROPOUT_RATE"],
        "optimizer": cfg["SOLVER.OPTIMIZING_METHOD"], "base_lr": cfg["SOLVER.BASE_LR"],
        "base_batch_size": cfg["TRAIN.BATCH_SIZE"], "lr_scale_num_shards": cfg["SOLVER.BASE_LR_SCALE_NUM_SHARDS"],
        "warmup_epochs": cfg["SOLVER.WARMUP_EPOCHS"], "warmup_start_lr": cfg["SOLVER.WARMUP_START_LR"],
        "cosine_end_lr": cfg["SOLVER.COSINE_END_LR"], "weight_decay": cfg["SOLVER.WEIGHT_DECAY"],
        "zero_wd_1d": cfg["SOLVER.ZERO_WD_1D_PARAM"], "zero_wd_pos_cls": cfg["MVIT.ZERO_DECAY_POS_CLS"],
        "layer_decay": get("SOLVER.LAYER_DECAY"), "epochs": cfg["SOLVER.MAX_EPOCH"],
        "clip_grad": get("SOLVER.CLIP_GRAD_L2NORM"),
        "views": Views(cfg["TEST.NUM_ENSEMBLE_VIEWS"], cfg["TEST.NUM_SPATIAL_CROPS"]),
    }


@pytest.mark.parametrize("name", ["k400", "ssv2"])
def test_recipe_values_are_the_config_values(name: str) -> None:
    recipe = get_recipe(name)
    for key, value in from_slowfast(SLOWFAST[name]).items():
        assert getattr(recipe, key) == value, key
    assert recipe.frame_sampling == {"k400": "stride", "ssv2": "segment"}[name]
    assert recipe.mean == (0.45, 0.45, 0.45) and recipe.std == (0.225, 0.225, 0.225)  # DATA.MEAN/STD (default)


@pytest.mark.parametrize("name", ["k400", "ssv2"])
def test_finetune_options_map_the_config_values(name: str) -> None:
    cfg = SLOWFAST[name]
    options = finetune_options(get_recipe(name))
    expected = {
        "drop_path": cfg["MVIT.DROPPATH_RATE"], "aa": cfg["AUG.AA_TYPE"], "reprob": cfg["AUG.RE_PROB"],
        "mixup": cfg["MIXUP.ALPHA"], "cutmix": cfg["MIXUP.CUTMIX_ALPHA"], "mixup_prob": cfg["MIXUP.PROB"],
        "smoothing": cfg["MIXUP.LABEL_SMOOTH_VALUE"], "opt": cfg["SOLVER.OPTIMIZING_METHOD"],
        "lr": cfg["SOLVER.BASE_LR"], "warmup_lr": cfg["SOLVER.WARMUP_START_LR"], "min_lr": cfg["SOLVER.COSINE_END_LR"],
        "warmup_epochs": cfg["SOLVER.WARMUP_EPOCHS"], "weight_decay": cfg["SOLVER.WEIGHT_DECAY"],
        "epochs": cfg["SOLVER.MAX_EPOCH"], "clips_per_video": cfg["AUG.NUM_SAMPLE"], "re_mode": cfg["AUG.RE_MODE"],
        "aa_interpolation": cfg["AUG.INTERPOLATION"], "layer_decay": 1.0,
    }
    for key, value in expected.items():
        assert options[key] == value, key
    if name == "k400":
        assert options["scale"] == (0.08, 1.0) and options["hflip"] == 0.5 and options["clip_grad"] == 1.0
        assert options["crop_mode"] == "resized" and options["channel_order"] == "RGB" and "momentum" not in options
    else:
        assert "scale" not in options and options["hflip"] == 0.0 and options["clip_grad"] is None
        assert options["crop_mode"] == "jitter" and options["inverse_uniform"] and options["channel_order"] == "BGR"
        assert options["momentum"] == 0.9 and options["frame_sampling"] == "segment"


def test_learning_rates_scale_linearly_with_the_global_batch() -> None:
    """SlowFast: BASE_LR, WARMUP_START_LR and COSINE_END_LR x NUM_SHARDS machines of TRAIN.BATCH_SIZE videos."""
    k400 = get_recipe("k400")
    assert k400.learning_rates() == (1e-4, 1e-6, 1e-6)
    assert k400.learning_rates(128) == pytest.approx((8e-4, 8e-6, 8e-6))
    assert finetune_options(k400, 64)["lr"] == pytest.approx(4e-4)
    with pytest.raises(ValueError, match="global_batch_size"):
        k400.learning_rates(0)


def finetune_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    return parser


def test_apply_recipe_sets_finetune_defaults_and_flags_override() -> None:
    parser = finetune_parser()
    chosen = apply_recipe(parser, "k400")
    assert chosen == {k: v for k, v in finetune_options(get_recipe("k400")).items()
                      if k in vars(finetune_parser().parse_args([]))}
    assert {"lr", "weight_decay", "warmup_epochs", "smoothing", "drop_path", "mixup", "cutmix", "hflip", "aa",
            "reprob", "scale", "layer_decay", "epochs", "clip_grad"} <= set(chosen)
    args = parser.parse_args([])
    for key, value in chosen.items():
        assert getattr(args, key) == value, key
    args = parser.parse_args(["--lr", "0.003", "--epochs", "5", "--hflip", "0"])
    assert (args.lr, args.epochs, args.hflip) == (0.003, 5, 0.0)
    assert args.weight_decay == 0.05 and args.aa == "rand-m7-n4-mstd0.5-inc1"
    json.dumps(chosen)  # printable as it is


def test_apply_recipe_refuses_sgd_without_an_optimizer_option() -> None:
    """A parser without --opt cannot take ssv2's SGD learning rate (AdamW would get it); finetune's can."""
    bare = argparse.ArgumentParser()
    for flag in ("--lr", "--weight-decay"):
        bare.add_argument(flag, type=float)
    with pytest.raises(ValueError, match="--opt"):
        apply_recipe(bare, "ssv2")
    parser = finetune_parser()
    chosen = apply_recipe(parser, get_recipe("ssv2"))
    args = parser.parse_args([])
    assert (args.opt, args.momentum, args.lr, args.weight_decay) == ("sgd", 0.9, 0.0025, 1e-4)
    assert chosen["opt"] == "sgd"


def test_unknown_recipe_is_named() -> None:
    with pytest.raises(ValueError, match="k400, ssv2"):
        get_recipe("kinetics")


def test_recipes_are_frozen_and_printable() -> None:
    recipe = RECIPES["k400"]
    with pytest.raises(AttributeError):
        recipe.base_lr = 1.0  # type: ignore[misc]
    assert isinstance(recipe, Recipe)
    assert json.loads(json.dumps(recipe.to_dict()))["views"] == "5x1"
