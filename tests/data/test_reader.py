"""mvit_zoo.data.reader: the frames read are exactly the ones asked for, after seeking, with every backend."""
from __future__ import annotations

import random
from pathlib import Path

import av
import numpy as np
import pytest
from video_factory import code_frame, frame_index, make_huge_gif, make_video, truncate_packets

from mvit_zoo.data import reader
from mvit_zoo.data.reader import VideoError, available_backends, probe, read_frames, resolve_backend


def decode_all(path: Path) -> np.ndarray:
    """Every frame of the file, decoded from the start by PyAV: the reference the seeking reads must equal."""
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])

BACKENDS = ["pyav", pytest.param("torchcodec", marks=pytest.mark.skipif(
    "torchcodec" not in available_backends(), reason="torchcodec does not import or decode here"))]

VFR_PTS = np.cumsum(np.random.default_rng(0).integers(10, 90, size=40)) - 10  # irregular steps of 10-90 ms

# name: (file name, make_video arguments); every video has 40 frames
VIDEOS = {
    "h264_bframes": ("h264.mp4", {"codec": "libx264", "gop": 8, "bframes": 2}),
    "vp9_webm": ("vp9.webm", {"codec": "libvpx-vp9", "gop": 8}),
    "mpeg4_avi": ("mpeg4.avi", {"codec": "mpeg4", "gop": 8, "bframes": 2}),
    "gif": ("anim.gif", {"codec": "gif"}),
    "vfr_mkv": ("vfr.mkv", {"codec": "libx264", "gop": 6, "bframes": 2, "vfr_pts": VFR_PTS}),
    "vfr_mp4": ("vfr.mp4", {"codec": "libx264", "gop": 6, "bframes": 2, "vfr_pts": VFR_PTS}),
}


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("videos")
    return {name: make_video(root / file, 40, **kwargs) for name, (file, kwargs) in VIDEOS.items()}


def _skip_avi_on_torchcodec(name: str, backend: str) -> None:
    if backend == "torchcodec" and name == "mpeg4_avi":
        pytest.skip("torchcodec misplaces B-frames in AVI (no pts): the reader refuses it, see test_torchcodec_avi")


def test_code_frame_round_trip() -> None:
    for i in (0, 1, 7, 1000, 4095):
        assert frame_index(code_frame(i, 64, 48)) == i
    garbled = code_frame(5)
    garbled[:, :32] = 128  # blocks between ON and OFF
    with pytest.raises(ValueError, match="between OFF"):
        frame_index(garbled)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(VIDEOS))
def test_random_index_sets(videos: dict[str, Path], name: str, backend: str) -> None:
    """Seeded random index sets (repeats, any order, past the end): each row holds the frame asked for."""
    _skip_avi_on_torchcodec(name, backend)
    path = videos[name]
    info = probe(path, backend)
    assert info.num_frames == 40 and (info.width, info.height) == (64, 48)
    rng = random.Random(0)
    for _ in range(20):
        indices = [rng.randrange(0, 44) for _ in range(rng.randrange(1, 9))]
        frames, rows = read_frames(path, indices, backend=backend, info=info)
        unique = sorted({min(i, 39) for i in indices})
        assert frames.shape == (len(unique), 48, 64, 3) and frames.dtype == np.uint8
        assert [frame_index(f) for f in frames] == unique
        assert [frame_index(frames[r]) for r in rows] == [min(i, 39) for i in indices]


@pytest.mark.parametrize("name", list(VIDEOS))
def test_matches_full_decode(videos: dict[str, Path], name: str) -> None:
    """Byte-identical to decoding the whole file from its start."""
    full = decode_all(videos[name])
    indices = [39, 3, 17, 16, 30, 0, 25]
    frames, rows = read_frames(videos[name], indices, backend="pyav")
    np.testing.assert_array_equal(frames[rows], full[indices])


@pytest.mark.skipif("torchcodec" not in available_backends(), reason="torchcodec does not import or decode here")
@pytest.mark.parametrize("name", ["h264_bframes", "vp9_webm", "gif", "vfr_mkv"])
def test_backends_agree(videos: dict[str, Path], name: str) -> None:
    # NOTE: both convert with swscale's default (bilinear, BT.601 limited range) to rgb24, PyAV with its bundled
    # FFmpeg and torchcodec with the system's; at these sizes that is byte for byte the same
    indices = list(range(0, 40, 3))
    ours, _ = read_frames(videos[name], indices, backend="pyav")
    theirs, _ = read_frames(videos[name], indices, backend="torchcodec")
    np.testing.assert_array_equal(ours, theirs)


def test_variable_frame_rate(videos: dict[str, Path]) -> None:
    info = probe(videos["vfr_mkv"], "pyav")
    assert info.fps == pytest.approx(39 / ((VFR_PTS[-1] - VFR_PTS[0]) / 1000), rel=1e-3)
    frames, _ = read_frames(videos["vfr_mkv"], [35, 36], info=info, backend="pyav")
    assert [frame_index(f) for f in frames] == [35, 36]


@pytest.mark.parametrize("backend", BACKENDS)
def test_header_overstates_frames(tmp_path: Path, backend: str) -> None:
    """An MP4 cut short (index first, as a download stopped part-way): the header still declares 60 frames."""
    path = make_video(tmp_path / "cut.mp4", 60, gop=10, bframes=0, faststart=True)
    truncate_packets(path, 37)
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 60
    assert len(decode_all(path)) == 37
    info = probe(path, backend)
    assert info.num_frames == 37
    frames, rows = read_frames(path, [0, 30, 36, 37, 50, 59], backend=backend)
    assert [frame_index(frames[r]) for r in rows] == [0, 30, 36, 36, 36, 36]


