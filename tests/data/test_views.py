"""mvit_zoo.data.views: SlowFast's test views (uniform clip starts, 1 or 3 crops) on frames that encode
their index (red) and pixel position (green: x, blue: y)."""
from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import torch
from video_factory import count_decoded, frame_index, make_video

from mvit_zoo.data import reader
from mvit_zoo.data.views import (
    MAX_TEMPORAL_VIEWS,
    Views,
    ViewSampling,
    crop_offset,
    decode_views,
    segment_indices,
    stride_clip_indices,
)


def coded_frames(n: int, height: int, width: int) -> np.ndarray:
    """Frame t: red = t, green = x, blue = y."""
    frames = np.zeros((n, height, width, 3), np.uint8)
    frames[..., 0] = np.arange(n)[:, None, None]
    frames[..., 1] = np.arange(width)[None, None, :]
    frames[..., 2] = np.arange(height)[None, :, None]
    return frames


def decode(view: torch.Tensor) -> tuple[list[int], int, int]:
    """(frame indices, x and y of the top-left pixel) of a view normalised with mean 0, std 1."""
    codes = (view * 255).round().long()
    return codes[0, :, 0, 0].tolist(), int(codes[1, 0, 0, 0]), int(codes[2, 0, 0, 0])


def sampling(views: str, **kw) -> ViewSampling:
    kw.setdefault("num_frames", 4)
    kw.setdefault("crop_size", (32, 32))
    return ViewSampling(views=Views.parse(views), mean=(0.0,) * 3, std=(1.0,) * 3, **kw)


# -- temporal: SlowFast's offset sampling, indices = floor(linspace(start, start + T*tau - 1, T)) clamped --

def test_one_clip_is_centred() -> None:
    # clip of 16 frames, delta 84, start 42
    assert stride_clip_indices(100, 4, 4) == [42, 47, 52, 57]


def test_five_clips_start_uniformly_from_first_to_last_frame() -> None:
    # delta 84: starts 0, 21, 42, 63, 84; the last clip ends on the last frame
    clips = [stride_clip_indices(100, 4, 4, t, 5) for t in range(5)]
    assert clips == [[0, 5, 10, 15], [21, 26, 31, 36], [42, 47, 52, 57], [63, 68, 73, 78], [84, 89, 94, 99]]


def test_clip_indices_round_down_over_the_clip() -> None:
    # clip of 8 frames: linspace(s, s + 7, 4) = s, s + 2.33, s + 4.67, s + 7; delta 42 -> starts 0, 21, 42
    assert [stride_clip_indices(50, 4, 2, t, 3) for t in range(3)] == [[0, 2, 4, 7], [21, 23, 25, 28],
                                                                        [42, 44, 46, 49]]


def test_video_shorter_than_a_clip_repeats_its_last_frame() -> None:
    # clip of 16 frames over 10: start 0, linspace(0, 15, 4) = 0, 5, 10, 15 clamped to 9; every clip the same
    assert [stride_clip_indices(10, 4, 4, t, 5) for t in range(5)] == [[0, 5, 9, 9]] * 5
    assert stride_clip_indices(1, 3, 2) == [0, 0, 0]


def test_frame_rate_is_converted_to_the_target_rate() -> None:
    # at 15 fps a 16-frame clip at 30 fps spans 8 frames: delta 92, start 46
    assert stride_clip_indices(100, 4, 4, fps=15.0) == [46, 48, 50, 53]
    assert stride_clip_indices(100, 4, 4, fps=30.0) == stride_clip_indices(100, 4, 4)


def test_segment_sampling_takes_segment_middles_and_shifts_per_view() -> None:
    # 33 frames, 4 segments of 8: [0, 8], [8, 16], [16, 24], [24, 32]
    assert segment_indices(33, 4) == [4, 12, 20, 28]
    assert [segment_indices(33, 4, t, 3) for t in range(3)] == [[1, 9, 17, 25], [4, 12, 20, 28], [6, 14, 22, 30]]
    assert segment_indices(3, 4) == [0, 0, 1, 2]  # shorter than the clip: frames repeat


@pytest.mark.parametrize("bad", [(0, 4, 4, 0, 1), (10, 4, 4, 3, 3)])
def test_stride_clip_indices_rejects_bad_arguments(bad: tuple) -> None:
    with pytest.raises(ValueError):
        stride_clip_indices(*bad)


# -- spatial: uniform_crop's offsets -------------------------------------------------------------------

def test_crop_offsets_landscape_and_portrait() -> None:
    assert [crop_offset(32, 48, (32, 32), s) for s in range(3)] == [(0, 0), (0, 8), (0, 16)]
    assert [crop_offset(48, 32, (32, 32), s) for s in range(3)] == [(0, 0), (8, 0), (16, 0)]
    assert crop_offset(41, 60, (32, 32), 1) == (5, 14)  # centre rounds up


