"""mvit_zoo.data.sampling against a transcription of SlowFast's training sampling fed the same random draws."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from mvit_zoo.data.sampling import train_clip_indices, train_segment_indices


# --- SlowFast, transcribed from its documented formulas ----------------------------------------------------------
def slowfast_get_start_end_idx(video_size: float, clip_size: float, clip_idx: int, num_clips_uniform: int):
    """slowfast/datasets/decoder.py `get_start_end_idx` (use_offset=False)."""
    delta = max(video_size - clip_size, 0)
    if clip_idx == -1:
        start_idx = random.uniform(0, delta)
    else:
        start_idx = delta * clip_idx / num_clips_uniform
    return start_idx, start_idx + clip_size - 1


def slowfast_temporal_sampling(num_video_frames: int, start_idx: float, end_idx: float, num_samples: int) -> list:
    """slowfast/datasets/decoder.py `temporal_sampling`, on the frame indices instead of the frames."""
    index = torch.linspace(start_idx, end_idx, num_samples)
    return torch.clamp(index, 0, num_video_frames - 1).long().tolist()


def slowfast_train_clip(num_video_frames: int, num_frames: int, sampling_rate: int, fps: float,
                        target_fps: float = 30) -> list:
    """slowfast/datasets/decoder.py `decode` of a fully decoded video with `clip_idx=-1`."""
    clip_size = np.maximum(1.0, sampling_rate * num_frames / target_fps * fps)
    start, end = slowfast_get_start_end_idx(num_video_frames, clip_size, -1, 1)
    return slowfast_temporal_sampling(num_video_frames, start, end, num_frames)


def slowfast_ssv2_train(video_length: int, num_frames: int) -> list:
    """slowfast/datasets/ssv2.py `Ssv2.get_seq_frames` in train mode."""
    seg_size = float(video_length - 1) / num_frames
    seq = []
    for i in range(num_frames):
        start = int(np.round(seg_size * i))
        end = int(np.round(seg_size * (i + 1)))
        seq.append(random.randint(start, end))
    return seq
# -----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fps", [25.0, 29.97, 30.0, 60.0])
@pytest.mark.parametrize("num_frames,sampling_rate", [(16, 4), (32, 3), (8, 8), (1, 1)])
def test_train_clip_indices_equal_slowfast(fps: float, num_frames: int, sampling_rate: int) -> None:
    lengths = [1, 2, 7, 30, 63, 64, 65, 100, 127, 128, 129, 250, 300, 301, 1000]
    for length in lengths:
        for draw in range(20):
            seed = length * 1000 + draw
            random.seed(seed)
            expected = slowfast_train_clip(length, num_frames, sampling_rate, fps)
            ours = train_clip_indices(length, num_frames, sampling_rate, fps, rng=random.Random(seed))
            assert ours == expected, (length, fps, draw)


def test_train_clip_same_duration_at_any_frame_rate() -> None:
    """A clip spans num_frames * sampling_rate frames at 30 fps: 64 frames = 2.13 s, whatever the video's rate."""
    for fps in (25.0, 30.0, 60.0):
        seconds = 10
        indices = train_clip_indices(int(fps * seconds), 16, 4, fps, rng=random.Random(0))
        span = (indices[-1] - indices[0] + 1) / fps
        assert span == pytest.approx(64 / 30, abs=1.5 / fps)
        assert indices == sorted(indices) and len(indices) == 16


def test_train_clip_without_fps_counts_video_frames() -> None:
    indices = train_clip_indices(1000, 4, 5, None, rng=random.Random(1))
    assert indices[-1] - indices[0] == 19  # linspace from start to start + 19, rounded down
    assert train_clip_indices(1000, 4, 5, 60.0, target_fps=None, rng=random.Random(1)) == indices


def test_train_clip_short_video_repeats_last_frame() -> None:
    assert train_clip_indices(3, 8, 4, 30.0, rng=random.Random(0)) == [0, 2, 2, 2, 2, 2, 2, 2]
    assert train_clip_indices(1, 8, 4, 30.0, rng=random.Random(0)) == [0] * 8


def test_train_clip_start_covers_the_video() -> None:
    starts = {train_clip_indices(200, 16, 4, 30.0, rng=random.Random(s))[0] for s in range(400)}
    assert min(starts) <= 2 and max(starts) >= 133  # start in [0, 200 - 64]
    assert max(starts) <= 136


def test_train_segment_indices_equal_slowfast() -> None:
    for length in [1, 2, 5, 8, 15, 16, 17, 31, 32, 33, 48, 100, 117]:
        for num_frames in (1, 8, 16):
            for draw in range(20):
                seed = length * 100 + num_frames * 7 + draw
                random.seed(seed)
                expected = slowfast_ssv2_train(length, num_frames)
                assert train_segment_indices(length, num_frames, rng=random.Random(seed)) == expected


def test_train_segment_indices_stay_in_their_segments() -> None:
    for seed in range(50):
        indices = train_segment_indices(50, 8, rng=random.Random(seed))
        assert indices == sorted(indices) and 0 <= indices[0] and indices[-1] <= 49
        for i, index in enumerate(indices):
            assert round(49 / 8 * i) <= index <= round(49 / 8 * (i + 1))


def test_global_generator_when_no_rng() -> None:
    random.seed(5)
    a = train_clip_indices(300, 16, 4, 25.0), train_segment_indices(300, 16)
    random.seed(5)
    assert (train_clip_indices(300, 16, 4, 25.0), train_segment_indices(300, 16)) == a


@pytest.mark.parametrize("bad,message", [(dict(num_available=0), "at least one frame"),
                                         (dict(num_frames=0), "num_frames"), (dict(sampling_rate=0), "sampling_rate"),
                                         (dict(fps=0.0), "fps"), (dict(fps=math.nan), "fps")])
def test_bad_input_is_named(bad: dict, message: str) -> None:
    kw = dict(num_available=10, num_frames=4, sampling_rate=2, fps=30.0) | bad
    with pytest.raises(ValueError, match=message):
        train_clip_indices(**kw)
