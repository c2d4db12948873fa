"""Training-time frame sampling as SlowFast trains MViTv2: a random clip (Kinetics) or a random frame
per segment (Something-Something v2).

Randomness comes from a `random.Random` the caller passes, the generator type SlowFast draws from
(`random.uniform` in `decoder.get_start_end_idx`, `random.randint` in `ssv2.get_seq_frames`): the
same seed gives the same draws, whatever the data-loader workers or processes
(:class:`~mvit_zoo.data.video.VideoClips` seeds one per sample from the generator
:class:`~mvit_zoo.data.folders.EpochSeeded` seeds per (seed, epoch, sample)).

Test-time sampling (uniform views) is in :mod:`mvit_zoo.data.views`.
"""
from __future__ import annotations

import math
import random
from typing import List

import torch

from .views import SLOWFAST_TARGET_FPS

__all__ = ["train_clip_indices", "train_segment_indices"]


def train_clip_indices(
        num_available: int,
        num_frames: int,
        sampling_rate: int,
        fps: float | None,
        target_fps: float | None = SLOWFAST_TARGET_FPS,
        rng: random.Random | None = None,
) -> List[int]:
    """`num_frames` frame indices of one random training clip (SlowFast's `clip_idx=-1` sampling).

    The clip spans `num_frames * sampling_rate` frames at `target_fps`, i.e. that many times
    `fps / target_fps` of the video's frames (at least 1), so 25, 30 and 60 fps videos give clips
    of the same duration; without `fps` (or `target_fps`) it spans that many of the video's frames.
    Its start is drawn uniformly in `[0, max(num_available - span, 0)]` (`rng.uniform`), and the
    indices are `linspace(start, start + span - 1, num_frames)` clamped to the video and rounded
    down, so a video shorter than the clip repeats its last frame (SlowFast's `decoder.decode` of a
    fully decoded video; its selective decoding reads the same span). `rng=None` draws from
    Python's global generator.
    """
    if num_available < 1:
        raise ValueError("A video needs at least one frame; remove or re-encode the empty video")
    if num_frames < 1 or sampling_rate < 1:
        raise ValueError(f"num_frames and sampling_rate must be positive, got {num_frames} and {sampling_rate}")
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive frame rate or None (count the clip in the video's frames), "
                         f"got {fps}")
    span = float(sampling_rate * num_frames)
    if fps and target_fps:
        span = sampling_rate * num_frames / target_fps * fps  # SlowFast's operation order, to the last bit
    span = max(1.0, span)
    delta = max(num_available - span, 0.0)
    start = (rng or random).uniform(0, delta)
    index = torch.linspace(start, start + span - 1, num_frames)
    return index.clamp(0, num_available - 1).long().tolist()


def train_segment_indices(num_available: int, num_frames: int, rng: random.Random | None = None) -> List[int]:
    """One random frame from each of `num_frames` equal segments (SlowFast's SSv2 training sampling).

    Segment `i` runs from `round(s * i)` to `round(s * (i + 1))` (both included) with
    `s = (num_available - 1) / num_frames`; its frame is `rng.randint(start, end)`. `rng=None`
    draws from Python's global generator.
    """
    if num_available < 1:
        raise ValueError("A video needs at least one frame; remove or re-encode the empty video")
    if num_frames < 1:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    draw = rng or random
    segment = (num_available - 1) / num_frames
    # NOTE: round() halves to even, as numpy's np.round in SlowFast's ssv2.py
    return [draw.randint(round(segment * i), round(segment * (i + 1))) for i in range(num_frames)]