def test_views_parse() -> None:
    assert Views.parse("5x3") == Views(5, 3) and str(Views(5, 1)) == "5x1" and len(Views(5, 3)) == 15
    assert Views.parse((1, 3)) == Views(1, 3)
    for bad in ("5", "5x2", "0x1", "axb"):
        with pytest.raises(ValueError, match="TxS|crops|temporal"):
            Views.parse(bad)


# -- whole views: frames and crops of each -----------------------------------------------------------

def test_1x1_view_is_the_centre_crop_of_the_centre_clip() -> None:
    # crop 32 / crop_pct 0.8 = short side 40: a 40x60 frame is not resized
    s = sampling("1x1", sampling_rate=4, crop_pct=0.8)
    clips = s.clip_indices(100)
    (view,) = list(s.iter_views(coded_frames(100, 40, 60), clips))
    assert view.shape == (3, 4, 32, 32)
    assert decode(view) == ([42, 47, 52, 57], 14, 4)


def test_5x1_views() -> None:
    s = sampling("5x1", sampling_rate=4, crop_pct=0.8)
    views = list(s.iter_views(coded_frames(100, 40, 60), s.clip_indices(100)))
    assert [decode(v)[0] for v in views] == [[0, 5, 10, 15], [21, 26, 31, 36], [42, 47, 52, 57], [63, 68, 73, 78],
                                             [84, 89, 94, 99]]
    assert {decode(v)[1:] for v in views} == {(14, 4)}


def test_3x3_views_clip_major_left_centre_right() -> None:
    # three crops: the short side is resized to the crop (32), so a 32x48 frame is not resized
    s = sampling("3x3", sampling_rate=2)
    views = list(s.iter_views(coded_frames(50, 32, 48), s.clip_indices(50)))
    assert [decode(v) for v in views] == [
        (clip, x, 0) for clip in ([0, 2, 4, 7], [21, 23, 25, 28], [42, 44, 46, 49]) for x in (0, 8, 16)]


def test_3x3_views_of_a_portrait_video_are_top_centre_bottom() -> None:
    s = sampling("1x3", sampling_rate=2)
    views = list(s.iter_views(coded_frames(8, 48, 32), s.clip_indices(8)))
    assert [decode(v)[1:] for v in views] == [(0, 0), (0, 8), (0, 16)]


def test_short_video_views_repeat_the_last_frame() -> None:
    s = sampling("3x3", sampling_rate=4)
    assert s.is_short(10) and not s.is_short(16)
    views = list(s.iter_views(coded_frames(10, 32, 48), s.clip_indices(10)))
    assert len(views) == 9 and {tuple(decode(v)[0]) for v in views} == {(0, 5, 9, 9)}


def test_resize_short_side_then_crop() -> None:
    s = sampling("1x3", crop_size=(16, 16))
    assert s.resized_size(20, 30) == (16, 24) and s.crops(16, 24) == [(0, 0), (0, 4), (0, 8)]
    views = list(s.iter_views(coded_frames(4, 20, 30), s.clip_indices(4)))
    assert [v.shape for v in views] == [(3, 4, 16, 16)] * 3
    # 1 crop: short side crop / crop_pct = 20 -> no resize of a 20x30 frame, centre crop at (2, 7)
    one = sampling("1x1", crop_size=(16, 16), crop_pct=0.8)
    assert one.resized_size(20, 30) == (20, 30)
    assert decode(next(one.iter_views(coded_frames(4, 20, 30), one.clip_indices(4))))[1:] == (7, 2)


def test_bgr_channel_order_reverses_channels() -> None:
    frames = coded_frames(4, 32, 32)
    rgb = next(sampling("1x1").iter_views(frames, [[0, 1, 2, 3]]))
    bgr = next(sampling("1x1", channel_order="BGR").iter_views(frames, [[0, 1, 2, 3]]))
    torch.testing.assert_close(bgr, rgb.flip(0))


def test_mean_std_applied_in_model_order() -> None:
    s = ViewSampling(num_frames=1, crop_size=(8, 8), mean=(0.5, 0.0, 0.0), std=(0.5, 1.0, 2.0))
    view = next(s.iter_views(np.full((1, 8, 8, 3), 255, np.uint8), [[0]]))
    torch.testing.assert_close(view[:, 0, 0, 0], torch.tensor([1.0, 1.0, 0.5]))


# -- decoding only the frames the views need ------------------------------------------------------------

