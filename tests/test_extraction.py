"""mvit_zoo.extraction: the windows of a video, the frames each feature row saw, and the features of each layer."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import mvit_zoo.extraction as extraction
from mvit_zoo.data.reader import read_frames
from mvit_zoo.evaluation import view_sampling
from video_factory import frame_index, make_video

SMALL_3D = {"depths": [1, 1, 1, 1], "embed_dim": 16, "num_heads": 1, "img_size": [8, 32, 32]}
CLIP = 8 * 4  # num_frames x sampling_rate of mvit_v2_s_16x4 with 8 frames
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("mvit_v2_s_16x4", pretrained=False, **SMALL_3D).eval()


def expected_windows(count: int, fps: float, stride: int) -> list[tuple[float, list[int]]]:
    """The rule, re-derived: windows of CLIP frames at 30 fps every `stride` frames at 30 fps from frame 0 while
    inside the video, then one ending on the last frame if the last did not; indices floor(linspace), clamped."""
    span, step = CLIP * fps / 30, stride * fps / 30
    starts = [0.0]
    while starts[-1] + step + span <= count:
        starts.append(starts[-1] + step)
    if count > span and starts[-1] + span < count:
        starts.append(count - span)
    return [(s, [min(int(math.floor(s + k * (span - 1) / 7)), count - 1) for k in range(8)]) for s in starts]


@pytest.mark.parametrize("count, fps, stride", [(70, 30, CLIP), (64, 30, CLIP), (40, 15, 12), (5, 30, CLIP)])
def test_windows_and_the_frames_each_row_saw_follow_the_rule(tmp_path: Path, model: torch.nn.Module,
                                                             monkeypatch: pytest.MonkeyPatch, count: int, fps: int,
                                                             stride: int) -> None:
    path = make_video(tmp_path / "v.mp4", count, fps=fps, gop=10)
    calls: list[list[int]] = []

    def recording_read(*args, **kwargs):
        frames, rows = read_frames(*args, **kwargs)
        calls.append([frame_index(frames[r]) for r in rows])  # the frames decoded, read back from their pixels
        return frames, rows

    monkeypatch.setattr(extraction, "read_frames", recording_read)
    features, times = extraction.extract_features(model, path, window_stride=stride, batch_size=2)
    expected = expected_windows(count, fps, stride)
    seen = [c[k:k + 8] for c in calls for k in range(0, len(c), 8)]
    assert seen == [indices for _, indices in expected]
    assert [len(c) for c in calls] == [16] * (len(expected) // 2) + [8] * (len(expected) % 2)  # one read per batch
    span = CLIP * fps / 30
    assert np.allclose(times, [(s / fps, min(s + span, count) / fps) for s, _ in expected])
    assert features.shape == (len(expected), model.num_features) and features.dtype == np.float32
    if count == 70:
        assert [s for s, _ in expected] == [0, 32, 38]  # the last window is clamped to end on frame 69
    if count == 5:
        assert seen == [[0] + [4] * 7]  # one row: linspace(0, 31, 8) clamped, so the last frame is repeated


def _clips(model: torch.nn.Module, path: Path, views: str) -> torch.Tensor:
    """The preprocessed views of every window, built from the reader and the test-view sampling directly."""
    sampling = view_sampling(model, views)
    frames, rows = read_frames(path, [i for _, idx in expected_windows(70, 30, CLIP) for i in idx])
    return torch.stack(list(sampling.iter_views(frames, [rows[k:k + 8] for k in range(0, len(rows), 8)])))


def test_pooled_features_are_forward_head_pre_logits(tmp_path: Path, model: torch.nn.Module) -> None:
    path = make_video(tmp_path / "v.mp4", 70)
    features, _ = extraction.extract_features(model, path, batch_size=2)
    with torch.no_grad():
        x = _clips(model, path, "1x1")
        reference = model.forward_head(model.forward_features(x), pre_logits=True)
        logits, _ = extraction.extract_features(model, path, layer="logits")
        assert np.allclose(logits, model(x).numpy(), atol=1e-5)
    assert np.allclose(features, reference.numpy(), atol=1e-5)


def test_three_crops_are_averaged(tmp_path: Path, model: torch.nn.Module) -> None:
    path = make_video(tmp_path / "v.mp4", 70)
    features, _ = extraction.extract_features(model, path, views="1x3")
    with torch.no_grad():
        reference = model.forward_head(model.forward_features(_clips(model, path, "1x3")), pre_logits=True)
    assert np.allclose(features, reference.view(3, 3, -1).mean(1).numpy(), atol=1e-5)


def test_stage_maps_are_forward_intermediates(tmp_path: Path, model: torch.nn.Module) -> None:
    path = make_video(tmp_path / "v.mp4", 70)
    maps, _ = extraction.extract_features(model, path, layer="stage1", batch_size=2)
    pooled, _ = extraction.extract_features(model, path, layer="stage1", spatial_pool="mean")
    with torch.no_grad():
        (reference,) = model.forward_intermediates(_clips(model, path, "1x1"), indices=[1], intermediates_only=True)
    assert maps.shape == tuple(reference.shape) and maps.shape[1] == model.feature_info[1]["num_chs"]
    assert np.allclose(maps, reference.numpy(), atol=1e-5)
    assert np.allclose(pooled, reference.mean((-2, -1)).transpose(1, 2).numpy(), atol=1e-5)  # (clips, T', C)


def test_bad_layer_views_and_stride_are_refused(tmp_path: Path, model: torch.nn.Module) -> None:
    path = make_video(tmp_path / "v.mp4", 10)
    with pytest.raises(ValueError, match=r"unknown layer 'stage4': choose one of pooled, logits, stage0, .*stage3"):
        extraction.extract_features(model, path, layer="stage4")
    with pytest.raises(ValueError, match="drop --spatial-pool"):
        extraction.extract_features(model, path, spatial_pool="mean")
    with pytest.raises(ValueError, match="1x1 .* or 1x3"):
        extraction.extract_features(model, path, views="5x1")
    with pytest.raises(ValueError, match="window_stride must be at least 1"):
        extraction.extract_features(model, path, window_stride=0)
