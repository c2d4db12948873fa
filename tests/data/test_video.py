"""mvit_zoo.data.video: training clips (decode only the clip, SlowFast's sampling, repeated augmentation),
the one-view validation clips, the centre clip of `predict`, and the clip transform."""
from __future__ import annotations

import random
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mvit_zoo.data import video as video_module
from mvit_zoo.data.augment import TrainClipTransform
from mvit_zoo.data.folders import EpochSeeded
from mvit_zoo.data.sampling import train_clip_indices, train_segment_indices
from mvit_zoo.data.video import VideoClips, ViewClips, is_video_file, shrink_frames
from mvit_zoo.data.views import ViewSampling, stride_clip_indices
from video_factory import frame_index, make_video


def raw(frames: np.ndarray, rng: random.Random) -> torch.Tensor:
    """A 'transform' that keeps the decoded frames, to read back which frames a clip holds."""
    return torch.from_numpy(np.ascontiguousarray(frames))


def indices_of(clip: torch.Tensor) -> list[int]:
    return [frame_index(f) for f in clip.numpy()]


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Two-second H.264 videos with B-frames at 25, 30 and 60 fps whose frames encode their index."""
    root = tmp_path_factory.mktemp("videos")
    return {fps: make_video(root / f"{fps}.mp4", 2 * fps, fps=fps, gop=fps // 2, bframes=2) for fps in (25, 30, 60)}


@pytest.mark.parametrize("fps", [25, 30, 60])
def test_training_clip_holds_the_frames_of_slowfasts_rule(videos: dict[int, Path], fps: int) -> None:
    """The frames of a training clip are those train_clip_indices draws with the clip's generator (a clip of
    4 x 4 frames at 30 fps, so it spans 16 / 30 s of the video whatever its frame rate)."""
    dataset = VideoClips([(str(videos[fps]), 0)], num_frames=4, sampling_rate=4, transform=raw)
    for seed in range(6):
        random.seed(seed)
        clip, target = dataset[0]
        random.seed(seed)
        rng = random.Random(random.getrandbits(64))
        assert indices_of(clip) == train_clip_indices(2 * fps, 4, 4, fps, 30.0, rng), seed
        assert target == 0


def test_segment_sampling_takes_one_frame_per_segment(videos: dict[int, Path]) -> None:
    dataset = VideoClips([(str(videos[30]), 1)], num_frames=8, sampling_rate=1, transform=raw, frame_sampling="segment")
    random.seed(3)
    clip, _ = dataset[0]
    random.seed(3)
    assert indices_of(clip) == train_segment_indices(60, 8, random.Random(random.getrandbits(64)))


def test_clips_per_video_decode_the_video_once(videos: dict[int, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """N clips per video: one probe and one decode of the clip's frames, then N independent augmentations."""
    calls = {"probe": 0, "read_frames": 0}
    for name in calls:
        real = getattr(video_module, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(video_module, name, counted)
    plain = VideoClips([(str(videos[30]), 0)], 4, 4, transform=raw, clips_per_video=3)
    random.seed(0)
    clips, _ = plain[0]
    assert clips.shape[0] == 3 and all(torch.equal(clips[0], c) for c in clips)  # the same frames
    assert calls == {"probe": 1, "read_frames": 1}
    augment = TrainClipTransform((16, 16), (0.5,) * 3, (0.25,) * 3, auto_augment=None, re_prob=0.0)
    augmented = VideoClips([(str(videos[30]), 0)], 4, 4, transform=augment, clips_per_video=2)
    clips, _ = augmented[0]
    assert clips.shape == (2, 3, 4, 16, 16) and not torch.equal(clips[0], clips[1])  # augmented independently
    assert calls == {"probe": 2, "read_frames": 2}


@pytest.mark.parametrize("workers", [0, 2])
def test_training_clips_depend_on_seed_epoch_and_sample_only(videos: dict[int, Path], workers: int) -> None:
    transform = TrainClipTransform((16, 16), (0.5,) * 3, (0.25,) * 3, re_prob=0.25)
    samples = [(str(videos[fps]), i) for i, fps in enumerate((25, 30, 60))]

    def epoch(seed: int, epoch: int, workers: int) -> list[torch.Tensor]:
        dataset = EpochSeeded(VideoClips(samples, 4, 4, transform, clips_per_video=2), seed)
        dataset.epoch = epoch
        return [x for x, _ in DataLoader(dataset, batch_size=None, num_workers=workers)]

    first = epoch(0, 0, workers)
    assert all(torch.equal(a, b) for a, b in zip(first, epoch(0, 0, 0)))
    assert not torch.equal(first[0], epoch(0, 1, 0)[0]) and not torch.equal(first[0], epoch(1, 0, 0)[0])


@pytest.mark.parametrize("fps", [25, 30, 60])
def test_view_clips_are_the_one_view_validate_scores(videos: dict[int, Path], fps: int) -> None:
    """The centre clip at the 30 fps rule (so the same duration at any frame rate), resized and cropped as
    validate's one view; the frames compared are decoded from the whole file by PyAV."""
    sampling = ViewSampling(num_frames=4, crop_size=(32, 32), sampling_rate=4, crop_pct=0.875)
    view, target = ViewClips([(str(videos[fps]), 2)], sampling)[0]
    (indices,) = sampling.clip_indices(2 * fps, float(fps))
    assert indices == stride_clip_indices(2 * fps, 4, 4, fps=fps)
    with av.open(str(videos[fps])) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])[indices]
    assert [frame_index(f) for f in frames] == indices
    (expected,) = sampling.iter_views(frames, [list(range(4))])
    assert target == 2 and torch.equal(view, expected)
    with pytest.raises(ValueError, match="one view per video"):
        ViewClips([], ViewSampling(num_frames=4, crop_size=(32, 32), views=(2, 1)))  # type: ignore[arg-type]


def test_shrink_frames_brings_the_short_side_down_only() -> None:
    frames = np.random.default_rng(0).integers(0, 256, (2, 720, 1280, 3), dtype=np.uint8)
    small = shrink_frames(frames, 256)
    assert small.shape == (2, 256, 455, 3) and small.dtype == np.uint8
    assert shrink_frames(frames[:, :200, :300], 256).shape == (2, 200, 300, 3)
    assert shrink_frames(frames, None) is frames
    flat = np.full((1, 600, 400, 3), 77, np.uint8)
    assert np.array_equal(shrink_frames(flat, 300), np.full((1, 450, 300, 3), 77, np.uint8))


def test_video_clips_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="frame_sampling"):
        VideoClips([], 4, 4, raw, frame_sampling="random")
    with pytest.raises(ValueError, match="clips_per_video"):
        VideoClips([], 4, 4, raw, clips_per_video=0)


def test_is_video_file() -> None:
    assert is_video_file("a/b.MP4") and is_video_file("x.webm") and not is_video_file("x.jpg")