def test_sparse_read_decodes_one_gop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 16-frame clip near the end of a 300-frame file decodes its GOPs, not the file."""
    path = make_video(tmp_path / "long.mp4", 300, gop=30, bframes=2)
    info = probe(path, "pyav")
    decoded, converted = [], []
    decode, to_rgb = reader._decode, reader._to_rgb

    def counting_decode(container, stream):
        for frame in decode(container, stream):
            decoded.append(frame.pts)
            yield frame

    def counting_to_rgb(frame):
        converted.append(frame.pts)
        return to_rgb(frame)

    monkeypatch.setattr(reader, "_decode", counting_decode)
    monkeypatch.setattr(reader, "_to_rgb", counting_to_rgb)
    clip = list(range(260, 292, 2))
    frames, rows = read_frames(path, clip, backend="pyav", info=info)
    assert [frame_index(frames[r]) for r in rows] == clip
    assert len(converted) == 16
    assert len(decoded) <= 292 - 240 + 8  # from keyframe 240 to frame 291, plus the decoder's reorder delay
    decoded.clear()
    read_frames(path, [5, 295], backend="pyav", info=info)  # frames 0-5, then a seek to keyframe 270
    assert len(decoded) <= 6 + (296 - 270) + 4


def test_empty_and_not_video_files(tmp_path: Path) -> None:
    (tmp_path / "zero.mp4").write_bytes(b"")
    with pytest.raises(VideoError, match=r"zero\.mp4: the file is empty \(0 bytes\)"):
        probe(tmp_path / "zero.mp4", "pyav")
    (tmp_path / "text.mp4").write_text("not a video\n" * 20)
    with pytest.raises(VideoError, match=r"text\.mp4: not a readable video"):
        read_frames(tmp_path / "text.mp4", [0], backend="pyav")
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        probe(tmp_path / "missing.mp4")


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_frames(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "empty.mkv"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        container.start_encoding()
    with pytest.raises(VideoError, match=r"empty\.mkv: .*(no frames|not a readable video)"):
        probe(path, backend)


@pytest.mark.parametrize("size", [(65535, 65535), (16000, 16000)])
def test_huge_gif_refused_before_decoding(tmp_path: Path, size: tuple[int, int]) -> None:
    path = make_huge_gif(tmp_path / "bomb.gif", *size)
    assert path.stat().st_size < 100
    message = rf"bomb\.gif: frames of {size[0]}x{size[1]} pixels exceed the reader's limit of {7680 * 4320}"
    with pytest.raises(VideoError, match=message):
        probe(path)
    with pytest.raises(VideoError, match=message):
        read_frames(path, [0])


def test_limits(videos: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    path = videos["h264_bframes"]
    monkeypatch.setattr(reader, "MAX_PIXELS", 64 * 48 - 1)
    with pytest.raises(VideoError, match=r"h264\.mp4: frames of 64x48 pixels exceed .*MAX_PIXELS"):
        probe(path, "pyav")
    monkeypatch.undo()
    monkeypatch.setattr(reader, "MAX_NUM_FRAMES", 39)
    with pytest.raises(VideoError, match=r"40 frames exceed the reader's limit of 39"):
        probe(path, "pyav")
    monkeypatch.undo()
    monkeypatch.setattr(reader, "MAX_DURATION", 1.0)
    with pytest.raises(VideoError, match=r"duration of 1 s exceeds .* 1 s .*MAX_DURATION"):
        probe(path, "pyav")


def test_bad_requests(videos: dict[str, Path], tmp_path: Path) -> None:
    path = videos["h264_bframes"]
    with pytest.raises(ValueError, match="frame indices must be >= 0"):
        read_frames(path, [3, -1], backend="pyav")
    with pytest.raises(ValueError, match="Unknown video backend 'opencv'.*pyav"):
        read_frames(path, [0], backend="opencv")
    other = make_video(tmp_path / "other.mp4", 5)
    with pytest.raises(VideoError, match=r"other\.mp4: the VideoInfo passed was probed from .*h264\.mp4"):
        read_frames(other, [0], backend="pyav", info=probe(path, "pyav"))


def test_resolve_backend() -> None:
    available = available_backends()
    assert "pyav" in available
    assert resolve_backend(None) == available[0]
    assert resolve_backend("pyav") == "pyav"


def test_torchcodec_unavailable_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reader, "_torchcodec_error", lambda: "torchcodec does not import (ImportError: x)")
    assert available_backends() == ["pyav"] and resolve_backend(None) == "pyav"
    with pytest.raises(ImportError, match="not available: torchcodec does not import.*pip install torchcodec"):
        resolve_backend("torchcodec")


@pytest.mark.skipif("torchcodec" not in available_backends(), reason="torchcodec does not import or decode here")
def test_torchcodec_avi(videos: dict[str, Path]) -> None:
    """AVI has no presentation timestamps: torchcodec is refused by name and skipped by default."""
    with pytest.raises(VideoError, match=r"mpeg4\.avi: the torchcodec backend misplaces frames in AVI"):
        read_frames(videos["mpeg4_avi"], [0], backend="torchcodec")
    frames, _ = read_frames(videos["mpeg4_avi"], [24])
    assert frame_index(frames[0]) == 24
