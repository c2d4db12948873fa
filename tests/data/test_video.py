"""mvit_zoo.data.video: PyAV decoding, temporal sampling (T frames at stride tau) and clip transforms."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mvit_zoo.data.video import (ClipTransform, VideoFolder, is_video_file, load_clip, read_video,
                            sample_clip_indices, write_video)


def ramp_video(frames: int = 12, size: int = 32) -> np.ndarray:
    """Frame t is uniformly grey at level 20 * t: the decoded level tells which frame it was."""
    return np.stack([np.full((size, size, 3), 20 * t, np.uint8) for t in range(frames)])


def frame_ids(clip: np.ndarray) -> list[int]:
    return [int(round(float(f.mean()) / 20)) for f in clip]


def test_sample_clip_indices_centre_and_stride() -> None:
    assert sample_clip_indices(100, 4, 4) == [43, 47, 51, 55]  # span 13, centred
    assert sample_clip_indices(13, 4, 4) == [0, 4, 8, 12]
    assert sample_clip_indices(16, 16, 1) == list(range(16))


def test_sample_clip_indices_short_video_repeats_last_frame() -> None:
    assert sample_clip_indices(10, 4, 4) == [0, 4, 8, 9]
    assert sample_clip_indices(1, 3, 2) == [0, 0, 0]


def test_sample_clip_indices_random_start_covers_all_starts() -> None:
    g = torch.Generator().manual_seed(0)
    starts = {sample_clip_indices(20, 4, 3, random_start=True, generator=g)[0] for _ in range(300)}
    assert starts == set(range(20 - 10 + 1))


@pytest.mark.parametrize("bad", [(0, 4, 1), (10, 0, 1), (10, 4, 0)])
def test_sample_clip_indices_rejects_bad_arguments(bad: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError):
        sample_clip_indices(*bad)


def test_write_read_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "ramp.mp4"
    write_video(path, ramp_video())
    frames = read_video(path)
    assert frames.shape == (12, 32, 32, 3) and frames.dtype == np.uint8
    assert frame_ids(frames) == list(range(12))


def test_load_clip_takes_frames_at_stride(tmp_path: Path) -> None:
    path = tmp_path / "ramp.mp4"
    write_video(path, ramp_video())
    clip = load_clip(path, num_frames=3, stride=4)
    assert frame_ids(clip) == [1, 5, 9]  # span 9 of 12 frames, centred
    for _ in range(5):
        ids = frame_ids(load_clip(path, num_frames=3, stride=4, random_start=True))
        assert ids[1] - ids[0] == ids[2] - ids[1] == 4 and 0 <= ids[0] <= 3


def test_clip_transform_eval_shape_and_normalisation() -> None:
    frames = np.full((4, 40, 60, 3), 255, np.uint8)
    tf = ClipTransform((3, 4, 32, 32), False, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), crop_pct=0.8)
    clip = tf(frames)
    assert clip.shape == (3, 4, 32, 32) and clip.dtype == torch.float32
    torch.testing.assert_close(clip, torch.full_like(clip, 2.0))  # (1 - 0.5) / 0.25


def test_clip_transform_training_crop_is_shared_by_all_frames() -> None:
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
    tf = ClipTransform((24, 24), True, (0.0,) * 3, (1.0,) * 3, scale=(0.1, 0.5), hflip=0.5)
    for _ in range(5):
        clip = tf(np.repeat(frame[None], 4, axis=0))
        assert clip.shape == (3, 4, 24, 24)
        assert all(torch.equal(clip[:, 0], clip[:, t]) for t in range(1, 4))


def test_clip_transform_bgr_reverses_channels() -> None:
    frames = np.zeros((2, 8, 8, 3), np.uint8)
    frames[..., 0] = 255  # red
    rgb = ClipTransform((8, 8), False, (0.0,) * 3, (1.0,) * 3)(frames)
    bgr = ClipTransform((8, 8), False, (0.0,) * 3, (1.0,) * 3, channel_order="BGR")(frames)
    assert rgb[0].min() == 1 and rgb[2].max() == 0
    torch.testing.assert_close(bgr, rgb.flip(0))


def test_video_folder(tmp_path: Path) -> None:
    for name in ("b", "a"):
        (tmp_path / name).mkdir()
        write_video(tmp_path / name / "clip.mp4", ramp_video(8, 16))
    (tmp_path / "a" / "notes.txt").write_text("not a video")
    tf = ClipTransform((3, 4, 16, 16), False, (0.0,) * 3, (1.0,) * 3, crop_pct=1.0)
    ds = VideoFolder.from_root(tmp_path, num_frames=4, stride=2, transform=tf)
    assert ds.classes == ["a", "b"] and len(ds) == 2 and ds.targets == [0, 1]
    clip, target = ds[1]
    assert target == 1 and clip.shape == (3, 4, 16, 16)
    levels = [round(float(clip[:, t].mean()) * 255 / 20) for t in range(4)]
    assert levels == [0, 2, 4, 6]


def test_is_video_file() -> None:
    assert is_video_file("a/b.MP4") and is_video_file("x.webm") and not is_video_file("x.jpg")