def test_views_of_a_long_video_decode_only_their_clips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """5x1 views of a 900-frame file (30 s at 30 fps, a keyframe every 15 frames) decode five clips' GOPs."""
    path = make_video(tmp_path / "long.mp4", 900, gop=15, bframes=2)
    decoded = count_decoded(monkeypatch)
    s = sampling("5x1", num_frames=8, sampling_rate=4, crop_size=(32, 32))
    frames, clips, short = decode_views(path, s, "pyav")
    expected = s.clip_indices(900, 30.0)
    assert expected[-1][-1] == 899 and not short  # the last clip ends on the last frame
    assert [[frame_index(frames[r]) for r in rows] for rows in clips] == expected
    span = 8 * 4  # frames a clip covers
    assert len(decoded) <= 5 * (15 + span + 4) < 900 / 3  # each clip from the keyframe before it, + reorder delay
    decoded.clear()
    frames, rows = reader.read_frames(path, expected[-1], backend="pyav")  # the clip at the end alone
    assert [frame_index(frames[r]) for r in rows] == expected[-1] and len(decoded) <= 15 + span + 4


@pytest.mark.parametrize("views", ["3x1", "2x3"])
def test_views_equal_a_full_decode(tmp_path: Path, views: str) -> None:
    """On a short file, the views of the seeking reader are those of decoding every frame with PyAV."""
    path = make_video(tmp_path / "short.mp4", 40, gop=8, bframes=2, size=(80, 48))
    s = sampling(views, num_frames=4, sampling_rate=3, crop_size=(32, 32))
    with av.open(str(path)) as container:
        every = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    clips = s.clip_indices(len(every), 30.0)
    full = list(s.iter_views(every, clips))
    frames, rows, _ = decode_views(path, s, "pyav")
    ours = list(s.iter_views(frames, rows))
    assert len(ours) == len(full) == len(s.views)
    for a, b in zip(ours, full):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_views_in_the_papers_order_suggest_the_swap() -> None:
    with pytest.raises(ValueError, match=r"did you mean 5x1 \(TxS is clips x crops"):
        Views.parse("1x5")
    with pytest.raises(ValueError, match="did you mean 10x3"):
        Views.parse("3x10")


def test_temporal_views_are_capped() -> None:
    assert len(Views(MAX_TEMPORAL_VIEWS, 3)) == 3 * MAX_TEMPORAL_VIEWS
    with pytest.raises(ValueError, match=f"99999 temporal clips asked; at most {MAX_TEMPORAL_VIEWS}"):
        Views.parse("99999x3")


def slowfast_short_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """The output size of SlowFast's `random_short_side_scale_jitter` (slowfast/datasets/transform.py) with
    min_size = max_size = size, re-derived from its code: a frame whose short side is `size` is returned as
    it is, else the long side is floor(long / short * size)."""
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(np.floor(height / width * size)), size
    return size, int(np.floor(width / height * size))


@pytest.mark.parametrize("size", [224, 256, 312, 356])
def test_resize_matches_slowfast_short_side_scale(size: int) -> None:
    for height, width in [(size, 488), (488, size), (size, size), (240, 320), (720, 1280), (size, 2 * size + 41)]:
        s = sampling("1x3", crop_size=(size, size))
        assert s.resized_size(height, width) == slowfast_short_side_size(height, width, size), (height, width)


def test_frame_at_the_target_short_side_is_not_resampled() -> None:
    # 488 / 224 * 224 rounds down to 487: a resize would move the right crop by a pixel
    s = sampling("1x3", crop_size=(224, 224))
    frames = coded_frames(4, 224, 488)
    views = list(s.iter_views(frames, [[0, 1, 2, 3]]))
    assert [decode(v)[1:] for v in views] == [(0, 0), (132, 0), (264 - 256, 0)]  # green wraps at 256
    torch.testing.assert_close(views[2], torch.from_numpy(frames[:, :, 264:]).permute(3, 0, 1, 2).float() / 255)


def test_one_crop_short_side_is_the_tags_jitter_minimum() -> None:
    """SlowFast's Kinetics test resizes one crop's short side to DATA.TRAIN_JITTER_SCALES[0]: 256 in the 224
    configs, 356 in MVITv2_L_40x3_test.yaml (TEST_CROP_SIZE 312). mmaction2's own weights test at short side
    224 (its test pipeline's Resize(scale=(-1, 224)))."""
    import timm

    import mvit_zoo  # noqa: F401 - registers the tags

    expected = {224: 256, 312: 356}
    for tag in mvit_zoo.list_pretrained("mvit_*k400"):
        cfg = timm.models.get_pretrained_cfg(tag)
        crop = cfg.input_size[-1]
        one = ViewSampling(num_frames=cfg.num_frames, crop_size=(crop, crop), crop_pct=cfg.crop_pct)
        assert one.short_side() == (224 if ".mm_" in tag else expected[crop]), tag
